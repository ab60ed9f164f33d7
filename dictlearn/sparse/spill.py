"""The spill pass: rows the buffer could not hold, redone exactly by a blocked dense pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dictlearn import cpu_kernels
from dictlearn.dictionary import Dictionary, matmul
from dictlearn.sparse.blocks import active, block_reader
from dictlearn.sparse.plan import Plan

Array = jax.Array


def _dense_rows(d: Dictionary, x: Array, plan: Plan, compute_dtype, with_y: bool):
  """Exact blocked dense pass for a few rows: (y_partial (R, d_out) | None, v, i).

  y_partial excludes b_dec and the skip term. Codes are the row's k largest activations
  (merged block by block with top_k), padded with value 0 / index 0 past the count.
  """
  r = x.shape[0]
  k, width, bw = plan.k, d.width, plan.spill_block_width
  nb = -(-width // bw)
  get = block_reader(d, x, plan, compute_dtype, spill=True)
  kb = min(k, bw)
  widen = plan.widen_dec
  dec3 = d.w_dec.reshape(nb, bw, -1) if width % bw == 0 and not widen else None

  def dec_block(j, start):
    if widen:
      return cpu_kernels.widen_rows(d.w_dec, start, bw)
    if dec3 is not None:
      return lax.dynamic_index_in_dim(dec3, j, 0, keepdims=False)
    return lax.dynamic_slice_in_dim(d.w_dec, start, bw, 0)

  def body(carry, j):
    y, buf_v, buf_i = carry
    pre, t, start, valid_from = get(j)
    act = active(pre, t, start, valid_from)
    if with_y:
      f = jnp.where(act, pre, 0.0)
      y = y + matmul(f, dec_block(j, start), compute_dtype)
    v, i = lax.top_k(jnp.where(act, pre, -jnp.inf), kb)
    allv = jnp.concatenate([buf_v, v], axis=1)
    alli = jnp.concatenate([buf_i, i.astype(jnp.int32) + start], axis=1)
    buf_v, sel = lax.top_k(allv, k)
    buf_i = jnp.take_along_axis(alli, sel, axis=1)
    return (y, buf_v, buf_i), None

  init = (jnp.zeros((r, d.d_out), jnp.float32), jnp.full((r, k), -jnp.inf, jnp.float32),
          jnp.zeros((r, k), jnp.int32))
  (y, v, i), _ = lax.scan(body, init, jnp.arange(nb))
  keep = v > -jnp.inf
  return (y if with_y else None), jnp.where(keep, v, 0.0), jnp.where(keep, i, 0)


def spill(d: Dictionary, x: Array, need: Array, y: Array | None, v: Array, i: Array,
           plan: Plan, compute_dtype):
  """Redoes the rows flagged in ``need`` exactly, plan.spill_rows at a time.

  The trip count is ceil(sum(need) / spill_rows): zero when nothing overflowed. Flagged
  row numbers are packed to the front with a stable argsort; each step gathers the next
  group, runs ``_dense_rows`` and writes back (rows past the last flagged one map to index
  n and are dropped).
  """
  n = x.shape[0]
  r = plan.spill_rows
  num = need.sum(dtype=jnp.int32)
  order = jnp.argsort(jnp.logical_not(need), stable=True).astype(jnp.int32)
  groups = -(-n // r)
  order = jnp.pad(order, (0, groups * r - n), constant_values=n)
  with_y = y is not None

  def body(g, carry):
    y, v, i = carry
    pos = g * r + lax.iota(jnp.int32, r)
    rows = jnp.where(pos < num, lax.dynamic_slice_in_dim(order, g * r, r), n)
    xr = jnp.take(x, rows, axis=0, mode="clip")
    # Tie the rows to the step: with one token the gather folds away, the dense pass looks
    # loop-invariant, and XLA would hoist it out of the loop and run it even at 0 steps.
    xr, _ = lax.optimization_barrier((xr, g))
    yr, vr, ir = _dense_rows(d, xr, plan, compute_dtype, with_y)
    v = v.at[rows].set(vr, mode="drop")
    i = i.at[rows].set(ir, mode="drop")
    if with_y:
      y = y.at[rows].set(yr, mode="drop")
    return y, v, i

  steps = (num + r - 1) // r
  # The cond keeps the loop (and anything XLA hoists out of it, such as XLA:CPU's upcast of
  # bf16 weights) off the common path where no row needs it.
  return lax.cond(num > 0, lambda c: lax.fori_loop(0, steps, body, c), lambda c: c,
                  (y, v, i))
