"""The training objective: parameters, the JumpReLU loss with an L0 penalty, Matryoshka
prefixes, and folding the trained parameters back into a dictionary on raw activations.

Training parameters (a dict pytree, in *normalised* units, see below)::

    w_enc (d_in, width)   b_enc (width,)   log_threshold (width,)
    w_dec (width, d_out)  b_dec (d_out,)   w_skip (d_in, d_out)   (affine transcoders)

Thresholds are trained as logarithms, as in the JumpReLU paper, so they stay positive and
Adam's roughly constant step size becomes a constant *relative* change.

Normalisation (Gemma Scope): inputs are multiplied by ``s_in = sqrt(d_in / E||x||^2)`` and
targets by ``s_out = sqrt(d_out / E||y||^2)`` (an SAE's target is its input, s_out = s_in),
both estimated once from a data sample, so every coordinate is O(1) whatever the site and
the hyperparameters (threshold init, bandwidth, sparsity coefficient) transfer between
sites and models. :func:`to_dictionary` folds the scales into the weights (see there).

Loss, per batch (rows of the batch averaged)::

    recon   = sum over prefixes m of ||y - y_hat_m||^2   (one prefix, the full width, unless
              Matryoshka widths are given; y_hat_m uses latents [0, m) only)
    penalty = coeff * L0                       (sparsity_coeff given, no target)
            | coeff * (L0 / target_l0 - 1)^2   (target_l0 given)
    loss    = recon + penalty

where ``L0 = sum_i H(pre_i - theta_i)`` with the pseudo-derivative of :mod:`.ste`. The
quadratic target form (the "target L0" variant of SAEBench / dictionary_learning's JumpReLU
trainer) penalises being *below* the target too, which pulls L0 onto the target instead of
asking the user to search for the coefficient that lands there. It is a proportional
controller, so L0 settles a little off the target; with the default coefficient
(d_out / 4, see :class:`~dictlearn.train.config.TrainConfig`) the offset is small
(benchmarks/RESULTS.md). We chose it over an
adaptive (integral) coefficient because it keeps the loss a fixed function of the
parameters, which makes runs, resumes and sharded runs easy to compare exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn.dictionary import DictMeta, JumpReLUSAE, Transcoder, matmul
from dictlearn.train import ste

Params = dict


def init_params(key, *, d_in: int, d_out: int, width: int, kind: str, affine: bool,
                threshold_init: float, encoder_scale: float, b_dec, w_skip=None) -> Params:
  """Initial parameters (normalised units).

  Decoder rows: random unit vectors. Encoder: the decoder transposed for an SAE (each latent
  starts reading the direction it writes, the JumpReLU paper's choice); independent random
  unit columns for a transcoder, whose input and output spaces differ. Both times
  ``encoder_scale``. ``b_dec`` (d_out,) is the data's mean or geometric median; ``w_skip``
  (d_in, d_out) the least-squares or zero start of an affine transcoder.
  """
  k_dec, k_enc = jax.random.split(key)
  w_dec = jax.random.normal(k_dec, (width, d_out), jnp.float32)
  w_dec = w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)
  if kind == "sae":
    w_enc = w_dec.T
  else:
    w_enc = jax.random.normal(k_enc, (d_in, width), jnp.float32)
    w_enc = w_enc / jnp.linalg.norm(w_enc, axis=0, keepdims=True)
  params = {
      "w_enc": w_enc * encoder_scale,
      "b_enc": jnp.zeros((width,), jnp.float32),
      "log_threshold": jnp.full((width,), np.log(threshold_init), jnp.float32),
      "w_dec": w_dec,
      "b_dec": jnp.asarray(b_dec, jnp.float32),
  }
  if kind == "transcoder" and affine:
    params["w_skip"] = (jnp.zeros((d_in, d_out), jnp.float32) if w_skip is None
                        else jnp.asarray(w_skip, jnp.float32))
  return params


def unit_rows(w):
  """Rows of w (width, d) scaled to unit norm (a zero row stays zero)."""
  norm = jnp.linalg.norm(w, axis=-1, keepdims=True)
  return w / jnp.maximum(norm, 1e-12)


def prefix_bounds(width: int, matryoshka) -> tuple[int, ...]:
  """Validated, increasing prefix widths ending at ``width``: e.g. (128, 512, 2048)."""
  if not matryoshka:
    return (width,)
  widths = sorted({int(m) for m in matryoshka})
  if widths[0] <= 0 or widths[-1] > width:
    raise ValueError(f"matryoshka widths must lie in [1, width={width}] but are {matryoshka}")
  if widths[-1] != width:
    widths.append(width)
  return tuple(widths)


def row_weights(y, norm_cap: float | None):
  """(B,) reconstruction-loss weights of normalised targets y (B, d_out): 1, except that a
  row with ||y|| above ``norm_cap * sqrt(d_out)`` (the data's RMS norm) weighs
  ``(norm_cap * sqrt(d_out) / ||y||)^2``, so its squared error counts as a row of that
  norm's would. ``norm_cap`` None: None (every row counts in full)."""
  if norm_cap is None:
    return None
  cap2 = norm_cap * norm_cap * y.shape[-1]
  return jnp.minimum(1.0, cap2 / jnp.maximum(jnp.sum(jnp.square(y), axis=-1), 1e-30))


def loss_fn(params: Params, x, y, *, coeff, target_l0: float | None, eps: float,
            bounds: tuple[int, ...], compute_dtype=jnp.float32, weights=None, center=0.0):
  """Scalar loss and metrics for a normalised batch x (B, d_in), y (B, d_out).

  ``weights`` (B,): each row's weight in the reconstruction loss (``row_weights``; None:
  ones). The metrics are unweighted. ``center`` (d_in,): what the encoder subtracts from x
  (``TrainConfig.encoder_center``; the skip reads x itself).

  Returns (loss, aux) with aux: ``sse`` (mean over rows of ||y - y_hat||^2, full width),
  ``var`` (sum over rows of ||y - mean(y)||^2, for FVU), ``l0`` (mean active latents),
  ``fired`` (width,) int32: on how many rows of the batch each latent fired.
  """
  pre = matmul(x - center, params["w_enc"], compute_dtype) + params["b_enc"]
  theta = jnp.broadcast_to(jnp.exp(params["log_threshold"]), pre.shape)
  f = ste.jumprelu(pre, theta, eps)
  gate = ste.heaviside(pre, theta, eps)

  y_hat = jnp.broadcast_to(params["b_dec"], y.shape)
  if "w_skip" in params:
    y_hat = y_hat + matmul(x, params["w_skip"], compute_dtype)
  recon = 0.0
  start = 0
  # Prefix reconstructions share work: each adds its chunk of latents to the previous one.
  for end in bounds:
    y_hat = y_hat + matmul(f[:, start:end], params["w_dec"][start:end], compute_dtype)
    row_sse = jnp.sum(jnp.square(y_hat - y), axis=-1)
    sse = jnp.mean(row_sse)
    recon = recon + (sse if weights is None else jnp.mean(weights * row_sse))
    start = end

  l0_soft = jnp.mean(jnp.sum(gate, axis=-1))
  if target_l0 is None:
    penalty = coeff * l0_soft
  else:
    penalty = coeff * jnp.square(l0_soft / target_l0 - 1.0)
  aux = {
      "sse": sse,
      "var": jnp.sum(jnp.square(y - jnp.mean(y, axis=0))),
      "l0": jnp.mean(jnp.sum(f != 0, axis=-1).astype(jnp.float32)),
      "fired": jnp.sum(f != 0, axis=0, dtype=jnp.int32),
      "penalty": penalty,
  }
  return recon + penalty, aux


def to_dictionary(params: Params, *, s_in: float, s_out: float, kind: str,
                  meta: DictMeta, center=None) -> JumpReLUSAE | Transcoder:
  """The trained dictionary on raw activations, with the normalisation folded in.

  ``center`` (d_in,), the encoder's input center in normalised units, is folded into the
  bias first: ``(x - c) @ w_enc + b_enc = x @ w_enc + (b_enc - c @ w_enc)``.

  Training computes ``y' = dec(enc(s_in x))`` with ``y' ~ s_out y``. Dividing the latents
  by ``s_out`` (a positive scale commutes with JumpReLU once the threshold is scaled too)
  gives the raw dictionary

      w_enc * s_in/s_out,  b_enc / s_out,  threshold / s_out,
      w_dec (unchanged, unit rows),  b_dec / s_out,  w_skip * s_in/s_out,

  so decoder rows stay unit directions and latent values are in the site's own units.
  """
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params)
  if center is not None:
    p["b_enc"] = p["b_enc"] - np.asarray(center, np.float32) @ p["w_enc"]
  c = np.float32(1.0 / s_out)
  r = np.float32(s_in / s_out)
  common = dict(w_enc=p["w_enc"] * r, b_enc=p["b_enc"] * c,
                threshold=np.exp(p["log_threshold"]) * c, w_dec=p["w_dec"],
                b_dec=p["b_dec"] * c)
  common = {k: jnp.asarray(v) for k, v in common.items()}
  if kind == "sae":
    return JumpReLUSAE(**common, meta=meta)
  w_skip = jnp.asarray(p["w_skip"] * r) if "w_skip" in p else None
  return Transcoder(**common, w_skip=w_skip, meta=meta)
