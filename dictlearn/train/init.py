"""The start of a run: scales, biases and thresholds estimated from a data sample, and the
initial train state.

* Inputs (and transcoder targets) are scaled so ``E||x||^2 = d``, estimated from
  ``init_samples`` rows; the scales are folded into the returned weights at the end.
* Random unit decoder rows; encoder = decoder^T (SAE) or independent random unit columns
  (transcoder), times ``encoder_scale``; ``b_dec`` = geometric median of the
  (skip-corrected) targets.
* Thresholds: ``threshold_init`` for every latent when given; otherwise each latent's
  threshold is the quantile of its initial pre-activations over the sample at which it
  fires on a fraction ``init_firing_rate`` of the rows. A fixed start suits only one run
  length: a log-threshold moves about its learning rate per step, so from the paper's
  0.001 a short run never reaches the target L0. From the data, step 0's L0 is a known
  multiple of the target whatever the site, the width or the run length.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn.train import objective
from dictlearn.train.config import TrainConfig

METRICS = ("loss", "mse", "l0", "fvu", "penalty")


@dataclasses.dataclass(frozen=True)
class InitEstimate:
  """What a run's start takes from the data (normalised units).

  Attributes:
    s_in: input scale (x is multiplied by it).
    s_out: target scale (s_in for an SAE).
    b_dec: (d_out,) initial decoder bias.
    w_skip: (d_in, d_out) initial skip of an affine transcoder, or None (zeros).
    sample: (n, d_in) the normalised input sample, for the thresholds.
    targets: (n, d_out) the normalised targets less b_dec and the initial skip (the
      sample itself, less b_dec, for an SAE), for the decoder rows.
  """

  s_in: float
  s_out: float
  b_dec: np.ndarray
  w_skip: np.ndarray | None
  sample: np.ndarray
  targets: np.ndarray


def estimate_init(src, cfg: TrainConfig) -> InitEstimate:
  """Scales, b_dec and w_skip from a seeded sample of the data (``cfg`` resolved)."""
  x, y = src.sample(cfg.init_samples, cfg.seed)
  x = x.astype(np.float64)
  y = x if y is None else y.astype(np.float64)

  def scale(a):
    ms = float(np.mean(np.sum(a * a, axis=-1)))
    if not np.isfinite(ms) or ms <= 0:
      raise ValueError("the data sample has zero or non-finite mean squared norm; cannot "
                       "normalise (are the activations all zero, NaN or inf?)")
    return math.sqrt(a.shape[-1] / ms) if cfg.normalize else 1.0

  s_in = scale(x)
  s_out = scale(y) if cfg.kind == "transcoder" else s_in
  xn, yn = x * s_in, y * s_out
  w_skip = None
  if cfg.affine and cfg.skip_init == "lstsq":
    w_skip = _ridge(xn, yn)
    yn = yn - xn @ w_skip
  if cfg.b_dec_init == "median":
    b_dec = geometric_median(yn)
  elif cfg.b_dec_init == "mean":
    b_dec = yn.mean(0)
  else:
    b_dec = np.zeros(yn.shape[1])
  return InitEstimate(s_in=s_in, s_out=s_out, b_dec=b_dec.astype(np.float32),
                      w_skip=None if w_skip is None else w_skip.astype(np.float32),
                      sample=xn.astype(np.float32), targets=(yn - b_dec).astype(np.float32))


def _ridge(x, y, rel: float = 1e-4):
  """Least-squares linear map x (n, d_in) -> y (n, d_out) on centred data, lightly
  regularised so a sample smaller than d_in (or rank-deficient data) stays well posed."""
  xc, yc = x - x.mean(0), y - y.mean(0)
  gram = xc.T @ xc
  lam = rel * np.trace(gram) / gram.shape[0] + 1e-12
  return np.linalg.solve(gram + lam * np.eye(gram.shape[0]), xc.T @ yc)


def geometric_median(a, iters: int = 30, tol: float = 1e-6):
  """Weiszfeld's iteration for the point minimising the summed distances to rows of a."""
  m = a.mean(0)
  for _ in range(iters):
    dist = np.maximum(np.linalg.norm(a - m, axis=1), 1e-8)
    w = 1.0 / dist
    new = (w[:, None] * a).sum(0) / w.sum()
    if np.linalg.norm(new - m) <= tol * (np.linalg.norm(m) + 1e-12):
      return new
    m = new
  return m


def initial_thresholds(params, sample, cfg: TrainConfig, block_elems: int = 1 << 24):
  """(width,) per-latent thresholds firing on ``cfg.init_firing_rate`` of ``sample``'s
  rows, floored at 1e-3 of the pre-activations' RMS (thresholds are positive).

  Pre-activations are formed a block of latents at a time (``block_elems`` values), so a
  262k-wide dictionary needs no (rows, width) matrix.
  """
  sample = np.asarray(sample, np.float32)
  w_enc, b_enc = np.asarray(params["w_enc"]), np.asarray(params["b_enc"])
  n, width = sample.shape[0], w_enc.shape[1]
  k = min(n - 1, max(0, int(round(n * (1.0 - cfg.init_firing_rate)))))
  out = np.empty(width, np.float32)
  sq, count = 0.0, 0
  step = max(1, block_elems // max(n, 1))
  for i in range(0, width, step):
    pre = sample @ w_enc[:, i:i + step] + b_enc[i:i + step]
    out[i:i + step] = np.partition(pre, k, axis=0)[k]
    sq += float(np.sum(np.square(pre, dtype=np.float64)))
    count += pre.size
  floor = 1e-3 * max(math.sqrt(sq / max(count, 1)), 1e-12)
  return np.maximum(out, floor)


def _rows_from_data(params, init: InitEstimate, cfg: TrainConfig):
  """Decoder rows (and the SAE's tied encoder; a transcoder's encoder columns read the
  matching inputs) set to distinct sample rows, unit-normed; latents beyond the sample's
  size keep their random start."""
  m = min(cfg.width, init.targets.shape[0])
  # The sample's order is the source's; pick its rows with the run's seed.
  pick = np.random.default_rng([cfg.seed, 11]).permutation(init.targets.shape[0])[:m]

  def unit(a):
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    return np.where(norm > 1e-12, a / np.maximum(norm, 1e-12), 0.0)

  rows = unit(init.targets[pick])
  ok = np.linalg.norm(rows, axis=1) > 0  # a zero row (the median itself) stays random
  w_dec = np.asarray(params["w_dec"]).copy()
  w_dec[:m][ok] = rows[ok]
  params = dict(params, w_dec=jnp.asarray(w_dec))
  w_enc = np.asarray(params["w_enc"]).copy()
  if cfg.kind == "sae":
    w_enc[:, :m][:, ok] = rows[ok].T * cfg.encoder_scale
  else:
    cols = unit(init.sample[pick] - init.sample.mean(0))
    good = ok & (np.linalg.norm(cols, axis=1) > 0)
    w_enc[:, :m][:, good] = cols[good].T * cfg.encoder_scale
  params["w_enc"] = jnp.asarray(w_enc)
  return params


def initial_state(cfg: TrainConfig, opt, init: InitEstimate | None = None) -> dict:
  """The train state ``{"params", "opt", "step", "since_fired", "acc"}`` at step 0.

  ``init`` None gives placeholder biases and thresholds (for shapes: a resume template,
  a benchmark).
  """
  b_dec = np.zeros(cfg.d_out, np.float32) if init is None else init.b_dec
  w_skip = None if init is None else init.w_skip
  params = objective.init_params(
      jax.random.key(cfg.seed), d_in=cfg.d_in, d_out=cfg.d_out, width=cfg.width,
      kind=cfg.kind, affine=cfg.affine,
      threshold_init=1.0 if cfg.threshold_init is None else cfg.threshold_init,
      encoder_scale=cfg.encoder_scale, b_dec=b_dec, w_skip=w_skip)
  if cfg.dec_init == "data" and init is not None:
    params = _rows_from_data(params, init, cfg)
  if cfg.threshold_init is None and init is not None:
    params["log_threshold"] = jnp.log(jnp.asarray(
        initial_thresholds(params, init.sample, cfg)))
  return {
      "params": params,
      "opt": opt.init(params),
      "step": jnp.zeros((), jnp.int32),
      "since_fired": jnp.zeros((cfg.width,), jnp.int32),
      "acc": {k: jnp.zeros((), jnp.float32) for k in (*METRICS, "n")},
  }
