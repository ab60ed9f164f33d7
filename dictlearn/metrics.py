"""Reconstruction and language-modelling metrics, each with a token mask.

Every metric takes ``mask`` (same leading shape as the tokens, True = count this token;
``interventions.active_positions`` gives the usual one) so that BOS and padding can be
left out: Gemma Scope 2 dictionaries are not trained on
BOS, whose activations are huge outliers that would dominate every average.

Shapes: ``x``, ``x_hat`` (..., d); ``f`` (..., width); ``mask`` (...) bool or None;
``logits`` (..., seq, vocab); ``tokens`` (..., seq) int.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _mask(mask, shape) -> Array:
  if mask is None:
    return jnp.ones(shape, jnp.float32)
  mask = jnp.asarray(mask)
  if mask.shape != tuple(shape):
    raise ValueError(f"mask has shape {mask.shape} but the tokens have shape {tuple(shape)}")
  return mask.astype(jnp.float32)


def _masked_mean(v: Array, m: Array) -> Array:
  return jnp.sum(v * m) / jnp.maximum(jnp.sum(m), 1.0)


def mse(x: Array, x_hat: Array, mask=None) -> Array:
  """Mean over kept tokens of the mean squared error over features."""
  err = jnp.mean(jnp.square(x.astype(jnp.float32) - x_hat.astype(jnp.float32)), axis=-1)
  return _masked_mean(err, _mask(mask, err.shape))


def fvu(x: Array, x_hat: Array, mask=None) -> Array:
  """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2.

  The mean is over the kept tokens, per feature; 0 is perfect, 1 is no better than
  predicting the mean.
  """
  x = x.astype(jnp.float32)
  m = _mask(mask, x.shape[:-1])
  mean = jnp.sum(x * m[..., None], axis=tuple(range(x.ndim - 1))) / jnp.maximum(m.sum(), 1.0)
  resid = jnp.sum(jnp.square(x - x_hat.astype(jnp.float32)), axis=-1)
  total = jnp.sum(jnp.square(x - mean), axis=-1)
  return jnp.sum(resid * m) / jnp.maximum(jnp.sum(total * m), jnp.finfo(jnp.float32).tiny)


def l0(f: Array, mask=None) -> Array:
  """Mean number of nonzero latents per kept token."""
  count = jnp.sum(f != 0, axis=-1).astype(jnp.float32)
  return _masked_mean(count, _mask(mask, count.shape))


def cross_entropy(logits: Array, tokens: Array) -> Array:
  """Per-token next-token loss: (..., seq, vocab), (..., seq) -> (..., seq - 1).

  Entry ``t`` is ``-log p(tokens[t + 1] | tokens[:t + 1])``, float32.
  """
  if logits.shape[:-1] != tokens.shape:
    raise ValueError(
        f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} disagree: "
        "expected logits of shape tokens.shape + (vocab,)")
  logp = jax.nn.log_softmax(logits[..., :-1, :].astype(jnp.float32), axis=-1)
  target = tokens[..., 1:]
  return -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]


def mean_loss(logits: Array, tokens: Array, mask=None) -> Array:
  """Mean next-token loss over the positions whose *target* token is kept by ``mask``."""
  ce = cross_entropy(logits, tokens)
  m = None if mask is None else jnp.asarray(mask)[..., 1:]
  return _masked_mean(ce, _mask(m, ce.shape))


def delta_loss(clean_logits: Array, patched_logits: Array, tokens: Array, mask=None) -> Array:
  """How much splicing costs: mean loss with the patch minus mean loss without it."""
  return mean_loss(patched_logits, tokens, mask) - mean_loss(clean_logits, tokens, mask)
