"""The Pallas encode+select kernel, run in Pallas interpret mode on CPU, against the reference.

Interpret mode is slow, so shapes are tiny; they still cover several token tiles and width
splits, a d_in that is not a multiple of the kernel's chunk, a per-split capacity small
enough to lose latents (repaired by the spill pass), bf16 weights and affine transcoders.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dictlearn as dl
from dictlearn import pallas_encode, sparse
from sparse_helpers import assert_close, check_codes, inputs, make_dictionary, margin_ok

CASES = [
    # kind, d_in, width, tokens, dtype, threshold, k, kernel overrides
    ("sae", 32, 512, 5, "float32", 2.0, 32, {}),
    ("affine", 40, 256, 20, "bfloat16", 1.5, 16, dict(d_chunk=16, splits=2)),
    ("sae", 16, 1024, 3, "float32", 2.0, 16, dict(splits=4, capacity=4, block_width=64)),
]


@pytest.mark.parametrize("case", CASES, ids=["f32-sae", "bf16-affine-dtail", "lost"])
def test_pallas_interpret_matches_reference(case):
  kind, d_in, width, n, dtype, thr, k, kernel = case
  d = make_dictionary(21, d_in, width, kind=kind, dtype=dtype, threshold=thr)
  x = inputs(21, (n,), d_in)
  if kernel.get("capacity"):  # One quiet row, two rows too busy for 4 slots a split.
    x = x * jnp.asarray([0.5, 1.0, 3.0])[:, None]
  assert margin_ok(d, x, jnp.float32)
  y, codes = dl.encode_decode(d, x, k=k, impl="pallas_interpret", kernel=kernel)
  assert_close(y, dl.forward(d, x), 1e-5)
  check_codes(codes, dl.encode(d, x), k, 1e-5)
  # The raw kernel output: every row whose split buffers held all its actives is exact
  # before any repair, and the lost flag is set exactly where they did not.
  p = pallas_encode.plan(n, d_in, width, k, **kernel)
  v, i, fill, count, lost = pallas_encode.select(d, x, p, k=k, interpret=True)
  f = np.asarray(dl.encode(d, x))
  np.testing.assert_array_equal(count, (f != 0).sum(-1))
  ok = ~np.asarray(lost)
  assert ok.any()
  sub = sparse.SparseCodes(values=v[ok], indices=i[ok], count=count[ok],
                           overflow=count[ok] > k)
  check_codes(sub, f[ok], k, 1e-5)
  if kernel.get("capacity"):
    assert np.asarray(lost).any()


def test_plan_is_powers_of_two_and_fills_the_gpu():
  p = pallas_encode.plan(1, 1152, 65536, 128)
  for v in (p.block_tokens, p.block_width, p.d_chunk, p.splits, p.capacity):
    assert v & (v - 1) == 0
  assert p.block_tokens >= 16 and 1152 % p.d_chunk == 0
  assert p.splits * p.block_width <= 65536 and p.splits >= 128  # One token: split wide.
  big = pallas_encode.plan(4096, 1152, 65536, 128)
  assert big.splits < p.splits and big.capacity >= 8
  assert pallas_encode.plan(4, 8, 100, 8) is None  # No power-of-two tile divides 100.


def test_shapes_the_kernel_refuses_fall_back_to_xla():
  d = make_dictionary(22, 8, 100, threshold=1.0)
  x = inputs(22, (3,), 8)
  assert sparse.make_plan(d, 3, 8, impl="pallas_interpret").impl == "xla"
  assert sparse.make_plan(d, 3, 8, impl="pallas").backend == "gpu"  # Pallas targets GPUs.
  y, codes = dl.encode_decode(d, x, k=8, impl="pallas_interpret")
  assert_close(y, dl.forward(d, x), 1e-5)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the CPU/TPU default")
def test_default_plan_off_gpu_never_lowers_the_triton_kernel():
  d = make_dictionary(23, 32, 512, threshold=2.0)
  x = inputs(23, (4,), 32)
  p = sparse.make_plan(d, 4, 16)
  assert p.impl == "xla" and p.kernel is None
  hlo = jax.jit(lambda d, x: dl.encode_decode(d, x, k=16)).lower(d, x).as_text()
  assert "triton" not in hlo
  # On a GPU plan, few tokens take the kernel and many the XLA blocks.
  assert sparse.make_plan(d, 4, 16, backend="gpu").impl == "pallas"
  assert sparse.make_plan(d, sparse.PALLAS_MAX_TOKENS + 1, 16, backend="gpu").impl == "xla"


@pytest.mark.parametrize("n,dtype", [(1, "bfloat16"), (200, "float32")])
def test_kernel_lowers_to_triton_without_a_gpu(n, dtype):
  # Cross-platform lowering runs the Pallas -> Triton IR lowering on this CPU machine,
  # catching unsupported ops/shapes before a GPU ever sees the kernel. (PTX compilation
  # still needs the GPU: benchmarks/run_gpu.sh.)
  from jax import export
  d = jax.eval_shape(lambda: make_dictionary(0, 1000, 4096, kind="affine", dtype=dtype))
  x = jax.ShapeDtypeStruct((n, 1000), jnp.float32)
  f = jax.jit(lambda d, x: dl.encode_decode(d, x, k=64, impl="pallas", compute_dtype=dtype))
  exp = export.export(f, platforms=["cuda"], disabled_checks=[
      export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(d, x)
  assert exp.mlir_module().count("__gpu$xla.gpu.triton") == 1
