"""CPU kernels for the fused encode-decode: small C++ XLA FFI calls, built on first use.

- ``select_active(pre, thr, kb)``: for each row of a block of pre-activations, the first
  ``kb`` latents with ``pre > thr`` (values and columns, in column order) and how many
  there are. It stands in for ``lax.top_k`` in the CPU block scan of ``dictlearn.sparse``:
  XLA:CPU's TopK sorts where one compare per element is all that compaction needs
  (benchmarks/RESULTS.md has the timings).
- ``widen_columns / widen_rows / gather_rows``: float32 blocks of bfloat16 weights. XLA:CPU
  converts a bf16 parameter to a float32 copy of the whole array before any loop that
  reads it (slow, and several times w_enc in temporaries at width 1m); custom-call
  operands are left alone, so these read just the block a step needs.
- ``matmul_bf16(x, w, start, width)``: ``x @ w[:, start:start + width]`` for few rows of x
  and bf16 w, widening in registers (AVX2 where the CPU has it). At one token the
  product is bound by reading w, and this reads half the bytes of a float32 matvec.

The source is ``cpu_kernels.cc``. It is compiled once per source and jaxlib version with the system C++ compiler
(``$CXX``, else ``c++``) into ``$DICTLEARN_CACHE`` (default ``~/.cache/dictlearn``). Where
that is not possible (no compiler, a read-only home, another platform), ``available()``
is False and the XLA path is used: same results, a little slower. Set
``DICTLEARN_CPU_KERNELS=0`` to use the XLA path regardless.

Shapes are in each function's docstring.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import jaxlib

from dictlearn import cache

_SOURCE = pathlib.Path(__file__).with_name("cpu_kernels.cc")
# FFI target name -> exported handler symbol.
_TARGETS = {"dictlearn_select_active": "DictlearnSelectActive",
            "dictlearn_widen_columns": "DictlearnWidenColumns",
            "dictlearn_widen_rows": "DictlearnWidenRows",
            "dictlearn_gather_rows": "DictlearnGatherRows",
            "dictlearn_matmul_bf16": "DictlearnMatmulBf16"}

# Up to this many rows of x, bf16 products go through matmul_bf16. Its accumulators are
# shared by the rows, so its tiles shrink as rows grow and XLA's float32 GEMM (which
# reuses each weight across many rows) wins beyond a few dozen: the cut-off is where it
# stopped beating the float32 matmul (benchmarks/RESULTS.md, bfloat16 weights on CPU).
MATMUL_BF16_ROWS = 32


def _build(defines: tuple[str, ...] = ()) -> pathlib.Path:
  """Compiles cpu_kernels.cc (once; keyed by source, jaxlib, machine and defines): the .so."""
  src = _SOURCE.read_bytes()
  key = hashlib.sha256(src + jaxlib.__version__.encode() + platform.machine().encode() +
                       " ".join(defines).encode())
  lib = cache.root() / f"cpu_kernels-{key.hexdigest()[:16]}.so"
  if lib.exists():
    return lib
  cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
  if not cxx:
    raise RuntimeError("no C++ compiler found (set CXX)")
  lib.parent.mkdir(parents=True, exist_ok=True)  # The temp fallback may not exist yet.
  with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
    out = pathlib.Path(tmp) / lib.name
    cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-w",
           *(f"-D{d}" for d in defines), f"-I{jax.ffi.include_dir()}", str(_SOURCE),
           "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    os.replace(out, lib)  # Atomic: concurrent first uses both end with a whole file.
  return lib


@functools.cache
def available() -> bool:
  """True when the kernels are built and registered with XLA for the CPU platform."""
  if os.environ.get("DICTLEARN_CPU_KERNELS", "1") == "0":
    return False
  try:
    lib = ctypes.cdll.LoadLibrary(str(_build()))
    for target, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                  platform="cpu")
    return True
  except Exception as e:  # Any failure leaves the (slower, equal) XLA path in place.
    warnings.warn(f"dictlearn: CPU kernels unavailable, using XLA ops instead ({e})",
                  stacklevel=2)
    return False


def select_active(pre: jax.Array, thr: jax.Array, kb: int):
  """(values (n, kb) f32, cols (n, kb) i32, count (n,) i32) of ``pre > thr`` per row."""
  n, _ = pre.shape
  out = (jax.ShapeDtypeStruct((n, kb), jnp.float32), jax.ShapeDtypeStruct((n, kb), jnp.int32),
         jax.ShapeDtypeStruct((n,), jnp.int32))
  return jax.ffi.ffi_call("dictlearn_select_active", out, vmap_method="sequential")(
      pre.astype(jnp.float32), thr.astype(jnp.float32))


def _widen(target, w, arg, shape):
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method="sequential")(w, jnp.asarray(arg, jnp.int32))


def widen_columns(w: jax.Array, start, width: int) -> jax.Array:
  """``w[:, start:start + width]`` (R, width) float32 from bf16 w (R, C); start clamped."""
  return _widen("dictlearn_widen_columns", w, start, (w.shape[0], width))


def widen_rows(w: jax.Array, start, rows: int) -> jax.Array:
  """``w[start:start + rows]`` (rows, C) float32 from bf16 w (R, C); start clamped."""
  return _widen("dictlearn_widen_rows", w, start, (rows, w.shape[1]))


def gather_rows(w: jax.Array, idx: jax.Array) -> jax.Array:
  """``w[idx]`` (*idx.shape, C) float32 from bf16 w (R, C); indices clipped to [0, R)."""
  flat = _widen("dictlearn_gather_rows", w, idx.reshape(-1), (idx.size, w.shape[1]))
  return flat.reshape(*idx.shape, w.shape[1])


def matmul_bf16(x: jax.Array, w: jax.Array, start, width: int) -> jax.Array:
  """``x @ w[:, start:start + width]``: (n, width) float32 from x (n, R) f32, w (R, C) bf16.

  start is clamped to [0, C - width]; accumulation is float32 (like a float32 matmul of
  the widened weights, up to summation order).
  """
  return jax.ffi.ffi_call(
      "dictlearn_matmul_bf16", jax.ShapeDtypeStruct((x.shape[0], width), jnp.float32),
      vmap_method="sequential")(x.astype(jnp.float32), w, jnp.asarray(start, jnp.int32))


def widens(w: jax.Array) -> bool:
  """Whether reads of w on CPU should go through the widening kernels (bf16, built)."""
  return w.dtype == jnp.bfloat16 and available()
