"""Pallas (Triton) GPU kernel: fused encode matmul + JumpReLU threshold + active-latent select.

The XLA path (``sparse.select_blocks``) runs a matmul, a threshold, a top_k and a merge
per block, each a kernel reading and writing HBM. Here one kernel does it all in
registers: program (t, s) of a (token tiles, width splits) grid takes ``block_tokens``
rows of x and the s-th slice of ``width / splits`` columns of w_enc, and for each tile
of ``block_width`` columns

  acc = x_tile @ w_enc_tile          (tl.dot over d_in in chunks of d_chunk, f32 acc)
  pre = acc + b_enc; active = pre > threshold
  repeat max(active per row) times: take each row's largest remaining active latent
  (argmax), append it to the row's ``capacity``-slot buffer, mask it out

so the (tokens x width) pre-activations never leave the chip. Each program writes its
buffer, fill, active count and a "lost" flag (an active latent did not fit); XLA then
merges the splits' buffers into k slots (one top_k over splits x capacity per row) and
``sparse`` decodes and repairs lost rows exactly, as for the XLA path.

Splitting the width over programs is what fills the GPU at one token (decode loops): a
single row still gets width / (block_width) independent tiles of w_enc to stream.

Shapes: x (n, d_in) -> ``sparse.Selection`` (values (n, k) f32, indices (n, k) i32, fill
(n,) i32, count (n,) i32, lost (n,) bool), the contract of ``sparse.select_blocks``.

Constraints (Triton): block sizes and capacity are powers of two, block_tokens >= 16,
width divisible by block_width * splits; d_in is arbitrary (tail chunks are masked).
``interpret=True`` runs the same kernel through Pallas' interpreter (CPU tests).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from dictlearn.sparse.codes import Selection

Array = jax.Array

_NUM_SMS_GUESS = 132  # H100/H200; only used to size the grid (twice this many programs).


def _pow2_at_least(v: float) -> int:
  return 1 << max(0, int(math.ceil(math.log2(max(1.0, v)))))


@dataclasses.dataclass(frozen=True)
class KernelPlan:
  """Static tiling of one call (all powers of two); d_chunk: d_in columns per tl.dot."""
  block_tokens: int
  block_width: int
  d_chunk: int
  splits: int
  capacity: int
  num_warps: int = 4
  num_stages: int = 3


def plan(n: int, d_in: int, width: int, k: int, *, block_tokens: int | None = None,
         block_width: int | None = None, d_chunk: int | None = None,
         splits: int | None = None, capacity: int | None = None,
         num_warps: int | None = None, num_stages: int | None = None) -> KernelPlan | None:
  """Chooses the tiling, or None when the shapes do not suit the kernel (use XLA)."""
  bt = block_tokens or (16 if n <= 16 else 32 if n <= 64 else 64)
  bw = block_width or 128
  while bw > 16 and width % bw:
    bw //= 2
  if width % bw or bw < 16:
    return None
  if d_chunk is None:
    d_chunk = 64
    while d_chunk > 16 and d_in % d_chunk:
      d_chunk //= 2
  tiles = width // bw
  token_tiles = -(-n // bt)
  if splits is None:
    want = _pow2_at_least(2 * _NUM_SMS_GUESS / token_tiles)
    splits = 1
    while splits * 2 <= min(want, tiles) and tiles % (splits * 2) == 0:
      splits *= 2
  if tiles % splits:
    return None
  if capacity is None:
    # A split sees ~k / splits of a full row's actives (k is sized above the L0); twice
    # that, at least 8, rarely spills and keeps the (bt, capacity) buffers in registers.
    capacity = min(_pow2_at_least(k), max(8, _pow2_at_least(2 * k / splits)))
  if num_warps is None:  # acc, key and buffers are all register tiles: wider tiles, more warps.
    num_warps = 4 if bt * bw <= 16 * 128 else 8
  return KernelPlan(bt, bw, d_chunk, splits, capacity, num_warps, num_stages or 3)


def _kernel(x_ref, w_ref, b_ref, t_ref, v_ref, i_ref, f_ref, c_ref, l_ref, *,
            d_in: int, p: KernelPlan, split_width: int, compute_dtype, precision):
  """One (token tile, width split): see the module docstring."""
  from jax.experimental.pallas import triton as plgpu

  bt, bw, bk, cap = p.block_tokens, p.block_width, p.d_chunk, p.capacity
  col0 = pl.program_id(1) * split_width
  n_chunks = pl.cdiv(d_in, bk)
  lane = jnp.arange(bw, dtype=jnp.int32)
  slot = jnp.arange(cap, dtype=jnp.int32)

  def tile(j, carry):
    buf_v, buf_i, fill, count, lost = carry

    def chunk(c, acc):
      x_at = x_ref.at[:, pl.ds(c * bk, bk)]
      w_at = w_ref.at[pl.ds(c * bk, bk), pl.ds(j * bw, bw)]
      if d_in % bk:  # Tail chunk: masked loads (no reads past d_in), zeros after.
        kmask = (c * bk + jnp.arange(bk, dtype=jnp.int32)) < d_in
        xa = jnp.where(kmask[None, :], plgpu.load(x_at, mask=kmask[None, :]), 0)
        wa = jnp.where(kmask[:, None], plgpu.load(w_at, mask=kmask[:, None]), 0)
      else:
        xa, wa = x_at[...], w_at[...]
      return acc + plgpu.dot(xa.astype(compute_dtype), wa.astype(compute_dtype),
                             precision=precision)

    acc = lax.fori_loop(0, n_chunks, chunk, jnp.zeros((bt, bw), jnp.float32))
    b = b_ref[pl.ds(j * bw, bw)].astype(jnp.float32)
    thr = t_ref[pl.ds(j * bw, bw)].astype(jnp.float32)
    pre = acc + b[None, :]
    active = pre > thr[None, :]
    c = jnp.sum(active.astype(jnp.int32), axis=1)
    key = jnp.where(active, pre, -jnp.inf)

    def pick(_, st):
      key, buf_v, buf_i, fill = st
      m = jnp.max(key, axis=1)
      a = jnp.argmax(key, axis=1).astype(jnp.int32)
      put = (m > -jnp.inf) & (fill < cap)
      hit = (slot[None, :] == fill[:, None]) & put[:, None]
      buf_v = jnp.where(hit, m[:, None], buf_v)
      buf_i = jnp.where(hit, (col0 + j * bw + a)[:, None], buf_i)
      key = jnp.where(lane[None, :] == a[:, None], -jnp.inf, key)
      return key, buf_v, buf_i, fill + put.astype(jnp.int32)

    # Only as many rounds as the busiest row of this tile needs (usually 0-3).
    rounds = jnp.minimum(jnp.max(c), cap)
    _, buf_v, buf_i, new_fill = lax.fori_loop(0, rounds, pick, (key, buf_v, buf_i, fill))
    lost = lost | (fill + c > cap).astype(jnp.int32)
    return buf_v, buf_i, new_fill, count + c, lost

  init = (jnp.zeros((bt, cap), jnp.float32), jnp.zeros((bt, cap), jnp.int32),
          jnp.zeros((bt,), jnp.int32), jnp.zeros((bt,), jnp.int32),
          jnp.zeros((bt,), jnp.int32))
  buf_v, buf_i, fill, count, lost = lax.fori_loop(0, split_width // bw, tile, init)
  v_ref[...] = buf_v
  i_ref[...] = buf_i
  f_ref[...] = fill
  c_ref[...] = count
  l_ref[...] = lost


def _precision_for(compute_dtype):
  """f32 follows jax's default matmul precision (TF32 unless 'highest'/'float32' is set)."""
  if jnp.dtype(compute_dtype) != jnp.float32:
    return None
  want = str(jax.config.jax_default_matmul_precision or "").lower()
  if want in ("highest", "float32", "precision.highest"):
    return lax.Precision.HIGHEST
  return lax.Precision.HIGH


def encode_select_splits(x: Array, w_enc: Array, b_enc: Array, threshold: Array,
                         p: KernelPlan, *, compute_dtype=jnp.float32,
                         interpret: bool = False):
  """The raw kernel: per-split buffers (splits, n_pad, capacity) and per-split counts."""
  n, d_in = x.shape
  width = w_enc.shape[1]
  bt, s = p.block_tokens, p.splits
  n_pad = -(-n // bt) * bt
  # Padding rows are zeros: they may "activate" through b_enc, and are dropped after.
  xp = jnp.pad(x.astype(compute_dtype), ((0, n_pad - n), (0, 0)))
  split_width = width // s
  kernel = functools.partial(
      _kernel, d_in=d_in, p=p, split_width=split_width,
      compute_dtype=jnp.dtype(compute_dtype), precision=_precision_for(compute_dtype))
  grid = (n_pad // bt, s)
  params = None
  if not interpret:
    from jax.experimental.pallas import triton as plgpu
    params = plgpu.CompilerParams(num_warps=p.num_warps, num_stages=p.num_stages)
  out = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[
          pl.BlockSpec((bt, d_in), lambda t, j: (t, 0)),
          pl.BlockSpec((d_in, split_width), lambda t, j: (0, j)),
          pl.BlockSpec((split_width,), lambda t, j: (j,)),
          pl.BlockSpec((split_width,), lambda t, j: (j,)),
      ],
      out_specs=[
          pl.BlockSpec((None, bt, p.capacity), lambda t, j: (j, t, 0)),
          pl.BlockSpec((None, bt, p.capacity), lambda t, j: (j, t, 0)),
          pl.BlockSpec((None, bt), lambda t, j: (j, t)),
          pl.BlockSpec((None, bt), lambda t, j: (j, t)),
          pl.BlockSpec((None, bt), lambda t, j: (j, t)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((s, n_pad, p.capacity), jnp.float32),
          jax.ShapeDtypeStruct((s, n_pad, p.capacity), jnp.int32),
          jax.ShapeDtypeStruct((s, n_pad), jnp.int32),
          jax.ShapeDtypeStruct((s, n_pad), jnp.int32),
          jax.ShapeDtypeStruct((s, n_pad), jnp.int32),
      ],
      compiler_params=params,
      interpret=interpret,
      name="dictlearn_encode_select",
  )(xp, w_enc, b_enc, threshold)
  return [o[:, :n] for o in out]


def merge_splits(v, i, fill, count, lost, k: int) -> Selection:
  """(splits, n, cap) buffers -> k slots per row: a ``sparse.Selection``."""
  s, n, cap = v.shape
  valid = jnp.arange(cap, dtype=jnp.int32)[None, None, :] < fill[:, :, None]
  key = jnp.where(valid, v, -jnp.inf).transpose(1, 0, 2).reshape(n, s * cap)
  idx = i.transpose(1, 0, 2).reshape(n, s * cap)
  kk = min(k, s * cap)
  top, sel = lax.top_k(key, kk)
  idx = jnp.take_along_axis(idx, sel, axis=1)
  total = fill.sum(0)
  keep = jnp.arange(kk, dtype=jnp.int32)[None, :] < total[:, None]
  top = jnp.where(keep, top, 0.0)
  idx = jnp.where(keep, idx, 0)
  if kk < k:
    top = jnp.pad(top, ((0, 0), (0, k - kk)))
    idx = jnp.pad(idx, ((0, 0), (0, k - kk)))
  count = count.sum(0)
  lost = (lost.sum(0) > 0) | (count > k)
  return Selection(top, idx, jnp.minimum(total, k), count, lost)


def select(d, x: Array, p: KernelPlan, *, k: int, compute_dtype=jnp.float32,
           interpret: bool = False) -> Selection:
  """Fused encode + select of x (n, d_in) with tiling p (``plan``): a ``sparse.Selection``."""
  out = encode_select_splits(x, d.w_enc, d.b_enc, d.threshold, p,
                             compute_dtype=compute_dtype, interpret=interpret)
  return merge_splits(*out, k)
