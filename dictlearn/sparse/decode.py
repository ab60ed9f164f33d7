"""Decoding sparse codes: a weighted gather of w_dec rows, ``plan.decode_chunk`` slots a step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dictlearn import cpu_kernels
from dictlearn.sparse.plan import Plan

Array = jax.Array


def decode_codes(w_dec: Array, values: Array, indices: Array, fill: Array | None,
                 plan: Plan, compute_dtype=jnp.float32) -> Array:
  """sum_j values[:, j] * w_dec[indices[:, j]] over the filled slots: (n, d_out) f32.

  Slots are taken ``plan.decode_chunk`` at a time ((n, chunk, d_out) gathered rows), and
  only up to the fullest row, so short rows cost what they hold. Operands are rounded to
  compute_dtype and multiplied in float32, which is what a compute_dtype matmul with
  float32 accumulation does. No b_dec, no skip (``dictionary.add_bias_and_skip``).
  """
  n, k = values.shape
  d_out = w_dec.shape[1]
  cd = jnp.dtype(compute_dtype)
  vals = values.astype(cd).astype(jnp.float32)
  if fill is not None:
    vals = jnp.where(lax.iota(jnp.int32, k)[None, :] < fill[:, None], vals, 0.0)
  chunk = max(1, min(k, plan.decode_chunk))

  def part(v, i):  # v, i: (n, c)
    rows = (cpu_kernels.gather_rows(w_dec, i) if plan.widen_dec
            else jnp.take(w_dec, i, axis=0, mode="clip"))
    rows = rows.astype(cd).astype(jnp.float32)
    return jnp.einsum("nc,ncd->nd", v, rows, precision=lax.Precision.HIGHEST)

  if chunk >= k:
    return part(vals, indices)
  nc = -(-k // chunk)
  pad = nc * chunk - k
  vals = jnp.pad(vals, ((0, 0), (0, pad))).reshape(n, nc, chunk)
  idx = jnp.pad(indices, ((0, 0), (0, pad))).reshape(n, nc, chunk)
  top = jnp.max(fill) if fill is not None else jnp.int32(k)
  steps = (top + chunk - 1) // chunk

  def body(j, acc):
    v = lax.dynamic_index_in_dim(vals, j, 1, keepdims=False)
    i = lax.dynamic_index_in_dim(idx, j, 1, keepdims=False)
    return acc + part(v, i)
  return lax.fori_loop(0, steps, body, jnp.zeros((n, d_out), jnp.float32))
