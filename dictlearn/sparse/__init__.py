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

Layout: ``plan`` (budgets, ``Plan``, ``make_plan``), ``blocks`` (reading w_enc blocks),
``select`` (step 1, ``Selection``), ``decode`` (step 2), ``spill`` (step 3), ``fused``
(``fused_pass``: steps 1-3 without b_dec, shared with ``dictlearn.sharding``), ``codes``
(``SparseCodes``, ``Selection``); this module holds the jitted public functions.

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

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn.dictionary import Dictionary, add_bias_and_skip, check_input, check_skip_input
from dictlearn.sparse.codes import Selection, SparseCodes
from dictlearn.sparse.decode import decode_codes
from dictlearn.sparse.fused import fused_pass
from dictlearn.sparse.plan import (CPU_DECODE_BYTES, CPU_ONE_BLOCK_BYTES, CPU_ONE_DECODE_BYTES,
                                   CPU_PRE_BYTES, GPU_BLOCK_BYTES, GPU_DECODE_BYTES, GROUP, IMPLS,
                                   PALLAS_MAX_TOKENS, SELECTS, WEIGHTS, Plan, cpu_weight_bytes,
                                   make_plan, plan_blocks)
from dictlearn.sparse.select import select_blocks

Array = jax.Array

__all__ = [
    "CPU_DECODE_BYTES", "CPU_ONE_BLOCK_BYTES", "CPU_ONE_DECODE_BYTES", "CPU_PRE_BYTES",
    "GPU_BLOCK_BYTES", "GPU_DECODE_BYTES", "GROUP", "IMPLS", "PALLAS_MAX_TOKENS", "SELECTS",
    "WEIGHTS", "Plan", "Selection", "SparseCodes", "cpu_weight_bytes", "decode_codes",
    "decode_sparse", "encode_decode", "encode_sparse", "fused_pass", "make_plan",
    "plan_blocks", "select_blocks"]


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
  # XLA:CPU's bf16 conversion (check_input's warning) is avoided when the CPU kernels read
  # w_enc, and is not there at all when the plan targets another backend.
  check_input(d, x, bf16_ok=plan.weights != "slice" or plan.backend != "cpu")
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
