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

# k-means-like refinement rounds of the data start, and the host work they may take (each
# round is a (init_samples, d) x (d, width) product in numpy): wide dictionaries on wide
# sites get fewer rounds, down to none (plain data rows).
ROUNDS = 8
ROUND_FLOPS = 4e11
# Per-step metrics a history row averages over its window, and the sums its FVU divides.
METRICS = ("loss", "mse", "l0", "penalty")
SUMS = ("sse", "var")


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
    x_center: (d_in,) geometric median of ``sample`` with ``TrainConfig.encoder_center``,
      else None.
  """

  s_in: float
  s_out: float
  b_dec: np.ndarray
  w_skip: np.ndarray | None
  sample: np.ndarray
  targets: np.ndarray
  x_center: np.ndarray | None = None


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
  x_center = None
  if cfg.encoder_center:
    same = cfg.kind == "sae" and cfg.b_dec_init == "median"  # b_dec is this median
    x_center = (b_dec if same else geometric_median(xn)).astype(np.float32)
  return InitEstimate(s_in=s_in, s_out=s_out, b_dec=b_dec.astype(np.float32),
                      w_skip=None if w_skip is None else w_skip.astype(np.float32),
                      sample=xn.astype(np.float32), targets=(yn - b_dec).astype(np.float32),
                      x_center=x_center)


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


def _rows_from_data(params, init: InitEstimate, cfg: TrainConfig,
                    block_elems: int = 1 << 24):
  """Decoder rows (and encoder columns) from the init sample.

  Each latent starts at a distinct sample row, then up to ``ROUNDS`` times (as many as
  ``ROUND_FLOPS`` of host work allow) moves to the mean of
  the rows it reads most strongly (its top ``m`` of the sample, m the number of rows a
  latent fires on at the target L0, at least 8): rows that share a latent's strongest
  direction reinforce it and the rest average out, like a few k-means steps. An SAE's
  encoder is the decoder transposed; a transcoder's encoder columns are the mean centred
  inputs of the same rows. Latents beyond the sample's size keep their random start.

  The rounds are spherical: rows are unit-normed first, so a row counts by its direction
  alone. With raw rows a row of norm r weighs r^2 (once through its read, once through
  its value), and the rare massive-activation tokens of a Gemma residual (norm ~10x the
  median at 0.02% of tokens) pulled most latents onto their one direction, from which
  training did not recover (benchmarks/RESULTS.md).
  """
  n = init.sample.shape[0]
  m_lat = min(cfg.width, n)
  rounds = int(min(ROUNDS, ROUND_FLOPS // max(2.0 * n * m_lat * init.sample.shape[1], 1.0)))
  pick = np.random.default_rng([cfg.seed, 11]).permutation(n)[:m_lat]

  def unit(a, axis):
    norm = np.linalg.norm(a, axis=axis, keepdims=True)
    return a / np.maximum(norm, 1e-12), np.squeeze(norm, axis) > 1e-12

  xs = unit(init.sample, 1)[0]
  ys, nonzero = unit(init.targets, 1)
  xc = unit(init.sample - init.sample.mean(0), 1)[0] if cfg.kind == "transcoder" else ys
  dec, ok = ys[pick], nonzero[pick]
  enc = xc[pick].T
  rate = (cfg.target_l0 if cfg.target_l0 is not None else cfg.init_firing_rate * cfg.width)
  top = int(min(n - 1, max(8, round(n * rate / cfg.width))))
  step = max(1, block_elems // max(n, 1))
  for _ in range(rounds):
    new_dec, new_enc = np.empty_like(dec), np.empty_like(enc)
    for i in range(0, m_lat, step):
      pre = xs @ enc[:, i:i + step] if cfg.kind == "transcoder" else ys @ enc[:, i:i + step]
      idx = np.argpartition(-pre, top, axis=0)[:top]  # (top, block) rows read most
      w = np.maximum(np.take_along_axis(pre, idx, 0), 0.0)[..., None]
      new_dec[i:i + step] = (w * ys[idx]).sum(0)
      new_enc[:, i:i + step] = ((w * xc[idx]).sum(0)).T
    dec, ok2 = unit(new_dec, 1)
    enc = unit(new_enc, 0)[0] if cfg.kind == "transcoder" else dec.T
    ok = ok & ok2
  w_dec = np.asarray(params["w_dec"]).copy()
  w_enc = np.asarray(params["w_enc"]).copy()
  w_dec[:m_lat][ok] = dec[ok]
  w_enc[:, :m_lat][:, ok] = enc[:, ok] * cfg.encoder_scale
  return dict(params, w_dec=jnp.asarray(w_dec), w_enc=jnp.asarray(w_enc))


def initial_state(cfg: TrainConfig, opt, init: InitEstimate | None = None) -> dict:
  """The train state ``{"params", "opt", "step", "since_fired", "fired_rows", "acc",
  "center"}`` at step 0 (``fired_rows``: rows each latent fired on since the last
  resampling; ``center``: what the encoder subtracts from its input, zeros unless
  ``encoder_center``).

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
  center = np.zeros(cfg.d_in, np.float32)
  if init is not None and init.x_center is not None:
    center = init.x_center
  if cfg.threshold_init is None and init is not None:
    params["log_threshold"] = jnp.log(jnp.asarray(
        initial_thresholds(params, init.sample - center, cfg)))
  return {
      "params": params,
      "opt": opt.init(params),
      "step": jnp.zeros((), jnp.int32),
      "since_fired": jnp.zeros((cfg.width,), jnp.int32),
      "fired_rows": jnp.zeros((cfg.width,), jnp.int32),
      "acc": {k: jnp.zeros((), jnp.float32) for k in (*METRICS, *SUMS, "n")},
      "center": jnp.asarray(center),
  }
