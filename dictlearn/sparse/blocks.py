"""Reading blocks of w_enc (the plan's ``weights`` mode) and their active masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dictlearn import cpu_kernels
from dictlearn.dictionary import Dictionary, matmul
from dictlearn.sparse.plan import Plan

Array = jax.Array


def block_reader(d: Dictionary, x: Array, plan: Plan, compute_dtype, spill: bool = False):
  """Returns get(j) -> (pre (n, B) f32, t (B,), start, valid_from) for block j.

  pre = x @ w_enc[:, block] + b_enc[block], B the plan's block width (the spill's when
  ``spill``). How the block of w_enc is read (``plan.weights``, ``plan.spill_weights``):
  - "slice": when B divides the width, w_enc is viewed as (d_in, nb, B) and indexed, a
    free reshape from which XLA slices each block; otherwise the last block is clamped to
    end at the width and ``valid_from`` masks the columns that the previous block already
    covered (valid_from is None when blocks do not overlap).
  - "in_place": ``cpu_kernels.matmul_bf16`` reads the bf16 block in place.
  - "copy": ``cpu_kernels.widen_columns`` makes a float32 copy of the block for XLA's dot.
  Either CPU kernel way, XLA never converts the whole array.
  """
  w_enc, b_enc, threshold = d.w_enc, d.b_enc, d.threshold
  d_in, width = w_enc.shape
  bw = plan.spill_block_width if spill else plan.block_width
  mode = plan.spill_weights if spill else plan.weights
  nb = -(-width // bw)
  if mode != "slice" or width % bw:
    # matmul_bf16 takes float32 x: rounded to compute_dtype first, as matmul does.
    xr = x.astype(compute_dtype).astype(jnp.float32) if mode == "in_place" else None

    def get(j):
      start = jnp.minimum(j * bw, width - bw)
      if mode == "in_place":
        pre = cpu_kernels.matmul_bf16(xr, w_enc, start, bw)
      else:
        w = (cpu_kernels.widen_columns(w_enc, start, bw) if mode == "copy"
             else lax.dynamic_slice_in_dim(w_enc, start, bw, 1))
        pre = matmul(x, w, compute_dtype)
      pre = pre + lax.dynamic_slice_in_dim(b_enc, start, bw, 0).astype(jnp.float32)
      return (pre, lax.dynamic_slice_in_dim(threshold, start, bw, 0), start,
              None if width % bw == 0 else j * bw)
    return get

  w3 = w_enc.reshape(d_in, nb, bw)
  b2 = b_enc.reshape(nb, bw)
  t2 = threshold.reshape(nb, bw)

  def get(j):
    w = lax.dynamic_index_in_dim(w3, j, 1, keepdims=False)
    pre = matmul(x, w, compute_dtype) + lax.dynamic_index_in_dim(b2, j, 0, keepdims=False
                                                                 ).astype(jnp.float32)
    return pre, lax.dynamic_index_in_dim(t2, j, 0, keepdims=False), j * bw, None
  return get


def active(pre, t, start, valid_from):
  """The active mask (n, B) bool of a block's pre-activations."""
  act = pre > t.astype(jnp.float32)
  if valid_from is not None:  # Overlapping last block: columns already seen are not new.
    col = start + lax.iota(jnp.int32, pre.shape[1])
    act = act & (col >= valid_from)[None, :]
  return act
