"""Planning: the budgets, ``plan_blocks`` and the frozen ``Plan`` that ``make_plan`` builds."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn import cpu_kernels
from dictlearn.dictionary import Dictionary

if TYPE_CHECKING:
  from dictlearn.pallas_encode import KernelPlan

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

GROUP = 16  # Columns per group in the two-stage ("grouped") block selection.

IMPLS = ("xla", "pallas", "pallas_interpret")
WEIGHTS = ("slice", "in_place", "copy")
SELECTS = ("ffi", "top_k", "grouped")


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
  divisor uses blocks that overlap at the end (see ``blocks.block_reader``).
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
  kernel: KernelPlan | None = None  # The Pallas impls' tiling.

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
  return block_width % GROUP == 0 and kb <= block_width // GROUP


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
              "grouped" if _grouped_fits(bw, kb) and bw // GROUP >= 16 * kb else "top_k")
  if select not in SELECTS:
    raise ValueError(f"select must be 'ffi', 'top_k' or 'grouped', not {select!r}")
  if select == "ffi" and not (kernels and width % bw == 0):
    raise ValueError("select='ffi' needs the CPU kernels on a CPU and blocks that tile "
                     "the width")
  if select == "grouped" and not _grouped_fits(bw, kb):
    raise ValueError(f"select='grouped' needs a block width divisible by {GROUP} with at "
                     f"least {kb} groups, not {bw}")
  return Plan(backend=backend, impl=impl, width=width, k=k, block_width=bw, block_k=bk,
              weights=weights, select=select, spill_rows=sr, spill_block_width=spill_bw,
              spill_weights=spill_weights,
              decode_chunk=_decode_chunk(n, k, d_out, backend),
              widen_dec=kernels and dec_dtype == jnp.bfloat16, kernel=kernel_plan)
