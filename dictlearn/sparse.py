"""Fused encode-decode over blocks of the width, with the active latents as sparse codes.

The dense path (``dictionary.forward``) builds the whole (tokens x width) latent matrix and
multiplies it by w_dec: for 1m latents at 1024 tokens that matrix alone is 4 GiB, and the
decode reads all of w_dec to multiply mostly zeros. Here one jitted pass

1. scans over blocks of ``block_width`` columns of w_enc; each block's pre-activations
   (tokens x block_width) are thresholded and up to ``block_k`` of its active latents per
   row (compacted by a small C++ kernel on CPU, ``cpu_kernels``; the top ``block_k`` by
   value with ``lax.top_k`` elsewhere) are appended to a running buffer of ``k`` slots,
   so only one block of the latent matrix ever exists (a block spans the whole width only
   while n * width * 4 bytes fits a small budget, e.g. at one token: ``plan_blocks``);
2. decodes from the buffer only: a gather of the active rows of w_dec weighted by their
   values, plus b_dec and, for affine transcoders, ``x @ w_skip``;
3. repairs the rows the buffer could not hold (more than ``k`` active latents, or more than
   ``block_k`` in one block or in ``block_k`` 16-column groups of it): they go,
   ``spill_rows`` at a time, through an exact blocked dense pass (``y += f_block @
   w_dec_block``; codes keep the row's k largest activations). The loop over spill groups
   has a data-dependent trip count, so it costs nothing when no row overflows and stays
   exact when every row does.

Every choice of that pass (backend, block sizes, how w_enc blocks are read, which
selection, decode chunking, the Pallas tiling) is made once per call by ``make_plan`` and
held in a frozen, hashable ``Plan``; the steps below read only the plan. Pass
``plan=make_plan(...)`` to ``encode_decode`` / ``encode_sparse`` to choose a path.

Shapes (``...`` is any leading batch shape, ``n`` the flattened token count)::

    x (..., d_in) -> y (..., d_out), SparseCodes(values (..., k) float32,
                     indices (..., k) int32, count (...,) int32, overflow (...,) bool)

``count`` is the exact number of active latents of the row (it may exceed k);
``overflow = count > k``. Slots ``[0, min(count, k))`` hold active latents (all of them when
not overflowed, the k largest when overflowed) in no particular order; the other slots hold
value 0 and index 0, so a plain weighted gather decodes them to nothing.

Shapes are static (only k, block sizes and dtypes are compile-time constants), so repeated
calls with the same shapes reuse one executable; everything vmaps and inlines into a
larger jit. On GPU, step 1 can run as one Pallas kernel (``dictlearn.pallas_encode``):
the default for up to ``PALLAS_MAX_TOKENS`` tokens, or ``impl="pallas"``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dictlearn import cpu_kernels
from dictlearn.dictionary import (Dictionary, add_bias_and_skip, check_input,
                                  check_skip_input, matmul)

Array = jax.Array

# One block of pre-activations is (n, block_width) float32, and on CPU the block's w_enc
# columns are copied too (XLA:CPU's dot reads a strided block only after a copy). On CPU
# both should stay within a slice of the last-level cache and, above all, under glibc's
# 32 MiB mmap threshold: larger temporaries are mmapped afresh on every call and
# page-faulted in. The weight budget grows with n, as the matmul per block does. One block
# over the whole width (no weight copy) is used while its pre-activations fit
# CPU_ONE_BLOCK_BYTES. GPUs want fewer, larger blocks. The values were tuned on a CPU with
# a 32 MiB L3; benchmarks/bench_dictionary.py times a change to them.
CPU_PRE_BYTES = 8 << 20
CPU_ONE_BLOCK_BYTES = 24 << 20
GPU_BLOCK_BYTES = 128 << 20


def cpu_weight_bytes(n: int) -> int:
  """The CPU budget for one block of copied w_enc columns at n rows."""
  return min(16 << 20, (5 << 20) * (1 + n // 256))


# Decode gathers (n, slots, d_out) rows of w_dec at a time. On CPU one slot a step (a
# fused gather-multiply-add) beats batched chunks once n is more than a few tokens; on
# GPU each loop step is a few kernel launches, so chunks are big.
CPU_DECODE_BYTES = 256 << 10
CPU_ONE_DECODE_BYTES = 4 << 20
GPU_DECODE_BYTES = 128 << 20

# Up to this many tokens the Pallas kernel is the GPU default; above, cuBLAS-backed XLA
# blocks. A guess until measured on the GPU (benchmarks/run_gpu.sh prints both).
PALLAS_MAX_TOKENS = 256

_GROUP = 16  # Columns per group in the two-stage ("grouped") block selection.

IMPLS = ("xla", "pallas", "pallas_interpret")
WEIGHTS = ("slice", "in_place", "copy")
SELECTS = ("ffi", "top_k", "grouped")


@dataclasses.dataclass(frozen=True)
class SparseCodes:
  """Active latents of each row: values (..., k) f32, indices (..., k) i32, count, overflow."""

  values: Array
  indices: Array
  count: Array
  overflow: Array

  @property
  def k(self) -> int:
    return self.values.shape[-1]

  def reshape(self, *lead: int) -> SparseCodes:
    """The same codes over rows of leading shape ``lead`` (k stays the last axis)."""
    return SparseCodes(values=self.values.reshape(*lead, self.k),
                       indices=self.indices.reshape(*lead, self.k),
                       count=self.count.reshape(lead), overflow=self.overflow.reshape(lead))

  def to_dense(self, width: int) -> Array:
    """Scatters the codes into a dense (..., width) float32 array (for tests and small data)."""
    lead = self.values.shape[:-1]
    v = self.values.reshape(-1, self.k)
    i = self.indices.reshape(-1, self.k)
    rows = jnp.arange(v.shape[0])[:, None]
    dense = jnp.zeros((v.shape[0], width), jnp.float32).at[rows, i].add(v)
    return dense.reshape(*lead, width)


jax.tree_util.register_dataclass(
    SparseCodes, data_fields=["values", "indices", "count", "overflow"], meta_fields=[])


class Selection(NamedTuple):
  """What a selection pass leaves per row (n rows, k slots).

  values (n, k) f32, indices (n, k) i32: slots [0, fill) hold active latents, the rest 0.
  fill (n,) i32: filled slots. count (n,) i32: the row's exact number of active latents.
  lost (n,) bool: the slots miss an active latent the row has (count > k, or a block or
  kernel buffer overflowed), so the spill pass must redo the row. After ``fused_pass``
  every row holds all its actives or its k largest, fill = min(count, k), and lost marks
  the rows that were redone.
  """

  values: Array
  indices: Array
  fill: Array
  count: Array
  lost: Array


# ------------------------------------------------------------------------------ planning


def _largest_divisor_at_most(width: int, cap: int) -> int:
  """Largest divisor of width that is <= cap (widths are powers of two in practice)."""
  cap = max(1, min(cap, width))
  for b in range(cap, 0, -1):
    if width % b == 0:
      return b
  return 1


def plan_blocks(n: int, d_in: int, width: int, k: int, block_width: int | None = None,
                block_k: int | None = None, backend: str | None = None,
                weights: str = "slice") -> tuple[int, int]:
  """Chooses (block_width, block_k) for n tokens: a static, per-shape decision.

  block_width: the whole width when the (n, width) float32 pre-activations fit the
  backend's budget (e.g. at one token); else the largest divisor of width whose block of
  pre-activations (and on CPU, of copied w_enc columns) fits. A width with no reasonable
  divisor uses blocks that overlap at the end (see ``_block_reader``).
  block_k: how many active latents one row may have in one block before it spills; a
  generous multiple of the share of k that block should see on average.
  weights: how a block of w_enc is read (``Plan.weights``): "slice" (XLA slices it; on
  CPU a strided slice is copied), "in_place" (``cpu_kernels.matmul_bf16``: no copy, so
  only the pre-activations bound the block) or "copy" (widened into a float32 copy: never
  the whole array at once unless it fits the copy budget).
  """
  if weights not in WEIGHTS:
    raise ValueError(f"weights must be 'slice', 'in_place' or 'copy', not {weights!r}")
  backend = backend or jax.default_backend()
  if block_width is None:
    cpu = backend == "cpu"
    one = 4 * n * width <= (CPU_ONE_BLOCK_BYTES if cpu else GPU_BLOCK_BYTES)
    if one and weights != "copy":
      block_width = width  # One block: no weight slices at all (the common 1-token case).
    else:
      if cpu:
        cap = CPU_PRE_BYTES // (4 * n)
        if weights != "in_place":
          cap = min(cap, cpu_weight_bytes(n) // (4 * d_in))
      else:
        cap = GPU_BLOCK_BYTES // (4 * n)
      cap = 1 << int(math.log2(max(128, cap)))
      block_width = _largest_divisor_at_most(width, cap)
      if block_width < cap // 4:  # An awkward width: use overlapping blocks instead.
        block_width = cap
  block_width = int(max(1, min(block_width, width)))
  if block_k is None:
    expected = k * block_width / width
    block_k = max(16, 1 << int(math.ceil(math.log2(max(1.0, 4 * expected)))))
  block_k = int(max(1, min(block_k, k, block_width)))
  return block_width, block_k


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything the fused pass decides once per call (hashable: a jit static argument).

  backend: "cpu", "gpu", "tpu" (budgets; the CPU kernels apply only to "cpu").
  impl: "xla" or "pallas" / "pallas_interpret" (step 1 as the Pallas kernel, ``kernel``
    its tiling; a shape the kernel refuses gets an "xla" plan).
  width, k: the dictionary width and code slots the plan was made for.
  block_width, block_k: w_enc columns per scan step, actives one row may have per block.
  weights: how the encoder reads a block of w_enc: "slice" (XLA), "in_place"
    (``cpu_kernels.matmul_bf16`` on bf16 w_enc) or "copy" (``cpu_kernels.widen_columns``
    into a float32 block).
  select: how a block's actives are picked: "ffi" (``cpu_kernels.select_active``, column
    order), "top_k" (``lax.top_k`` by value) or "grouped" (top_k over 16-column group
    maxima first, then over the chosen groups: for few, very wide rows).
  spill_rows, spill_block_width, spill_weights: rows per step of the overflow pass, its
    block width and how it reads w_enc ("slice" or "copy": never in place).
  decode_chunk: code slots gathered per decode step (all k: no loop).
  widen_dec: bf16 w_dec rows are read through ``cpu_kernels`` (gather_rows, widen_rows).
  """

  backend: str
  impl: str
  width: int
  k: int
  block_width: int
  block_k: int
  weights: str
  select: str
  spill_rows: int
  spill_block_width: int
  spill_weights: str
  decode_chunk: int
  widen_dec: bool
  kernel: object = None  # pallas_encode.KernelPlan for the Pallas impls, else None.

  @property
  def num_blocks(self) -> int:
    return -(-self.width // self.block_width)


def _auto_spill_rows(n: int) -> int:
  # A spill step costs a read of w_enc and w_dec plus 4 * R * d * width flops, whoever
  # overflowed: R trades wasted rows when one token overflows (the usual case: a long
  # tail of L0) against more steps when many do.
  return int(max(1, min(n, max(8, n // 64))))


def _decode_chunk(n: int, k: int, d_out: int, backend: str) -> int:
  row_bytes = 4 * d_out * max(n, 1)
  if backend == "cpu":
    # All slots at once while small (no loop: XLA:CPU upcasts bf16 weights carried into
    # a loop, a full copy of w_dec per call), else one slot a step.
    chunk = k if k * row_bytes <= CPU_ONE_DECODE_BYTES else CPU_DECODE_BYTES // row_bytes
  else:
    chunk = GPU_DECODE_BYTES // row_bytes
  return int(max(1, min(k, chunk)))


def _grouped_fits(block_width: int, kb: int) -> bool:
  return block_width % _GROUP == 0 and kb <= block_width // _GROUP


def make_plan(d: Dictionary, n: int, k: int = 256, *, backend: str | None = None,
              impl: str | None = None, block_width: int | None = None,
              block_k: int | None = None, spill_rows: int | None = None,
              weights: str | None = None, select: str | None = None,
              use_cpu_kernels: bool = True, kernel: dict | None = None) -> Plan:
  """The plan for n rows of d with k code slots; None arguments take the defaults.

  backend: default ``jax.default_backend()`` ("gpu" for impl="pallas", which targets a
  GPU). impl: default Pallas on GPU up to PALLAS_MAX_TOKENS rows, else XLA.
  use_cpu_kernels=False keeps every ``cpu_kernels`` call out (the path GPUs, TPUs and CPUs
  without a compiler take). weights / select force one reading / selection path; a path
  the shapes or backend cannot take is a ValueError. kernel: Pallas tiling overrides
  (``pallas_encode.plan`` keywords).
  Only d's shapes and dtypes are read: d may hold ``jax.ShapeDtypeStruct`` leaves.
  """
  if impl not in (None, *IMPLS):
    raise ValueError(f"impl must be None, 'xla', 'pallas' or 'pallas_interpret', not {impl!r}")
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be a positive int (slots per row) but is {k!r}")
  if backend is None:
    backend = "gpu" if impl == "pallas" else jax.default_backend()
  # Cached: encode_decode makes a plan on every call, and at one token of a small
  # dictionary planning from scratch would cost a noticeable share of the call.
  return _make_plan(
      d.d_in, d.width, d.d_out, jnp.dtype(d.w_enc.dtype), jnp.dtype(d.w_dec.dtype),
      max(1, int(n)), int(k), backend, impl, block_width, block_k, spill_rows, weights,
      select, bool(use_cpu_kernels) and backend == "cpu" and cpu_kernels.available(),
      tuple(sorted((kernel or {}).items())))


@functools.lru_cache(maxsize=256)
def _make_plan(d_in, width, d_out, enc_dtype, dec_dtype, n, k, backend, impl, block_width,
               block_k, spill_rows, weights, select, kernels, kernel) -> Plan:
  if impl is None:
    impl = "pallas" if backend == "gpu" and n <= PALLAS_MAX_TOKENS else "xla"
  kernel_plan = None
  if impl != "xla":
    from dictlearn import pallas_encode
    kernel_plan = pallas_encode.plan(n, d_in, width, k, **dict(kernel))
    if kernel_plan is None:  # Shapes the kernel does not take: the XLA path.
      impl = "xla"
  widen_enc = kernels and enc_dtype == jnp.bfloat16
  if weights is None:
    weights = ("slice" if not widen_enc else
               "in_place" if n <= cpu_kernels.MATMUL_BF16_ROWS else "copy")
  if weights not in WEIGHTS:
    raise ValueError(f"weights must be 'slice', 'in_place' or 'copy', not {weights!r}")
  if weights != "slice" and not widen_enc:
    raise ValueError(f"weights={weights!r} needs bf16 w_enc and the CPU kernels on a CPU")
  bw, bk = plan_blocks(n, d_in, width, k, block_width, block_k, backend, weights)
  sr = int(min(spill_rows or _auto_spill_rows(n), n))
  # The spill pass widens bf16 blocks into float32 copies (``_dense_rows``), so when the
  # encoder reads w_enc in place the spill plans its own, copy-sized blocks.
  spill_weights = "slice" if weights == "slice" else "copy"
  spill_bw = bw
  if weights == "in_place":
    spill_bw = plan_blocks(sr, d_in, width, k, block_width, None, backend, "copy")[0]
  kb = min(k, width) if bw == width else bk  # Slots one block's selection fills.
  if select is None:
    select = ("ffi" if kernels and width % bw == 0 else
              "grouped" if _grouped_fits(bw, kb) and bw // _GROUP >= 16 * kb else "top_k")
  if select not in SELECTS:
    raise ValueError(f"select must be 'ffi', 'top_k' or 'grouped', not {select!r}")
  if select == "ffi" and not (kernels and width % bw == 0):
    raise ValueError("select='ffi' needs the CPU kernels on a CPU and blocks that tile "
                     "the width")
  if select == "grouped" and not _grouped_fits(bw, kb):
    raise ValueError(f"select='grouped' needs a block width divisible by {_GROUP} with at "
                     f"least {kb} groups, not {bw}")
  return Plan(backend=backend, impl=impl, width=width, k=k, block_width=bw, block_k=bk,
              weights=weights, select=select, spill_rows=sr, spill_block_width=spill_bw,
              spill_weights=spill_weights,
              decode_chunk=_decode_chunk(n, k, d_out, backend),
              widen_dec=kernels and dec_dtype == jnp.bfloat16, kernel=kernel_plan)


# ---------------------------------------------------------------------- block machinery


def _block_reader(d: Dictionary, x: Array, plan: Plan, compute_dtype, spill: bool = False):
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


def _active(pre, t, start, valid_from):
  """The active mask (n, B) bool of a block's pre-activations."""
  act = pre > t.astype(jnp.float32)
  if valid_from is not None:  # Overlapping last block: columns already seen are not new.
    col = start + lax.iota(jnp.int32, pre.shape[1])
    act = act & (col >= valid_from)[None, :]
  return act


# ----------------------------------------------------------------------------- selection


def _append(buf_v, buf_i, fill, v, i, c, k):
  """Appends the first c of (v, i) (n, kb) to each row's buffer (n, k) after ``fill``.

  A scatter of n * kb slots (those past c or k go out of bounds and are dropped): on CPU
  much cheaper than rebuilding the (n, k) buffer with a gather per block.
  """
  n, kb = v.shape
  slot = lax.iota(jnp.int32, kb)[None, :]
  pos = fill[:, None] + slot
  pos = jnp.where((slot < c[:, None]) & (pos < k), pos, k)
  rows = lax.iota(jnp.int32, n)[:, None]
  buf_v = buf_v.at[rows, pos].set(v, mode="drop", unique_indices=True)
  buf_i = buf_i.at[rows, pos].set(i, mode="drop", unique_indices=True)
  return buf_v, buf_i, jnp.minimum(fill + c, k)


def _block_candidates(pre: Array, act: Array, kb: int, grouped: bool):
  """Up to kb active latents per row of one block: (values (n, kb), cols (n, kb), missed).

  Actives come first (by value), inactive slots follow with value -inf. ``missed`` (n,)
  flags rows with an active latent left out. The path without ``cpu_kernels`` (GPU, TPU,
  CPU without a compiler). ``grouped``: the block is cut into groups of 16 columns: a
  vectorised max per group, top_k over the group maxima picks the kb groups holding
  actives, and a top_k over those kb * 16 values picks the latents; exact whenever a row
  has at most kb active groups (else ``missed``). It pays on few, very wide rows (the
  one-block, few token case); with many rows the group gather costs more than it saves.
  """
  n, bw = pre.shape
  key = jnp.where(act, pre, -jnp.inf)  # Actives are > threshold >= -inf: they sort first.
  c = act.sum(-1, dtype=jnp.int32)
  if not grouped:
    v, i = lax.top_k(key, kb)
    return v, i.astype(jnp.int32), c > kb
  g = _GROUP
  key3 = key.reshape(n, bw // g, g)
  gmax = key3.max(-1)
  _, gi = lax.top_k(gmax, kb)
  cand = jnp.take_along_axis(key3, gi[:, :, None], axis=1).reshape(n, kb * g)
  v, ci = lax.top_k(cand, kb)
  col = jnp.take_along_axis(gi, ci // g, axis=1) * g + ci % g
  groups = (gmax > -jnp.inf).sum(-1, dtype=jnp.int32)
  return v, col.astype(jnp.int32), (c > kb) | (groups > kb)


def select_blocks(d: Dictionary, x: Array, plan: Plan, compute_dtype=jnp.float32
                  ) -> Selection:
  """The XLA sparse encoder over x (n, d_in): the plan's blocks, its selection.

  ``lost`` marks rows whose buffer misses an active latent (count > k, or a block with
  more than block_k): exactly the rows the spill pass must redo. Codes are in no
  particular order ("ffi" compacts in column order, the top_k paths by value).
  """
  n = x.shape[0]
  k, width, block_k = plan.k, d.width, plan.block_k
  nb = plan.num_blocks
  get = _block_reader(d, x, plan, compute_dtype)

  def candidates(j, kb):
    """Block j: (values (n, kb), cols in the block (n, kb), count (n,), missed (n,), start)."""
    pre, t, start, valid_from = get(j)
    if plan.select == "ffi":
      v, i, c = cpu_kernels.select_active(pre, t, kb)
      return v, i, c, c > kb, start
    act = _active(pre, t, start, valid_from)
    v, i, missed = _block_candidates(pre, act, kb, plan.select == "grouped")
    return v, i, act.sum(-1, dtype=jnp.int32), missed, start

  if nb == 1:
    # One block (few tokens): select straight into k slots, no merging.
    kk = min(k, width)
    v, i, count, missed, _ = candidates(0, kk)
    keep = lax.iota(jnp.int32, kk)[None, :] < count[:, None]
    v = jnp.where(keep, v, 0.0)
    i = jnp.where(keep, i, 0)
    if kk < k:
      v = jnp.pad(v, ((0, 0), (0, k - kk)))
      i = jnp.pad(i, ((0, 0), (0, k - kk)))
    return Selection(v, i, jnp.minimum(count, k), count, missed)

  def body(carry, j):
    buf_v, buf_i, fill, count, lost = carry
    v, i, c, missed, start = candidates(j, block_k)
    lost = lost | missed | (fill + c > k)
    buf_v, buf_i, fill = _append(buf_v, buf_i, fill, v, i + start, jnp.minimum(c, block_k), k)
    return (buf_v, buf_i, fill, count + c, lost), None

  init = (jnp.zeros((n, k), jnp.float32), jnp.zeros((n, k), jnp.int32),
          jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.int32), jnp.zeros((n,), bool))
  carry, _ = lax.scan(body, init, jnp.arange(nb))
  return Selection(*carry)


# -------------------------------------------------------------------------------- decode


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


# ---------------------------------------------------------------------------- spill pass


def _dense_rows(d: Dictionary, x: Array, plan: Plan, compute_dtype, with_y: bool):
  """Exact blocked dense pass for a few rows: (y_partial (R, d_out) | None, v, i).

  y_partial excludes b_dec and the skip term. Codes are the row's k largest activations
  (merged block by block with top_k), padded with value 0 / index 0 past the count.
  """
  r = x.shape[0]
  k, width, bw = plan.k, d.width, plan.spill_block_width
  nb = -(-width // bw)
  get = _block_reader(d, x, plan, compute_dtype, spill=True)
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
    act = _active(pre, t, start, valid_from)
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


def _spill(d: Dictionary, x: Array, need: Array, y: Array | None, v: Array, i: Array,
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


# ----------------------------------------------------------------------- the fused pass


def fused_pass(d: Dictionary, x2: Array, plan: Plan, compute_dtype=jnp.float32,
               with_y: bool = True) -> tuple[Array | None, Selection]:
  """Steps 1-3 on x2 (n, d_in): (y_partial (n, d_out) f32 | None, Selection after spill).

  y_partial is the exact decode of the active latents, without b_dec and the skip term
  (``dictionary.add_bias_and_skip`` adds them; a width-sharded caller sums the shards'
  partials first). The Selection holds every row's actives, or its k largest.
  """
  cd = jnp.dtype(compute_dtype)
  if plan.impl == "xla":
    sel = select_blocks(d, x2, plan, cd)
  else:
    from dictlearn import pallas_encode
    sel = pallas_encode.select(d, x2, plan.kernel, k=plan.k, compute_dtype=cd,
                               interpret=plan.impl == "pallas_interpret")
  y = decode_codes(d.w_dec, sel.values, sel.indices, sel.fill, plan, cd) if with_y else None
  y, v, i = _spill(d, x2, sel.lost, y, sel.values, sel.indices, plan, cd)
  return y, Selection(v, i, jnp.minimum(sel.count, plan.k), sel.count, sel.lost)


# ---------------------------------------------------------------------------- public API


def _run(d, x, *, plan: Plan, compute_dtype: str, with_y: bool):
  lead = x.shape[:-1]
  n = int(np.prod(lead)) if lead else 1
  k = plan.k
  if n == 0:
    e = jnp.zeros((0, k))
    y = jnp.zeros((0, d.d_out), jnp.float32) if with_y else None
    codes = SparseCodes(e.astype(jnp.float32), e.astype(jnp.int32),
                        jnp.zeros((0,), jnp.int32), jnp.zeros((0,), bool))
  else:
    x2 = x.reshape(n, x.shape[-1])
    cd = jnp.dtype(compute_dtype)
    y, sel = fused_pass(d, x2, plan, cd, with_y)
    if with_y:
      y = add_bias_and_skip(d, y, x2, cd)
    codes = SparseCodes(values=sel.values, indices=sel.indices, count=sel.count,
                        overflow=sel.count > k)
  return (None if y is None else y.reshape(*lead, d.d_out)), codes.reshape(*lead)


_STATIC = ("plan", "compute_dtype", "with_y")
_run_jit = jax.jit(_run, static_argnames=_STATIC)
# Donating x lets XLA write y into x's buffer (SAEs: same shape and dtype) and free it early.
_run_jit_donate = jax.jit(_run, static_argnames=_STATIC, donate_argnames=("x",))


def _plan_for(d: Dictionary, x: Array, k, plan: Plan | None, **options) -> Plan:
  """The call's plan (given, or made from the options), checked; then x is checked."""
  if plan is None:
    n = int(np.prod(x.shape[:-1])) if x.ndim > 1 else 1
    plan = make_plan(d, n, k, **options)
  else:
    given = sorted(name for name, v in options.items() if v is not None)
    if given:
      raise ValueError(f"pass either plan= or {', '.join(given)}, not both")
    if plan.k != k or plan.width != d.width:
      raise ValueError(f"the plan is for k={plan.k}, width={plan.width}; this call has "
                       f"k={k!r}, width={d.width}")
  check_input(d, x, bf16_ok=plan.weights != "slice")
  return plan


def encode_decode(d: Dictionary, x: Array, *, k: int = 256, block_width: int | None = None,
                  block_k: int | None = None, spill_rows: int | None = None,
                  compute_dtype=jnp.float32, impl: str | None = None,
                  donate: bool = False, kernel: dict | None = None,
                  plan: Plan | None = None) -> tuple[Array, SparseCodes]:
  """Fused forward: (y (..., d_out) float32, SparseCodes with k slots per row).

  Equals ``forward(d, x, compute_dtype=...)`` for every input (rows with more than k active
  latents are recomputed exactly and flagged in ``codes.overflow``), without ever holding
  the (tokens x width) latent matrix.

  Args:
    d: a JumpReLUSAE or Transcoder (affine transcoders add ``x @ w_skip``).
    x: (..., d_in) inputs, any leading shape.
    k: code slots per row. Pick it well above the dictionary's typical L0 (per-token L0
      has a long tail): rows above it are exact but slow (spill pass).
    block_width: w_enc columns per scan step; default from a per-backend memory budget.
    block_k: active latents one row may have in one block before it spills (default: a
      generous multiple of k * block_width / width).
    spill_rows: rows per step of the overflow pass (default max(8, n/64)).
    compute_dtype: matmul operand dtype (float32 accumulation), as ``dictionary.matmul``.
    impl: None (Pallas on GPU for few tokens, XLA otherwise), "xla", "pallas" or
      "pallas_interpret" (the Pallas kernel in interpret mode, for CPU tests). Shapes
      the kernel does not take (see ``pallas_encode``) use the XLA path.
    donate: donate x's buffer to the call (only when you no longer need x).
    kernel: Pallas tiling overrides (``pallas_encode.plan`` keywords), for tuning.
    plan: a ``make_plan`` result (instead of block_width ... kernel) choosing every path.
  """
  plan = _plan_for(d, x, k, plan, block_width=block_width, block_k=block_k,
                   spill_rows=spill_rows, impl=impl, kernel=kernel)
  fn = _run_jit_donate if donate else _run_jit
  return fn(d, x, plan=plan, compute_dtype=jnp.dtype(compute_dtype).name, with_y=True)


def encode_sparse(d: Dictionary, x: Array, *, k: int = 256, block_width: int | None = None,
                  block_k: int | None = None, spill_rows: int | None = None,
                  compute_dtype=jnp.float32, impl: str | None = None,
                  plan: Plan | None = None) -> SparseCodes:
  """The active latents of x (..., d_in) as SparseCodes (k slots per row), blockwise.

  Overflowed rows (count > k) hold their k largest activations. Arguments as
  ``encode_decode``.
  """
  plan = _plan_for(d, x, k, plan, block_width=block_width, block_k=block_k,
                   spill_rows=spill_rows, impl=impl)
  return _run_jit(d, x, plan=plan, compute_dtype=jnp.dtype(compute_dtype).name,
                  with_y=False)[1]


@functools.partial(jax.jit, static_argnames=("plan", "compute_dtype"))
def _decode_sparse_jit(d, codes, x, plan, compute_dtype):
  lead = codes.values.shape[:-1]
  k = codes.values.shape[-1]
  cd = jnp.dtype(compute_dtype)
  y = decode_codes(d.w_dec, codes.values.reshape(-1, k), codes.indices.reshape(-1, k),
                   None, plan, cd)
  y = add_bias_and_skip(d, y, None if x is None else x.reshape(-1, d.d_in), cd)
  return y.reshape(*lead, d.d_out)


def decode_sparse(d: Dictionary, codes: SparseCodes, x: Array | None = None, *,
                  compute_dtype=jnp.float32) -> Array:
  """y (..., d_out) float32 from SparseCodes: gathered w_dec rows weighted by the values.

  Exact (equals ``decode`` of the dense latents) for rows that did not overflow; an
  overflowed row decodes only the k latents it kept (use encode_decode for exact output).
  Affine transcoders need x (..., d_in) for the skip term.
  """
  check_skip_input(d, x, "decode_sparse(d, codes, x)")
  if d.w_skip is None:
    x = None
  if codes.indices.shape != codes.values.shape:
    raise ValueError(f"codes.indices {codes.indices.shape} and codes.values "
                     f"{codes.values.shape} must have the same shape")
  n = int(np.prod(codes.values.shape[:-1]))
  plan = make_plan(d, n, codes.values.shape[-1], impl="xla")
  return _decode_sparse_jit(d, codes, x, plan=plan,
                            compute_dtype=jnp.dtype(compute_dtype).name)
