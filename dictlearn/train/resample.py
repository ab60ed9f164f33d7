"""Resampling rarely firing latents (Anthropic, "Towards Monosemanticity", 2023).

From a data start, gradient descent alone gets stuck: latents that landed on a direction
another latent already covers lose its rows and stop firing, and directions that no
latent started near are never picked up (benchmarks/RESULTS.md: on a known dictionary
two thirds of the latents end up silent and a third of the directions missing). So every
``resample_every`` steps until ``resample_until``, each latent that fired on fewer than
``resample_below`` times the mean firing rate over the rows since the last resampling is
restarted where the dictionary is worst:

* rows of the current batch are drawn without replacement with probability proportional
  to their squared reconstruction error (of the target, for a transcoder), weighted as
  the loss weighs it (``loss_norm_cap``); latent k of the restarted ones gets the k-th
  drawn row (if there are more restarted latents than rows, the rest wait for the next
  resampling);
* decoder row = that row's residual ``y - y_hat``, unit-normed; encoder column = the same
  direction (SAE) or the row's centred input, unit-normed (transcoder), times the mean
  encoder-column norm of the kept latents; ``b_enc`` = 0;
* threshold from the data, as at the start (:func:`dictlearn.train.init.initial_thresholds`):
  the quantile of the new latent's pre-activations over the batch at which it fires at
  the mean rate;
* Adam's moments of its encoder column, bias, threshold and decoder row are zeroed.

The firing counts restart at zero after every resampling. The draw is a function of the
run's seed and the step, so runs, resumes and sharded runs agree.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dictlearn.dictionary import matmul
from dictlearn.train import objective
from dictlearn.train.config import TrainConfig
from dictlearn.train.step import jit_state_fn

# Leaves of the params (and of Adam's moments, which mirror them) with a width axis.
_WIDTH_AXIS = {"w_enc": 1, "b_enc": 0, "log_threshold": 0, "w_dec": 0}


def due(cfg: TrainConfig, done: int) -> bool:
  """Whether the run resamples after step ``done``."""
  return (cfg.resample_every > 0 and done % cfg.resample_every == 0
          and done <= cfg.resample_until and done < cfg.steps)


def make_resample(cfg: TrainConfig):
  """``resample(state, x, y, scales, key) -> state`` for a resolved config; ``x``, ``y``,
  ``scales`` as for the step (raw batch), ``key`` a PRNG key for the row draw."""
  compute_dtype = jnp.dtype(cfg.compute_dtype)
  window_rows = cfg.resample_every * cfg.batch_size
  n_pick = min(cfg.batch_size, cfg.width)

  def resample(state, x, y, scales, key):
    params = state["params"]
    xn, yn = x * scales[0], y * scales[1]
    w_enc, b_enc, w_dec = params["w_enc"], params["b_enc"], params["w_dec"]
    theta = jnp.exp(params["log_threshold"])
    xc = xn - state["center"]  # what the encoder reads
    pre = matmul(xc, w_enc, compute_dtype) + b_enc
    f = jnp.where(pre > theta, pre, 0.0)
    y_hat = params["b_dec"] + matmul(f, w_dec, compute_dtype)
    if "w_skip" in params:
      y_hat = y_hat + matmul(xn, params["w_skip"], compute_dtype)
    resid = yn - y_hat
    err = jnp.sum(jnp.square(resid), axis=-1)
    if cfg.loss_norm_cap is not None:
      err = err * objective.row_weights(yn, cfg.loss_norm_cap)

    counts = state["fired_rows"]
    if cfg.target_l0 is not None:
      rate = cfg.target_l0 / cfg.width
    else:
      rate = jnp.sum(counts) / (window_rows * cfg.width)
    rare = counts < cfg.resample_below * rate * window_rows

    # Rows drawn without replacement, probability proportional to err (Gumbel top-k):
    # the candidates, of which the k-th restarted latent takes the k-th.
    score = jnp.log(jnp.maximum(err, 1e-30)) + jax.random.gumbel(key, err.shape)
    order = jax.lax.top_k(score, n_pick)[1]

    def unit(a):
      return a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)

    cand_dec = unit(resid[order])  # (n_pick, d_out)
    if cfg.kind == "sae":
      cand_enc = cand_dec
    else:
      cand_enc = unit(xn[order] - jnp.mean(xn, axis=0))
    rank = jnp.cumsum(rare.astype(jnp.int32)) - 1
    take = rare & (rank < n_pick)
    enc_norm = jnp.linalg.norm(w_enc, axis=0)
    kept = (~take).astype(enc_norm.dtype)
    scale = jnp.sum(enc_norm * kept) / jnp.maximum(jnp.sum(kept), 1.0)
    scale = jnp.where(jnp.sum(kept) > 0, scale, cfg.encoder_scale)
    cand_enc = cand_enc.T * scale  # (d_in, n_pick)

    # Thresholds: each candidate fires on a fraction `rate` of the batch (at least one
    # row), as the start's thresholds do on the init sample; b_enc restarts at 0.
    cand_pre = matmul(xc, cand_enc, compute_dtype)  # (B, n_pick)
    b = cfg.batch_size
    if cfg.target_l0 is not None:
      k = int(min(b - 1, max(1, round(b * cfg.target_l0 / cfg.width))))
      kth = jax.lax.top_k(cand_pre.T, k + 1)[0][:, k]
    else:  # the observed rate: a traced k, so sort
      k_dyn = jnp.clip(jnp.round(b * rate).astype(jnp.int32), 1, b - 1)
      kth = jnp.sort(cand_pre, axis=0)[::-1][k_dyn]
    floor = 1e-3 * jnp.sqrt(jnp.mean(jnp.square(cand_pre)) + 1e-30)
    cand_log_theta = jnp.log(jnp.maximum(kth, floor))

    pick = jnp.clip(rank, 0, n_pick - 1)  # (width,) each latent's candidate
    new_dec = cand_dec[pick]
    new_enc = cand_enc[:, pick]
    new_log_theta = cand_log_theta[pick]

    def put(name, old, new):
      axis = _WIDTH_AXIS[name]
      mask = take if old.ndim == 1 else (take[None, :] if axis == 1 else take[:, None])
      return jnp.where(mask, new, old)

    params = dict(params)
    params["w_dec"] = put("w_dec", w_dec, new_dec)
    params["w_enc"] = put("w_enc", w_enc, new_enc)
    params["b_enc"] = put("b_enc", b_enc, jnp.zeros_like(b_enc))
    params["log_threshold"] = put("log_threshold", params["log_threshold"], new_log_theta)

    def reset(path, leaf):
      for entry in reversed(path):
        name = getattr(entry, "key", None)
        if name in _WIDTH_AXIS and leaf.ndim == (2 if name in ("w_enc", "w_dec") else 1):
          return put(name, leaf, jnp.zeros_like(leaf))
      return leaf

    opt_state = jax.tree_util.tree_map_with_path(reset, state["opt"])
    return dict(state, params=params, opt=opt_state,
                since_fired=jnp.where(take, 0, state["since_fired"]),
                fired_rows=jnp.zeros_like(counts))

  return resample


def compiled_resample(cfg: TrainConfig, mesh=None, data_axis: str = "data",
                      width_axis: str | None = None):
  """``make_resample(cfg)`` jitted (state donated), over ``mesh`` when given."""
  return _compiled(cfg.step_key(), mesh, data_axis, width_axis)


@functools.lru_cache(maxsize=8)
def _compiled(cfg: TrainConfig, mesh, data_axis, width_axis):
  return jit_state_fn(make_resample(cfg), cfg, mesh, data_axis, width_axis, n_replicated=2)


def key_at(cfg: TrainConfig, done: int):
  """The PRNG key of the resampling after step ``done``."""
  return jax.random.fold_in(jax.random.key(cfg.seed), done)
