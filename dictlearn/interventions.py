"""Interventions at a site as plain array functions: splice, steer, edit latents.

Every adapter calls these; they know no framework. Each takes the value at a site
``x (..., seq, d)`` and a boolean ``mask (..., seq)`` of the positions to change (None:
all), and returns the site's new value in the dtype of the value it replaces. Positions
outside the mask come back bit for bit.

Which positions count is one rule, ``active_positions``: position 0 is BOS, negative
positions are padding. Gemma Scope dictionaries were not trained on BOS, whose
activations are huge outliers, so interventions leave it alone by default.

Dictionaries run on the fused ``encode_decode`` path (no (tokens x width) latent matrix;
equal to the dense ``forward`` within float32 rounding), so bf16 and very wide
dictionaries stay cheap; ``fused=False`` takes the dense, differentiable path.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn.dictionary import Dictionary, check_input, forward, jumprelu, matmul
from dictlearn.sparse import encode_decode

Array = jax.Array


def positions_from_padding(tokens: Array, pad_id: int | None = 0) -> Array:
  """Positions (..., seq) int32: 0, 1, ... over non-pad tokens, -1 at pads.

  A left- or right-padded row gets the positions it has alone, so its BOS is at 0.
  """
  tokens = jnp.asarray(tokens)
  if pad_id is None:
    return jnp.broadcast_to(jnp.arange(tokens.shape[-1], dtype=jnp.int32), tokens.shape)
  nonpad = tokens != pad_id
  return jnp.where(nonpad, jnp.cumsum(nonpad, axis=-1, dtype=jnp.int32) - 1, -1)


def active_positions(positions: Array, skip_bos: bool = True) -> Array:
  """The mask (..., seq) bool of positions an intervention changes.

  ``positions`` (..., seq) int: 0 is BOS, negative is padding (never changed).
  """
  positions = jnp.asarray(positions)
  return positions > 0 if skip_bos else positions >= 0


def _where(mask, new: Array, old: Array) -> Array:
  """``new`` where mask (..., seq), ``old`` elsewhere, in old's dtype."""
  new = new.astype(old.dtype)
  if mask is None:
    return new
  mask = jnp.asarray(mask, bool)
  if mask.shape != old.shape[:-1]:
    try:
      mask = jnp.broadcast_to(mask, old.shape[:-1])
    except ValueError:
      raise ValueError(f"mask has shape {mask.shape} but the value has positions of shape "
                       f"{old.shape[:-1]} (expected the value's shape without its last "
                       "axis)") from None
  return jnp.where(mask[..., None], new, old)


def _output(d: Dictionary, x_in: Array, fused: bool, k: int, compute_dtype) -> Array:
  if fused:
    return encode_decode(d, x_in, k=k, compute_dtype=compute_dtype)[0]
  return forward(d, x_in, compute_dtype=compute_dtype)


def _target(d: Dictionary, x_in: Array, target: Array | None, what: str) -> Array:
  if target is None:
    if d.d_out != d.d_in:
      raise ValueError(
          f"this {type(d).__name__} writes d_out={d.d_out} features, not its input's "
          f"{d.d_in}: pass target=, the value at the site it writes ({what})")
    return x_in
  if target.shape[:-1] != x_in.shape[:-1] or target.shape[-1] != d.d_out:
    raise ValueError(f"target has shape {tuple(target.shape)}; expected "
                     f"{tuple(x_in.shape[:-1]) + (d.d_out,)} (x_in's positions, d_out)")
  return target


def splice(d: Dictionary, x_in: Array, target: Array | None = None, mask=None, *,
           fused: bool = True, k: int = 256, compute_dtype=jnp.float32) -> Array:
  """The new value of the write site: d's output where mask, ``target`` elsewhere.

  Args:
    d: an SAE (replaces its site with the reconstruction) or a transcoder (replaces its
      output site with its prediction from ``x_in``).
    x_in: (..., seq, d_in) the value at the site d reads.
    target: (..., seq, d_out) the value at the site d writes (default ``x_in``).
    mask: (..., seq) bool positions to change (``active_positions``); None: all.
    fused: the fused ``encode_decode`` (default) or the dense ``forward``.
    k: code slots per row of the fused path (rows above it are still exact).
    compute_dtype: matmul operand dtype (float32 accumulation).
  """
  check_input(d, x_in, "x_in", bf16_ok=fused)
  target = _target(d, x_in, target, "splice")
  return _where(mask, _output(d, x_in, fused, k, compute_dtype), target)


def steer(x: Array, direction: Array, coeff, mask=None, scale: str = "norm") -> Array:
  """Adds a direction where mask: ``x + coeff * ||x|| * direction`` per position.

  ``scale="norm"`` scales by each position's own norm ``||x||`` (the Gemma Scope tutorial's
  steering; with a unit direction, coeff is the fraction of the activation's size);
  ``scale="none"`` adds ``coeff * direction``. x (..., seq, d), direction (d,), coeff a
  scalar (traced is fine). Computed in float32, returned in x's dtype.
  """
  if scale not in ("norm", "none"):
    raise ValueError(f"scale must be 'norm' or 'none', not {scale!r}")
  direction = jnp.asarray(direction)
  if direction.shape != (x.shape[-1],):
    raise ValueError(f"direction has shape {tuple(direction.shape)}; expected "
                     f"({x.shape[-1]},), the site's feature size")
  xf = x.astype(jnp.float32)
  add = jnp.asarray(coeff, jnp.float32) * direction.astype(jnp.float32)
  if scale == "norm":
    add = jnp.linalg.norm(xf, axis=-1, keepdims=True) * add
  return _where(mask, xf + add, x)


def _edits(d: Dictionary, ablate, clamp) -> tuple[np.ndarray, Array]:
  """(latent indices (m,), new values (m,) f32) from ``ablate`` and ``clamp``."""
  ablate = np.atleast_1d(np.asarray(ablate, np.int64)).reshape(-1)
  clamp = dict(clamp or {})
  both = set(ablate.tolist()) & set(int(i) for i in clamp)
  if both:
    raise ValueError(f"latents {sorted(both)} are both ablated and clamped; pick one")
  idx = np.concatenate([np.unique(ablate), np.asarray(list(clamp), np.int64).reshape(-1)])
  if len(np.unique(idx)) != len(idx):
    raise ValueError("clamp names a latent more than once")
  if idx.size and (idx.min() < 0 or idx.max() >= d.width):
    raise ValueError(f"latent indices must be in 0..{d.width - 1}, got "
                     f"{int(idx.min())}..{int(idx.max())}")
  values = [jnp.zeros(len(np.unique(ablate)), jnp.float32)]
  if clamp:
    values.append(jnp.stack([jnp.asarray(v, jnp.float32).reshape(()) for v in clamp.values()]))
  return idx.astype(np.int32), jnp.concatenate(values)


def edit_latents(d: Dictionary, x_in: Array, target: Array | None = None, *,
                 ablate: Sequence[int] = (), clamp: Mapping[int, float] | None = None,
                 mask=None, keep_error: bool = True, fused: bool = True, k: int = 256,
                 compute_dtype=jnp.float32) -> Array:
  """Sets chosen latents to 0 (``ablate``) or to given values (``clamp``) where mask.

  With ``keep_error`` (default) the write site becomes ``target + decode(f') - decode(f)``,
  f the latents of ``x_in`` and f' the edited ones: only the edited latents' contribution
  changes and whatever d fails to reconstruct stays in (the skip term cancels). Without
  it, the site becomes ``decode(f')``, d's edited output. The change is computed from the
  edited latents' own encoder columns and decoder rows, ``(f'_i - f_i) w_dec[i]`` summed,
  so no (tokens x width) matrix is built.

  Args:
    d: an SAE or transcoder.
    x_in: (..., seq, d_in) the value at the site d reads.
    target: (..., seq, d_out) the value at the site d writes (default ``x_in``).
    ablate: latent indices to set to 0.
    clamp: ``{latent: value}`` to set (values may be traced).
    mask: (..., seq) bool positions to change; None: all.
    keep_error: keep the reconstruction error (see above).
    fused, k, compute_dtype: as in ``splice`` (used only without keep_error).
  """
  check_input(d, x_in, "x_in", bf16_ok=True)
  target = _target(d, x_in, target, "edit_latents")
  idx, new = _edits(d, ablate, clamp)
  if idx.size == 0 and keep_error:
    return target
  pre = matmul(x_in, d.w_enc[:, idx], compute_dtype) + d.b_enc[idx].astype(jnp.float32)
  f = jumprelu(pre, d.threshold[idx])                           # (..., seq, m)
  delta = matmul(new - f, d.w_dec[idx], compute_dtype)          # (..., seq, d_out)
  base = target.astype(jnp.float32) if keep_error else _output(d, x_in, fused, k,
                                                               compute_dtype)
  return _where(mask, base + delta, target)
