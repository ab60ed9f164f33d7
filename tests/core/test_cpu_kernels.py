"""The CPU kernels (dictlearn.cpu_kernels) against numpy and the XLA paths they replace."""

import ctypes
import functools
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dictlearn as dl
from dictlearn import cpu_kernels, sparse
from sparse_helpers import assert_close, inputs, make_dictionary

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU kernel")


def _needs_kernel():
  if not cpu_kernels.available():
    if shutil.which("c++") or shutil.which("g++"):
      pytest.fail("a C++ compiler is here but the CPU kernels did not build")
    pytest.skip("no C++ compiler: the XLA path is used (tested by test_sparse)")


@settings(max_examples=30, deadline=None)
@given(n=st.sampled_from([1, 3, 17]), b=st.sampled_from([1, 15, 16, 33, 200]),
       kb=st.sampled_from([1, 4, 64]), density=st.sampled_from([0.0, 0.02, 0.5, 1.0]),
       seed=st.integers(0, 2**16))
def test_kernel_equals_numpy_compaction(n, b, kb, density, seed):
  _needs_kernel()
  rng = np.random.default_rng(seed)
  thr = rng.normal(size=b).astype(np.float32)
  pre = np.where(rng.random((n, b)) < density, thr + rng.random((n, b)).astype(np.float32) + 1e-3,
                 thr - rng.random((n, b)).astype(np.float32)).astype(np.float32)
  # Edge values: exactly at the threshold is inactive, NaN is inactive, +inf is active.
  pre[0, 0] = thr[0]
  if b > 2:
    pre[0, 1], pre[0, 2] = np.nan, np.inf
  v, c, count = jax.jit(cpu_kernels.select_active, static_argnums=2)(pre, thr, kb)
  act = pre > thr
  np.testing.assert_array_equal(count, act.sum(-1))
  for r in range(n):
    cols = np.nonzero(act[r])[0][:kb]
    m = len(cols)
    np.testing.assert_array_equal(np.asarray(c[r, :m]), cols)
    np.testing.assert_array_equal(np.asarray(v[r, :m]), pre[r, cols])
    assert not np.asarray(v[r, m:]).any() and not np.asarray(c[r, m:]).any()


REGIMES = {"empty": 50.0, "sparse": 2.0, "busy": 0.7, "dense": -3.0}


@settings(max_examples=12, deadline=None)
@given(regime=st.sampled_from(sorted(REGIMES)), n=st.sampled_from([1, 9]),
       width=st.sampled_from([64, 1024]), bw=st.sampled_from([16, 64, 1024]),
       bk=st.sampled_from([2, 8]), k=st.sampled_from([4, 40]),
       dtype=st.sampled_from(["float32", "bfloat16"]), seed=st.integers(0, 10_000))
def test_kernel_and_top_k_selection_find_the_same_latents(regime, n, width, bw, bk, k,
                                                          dtype, seed):
  _needs_kernel()
  bw = min(bw, width)
  d = make_dictionary(seed, 12, width, dtype=dtype, threshold=REGIMES[regime])
  x = inputs(seed, (n,), 12)

  def select(how):  # Same blocks and weight reads; only the selection differs.
    plan = sparse.make_plan(d, n, k, backend="cpu", impl="xla", block_width=bw,
                            block_k=bk, select=how)
    return jax.jit(lambda d, x: sparse.select_blocks(d, x, plan))(d, x)

  kv, ki, kfill, kcount, klost = select("ffi")
  tv, ti, tfill, tcount, tlost = select("top_k")
  for a, b in ((kfill, tfill), (kcount, tcount), (klost, tlost)):
    np.testing.assert_array_equal(a, b)
  for r in np.nonzero(~np.asarray(klost))[0]:  # Rows whose buffers hold every active latent.
    m = int(kfill[r])
    got = sorted(zip(np.asarray(ki[r, :m]).tolist(), np.asarray(kv[r, :m]).tolist()))
    want = sorted(zip(np.asarray(ti[r, :m]).tolist(), np.asarray(tv[r, :m]).tolist()))
    assert got == want


@settings(max_examples=20, deadline=None)
@given(r=st.sampled_from([1, 5, 64]), c=st.sampled_from([1, 7, 300]),
       frac=st.floats(0.0, 1.0), start=st.integers(-5, 400), seed=st.integers(0, 2**16))
def test_widening_kernels_equal_numpy_slices(r, c, frac, start, seed):
  _needs_kernel()
  rng = np.random.default_rng(seed)
  w = jnp.asarray(rng.normal(size=(r, c)) * 10.0 ** rng.integers(-30, 30, (r, c)),
                  jnp.bfloat16)
  wf = np.asarray(w.astype(jnp.float32))
  b = max(1, int(frac * c))
  s = min(max(start, 0), c - b)  # Starts clamp like lax.dynamic_slice.
  np.testing.assert_array_equal(cpu_kernels.widen_columns(w, start, b), wf[:, s:s + b])
  rb = max(1, int(frac * r))
  s = min(max(start, 0), r - rb)
  np.testing.assert_array_equal(cpu_kernels.widen_rows(w, start, rb), wf[s:s + rb])
  idx = rng.integers(-3, r + 3, (2, 3)).astype(np.int32)
  np.testing.assert_array_equal(cpu_kernels.gather_rows(w, jnp.asarray(idx)),
                                wf[np.clip(idx, 0, r - 1)])


@settings(max_examples=25, deadline=None)
@given(n=st.sampled_from([1, 3, 8, 33]), r=st.sampled_from([1, 7, 8, 9, 40]),
       c=st.sampled_from([1, 16, 17, 300, 20000]), frac=st.floats(0.0, 1.0),
       start=st.integers(-5, 20_005), seed=st.integers(0, 2**16))
def test_matmul_bf16_equals_numpy(n, r, c, frac, start, seed):
  # Row counts around the 8-row blocks, column counts around the 16-column vectors, and
  # 20000 columns: several tiles per thread at 8 and 33 rows.
  _needs_kernel()
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, r)).astype(np.float32)
  w = jnp.asarray(rng.normal(size=(r, c)), jnp.bfloat16)
  b = max(1, int(frac * c))
  s = min(max(start, 0), c - b)
  wf = np.asarray(w.astype(jnp.float32), np.float64)[:, s:s + b]
  want = x.astype(np.float64) @ wf
  # float32 accumulation over r terms, in any order.
  bound = 2 * r * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(wf)) + 1e-30
  for target in ("dictlearn_matmul_bf16", _portable_matmul_target()):
    got = np.asarray(jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((n, b), jnp.float32))(
        x, w, np.int32(start)))
    assert np.all(np.abs(got - want) <= bound), target


@functools.cache
def _portable_matmul_target() -> str:
  """matmul_bf16 built without the AVX2 path (what non-x86 CPUs run), registered for tests."""
  lib = ctypes.cdll.LoadLibrary(str(cpu_kernels._build(("DICTLEARN_PORTABLE",))))
  jax.ffi.register_ffi_target("test_matmul_bf16_portable",
                              jax.ffi.pycapsule(lib.DictlearnMatmulBf16), platform="cpu")
  return "test_matmul_bf16_portable"


@pytest.mark.parametrize("n, fused", [(1, True), (cpu_kernels.MATMUL_BF16_ROWS, True),
                                      (cpu_kernels.MATMUL_BF16_ROWS + 1, False)])
def test_bf16_encoder_reads_weights_in_place_for_few_rows(n, fused):
  # Few rows: matmul_bf16 over the whole width; more: widened float32 blocks. Both equal
  # forward, overflowed rows included (their spill pass uses blocks sized for copies).
  _needs_kernel()
  d = make_dictionary(5, 128, 16384, kind="affine", dtype="bfloat16", threshold=3.5)
  x = inputs(5, (n,), 128) * jnp.where(jnp.arange(n) % 3 == 0, 4.0, 1.0)[:, None]
  fn = jax.jit(lambda d, x: dl.encode_decode(d, x, k=16))
  hlo = fn.lower(d, x).as_text()
  assert ("dictlearn_matmul_bf16" in hlo) == fused
  assert "dictlearn_widen_columns" in hlo  # The spill pass widens copied blocks.
  p = sparse.make_plan(d, n, 16, backend="cpu")
  assert p.weights == ("in_place" if fused else "copy") and p.spill_weights == "copy"
  assert p.block_width == d.width or not fused  # 8 MiB of w_enc: one block only in place.
  assert (p.spill_block_width < d.width
          and p.spill_block_width * 4 * d.d_in <= sparse.cpu_weight_bytes(n))
  y, codes = fn(d, x)
  assert np.asarray(codes.overflow).any()
  f32 = d.astype(jnp.float32)
  assert_close(y, dl.forward(f32, x), 1e-5)
  np.testing.assert_array_equal(codes.count, (dl.encode(f32, x) != 0).sum(-1))


@settings(max_examples=8, deadline=None)
@given(regime=st.sampled_from(sorted(REGIMES)), kind=st.sampled_from(["sae", "affine"]),
       dtype=st.sampled_from(["float32", "bfloat16"]), seed=st.integers(0, 10_000))
def test_xla_path_without_kernels_equals_forward(regime, kind, dtype, seed):
  # The path GPUs and TPUs take, and CPUs without a compiler: no custom calls at all.
  d = make_dictionary(seed, 12, 256, kind=kind, dtype=dtype, threshold=REGIMES[regime])
  x = inputs(seed, (9,), 12)
  plan = sparse.make_plan(d, 9, 8, backend="cpu", impl="xla", block_width=64, block_k=4,
                          spill_rows=3, use_cpu_kernels=False)
  assert plan.weights == "slice" and plan.select != "ffi" and not plan.widen_dec
  fn = jax.jit(lambda d, x: dl.encode_decode(d, x, k=8, plan=plan))
  assert "custom_call" not in fn.lower(d, x).as_text()
  y, codes = fn(d, x)
  want = jax.jit(dl.forward)(d, x)
  np.testing.assert_allclose(y, want, rtol=0, atol=1e-5 * max(1.0, float(jnp.abs(want).max())))
  np.testing.assert_array_equal(codes.count, (dl.encode(d, x) != 0).sum(-1))


def test_unavailable_kernel_warns_and_falls_back(monkeypatch):
  def broken():
    raise RuntimeError("no compiler in this test")
  monkeypatch.setattr(cpu_kernels, "_build", broken)
  cpu_kernels.available.cache_clear()
  try:
    with pytest.warns(UserWarning, match="using XLA ops instead"):
      assert not cpu_kernels.available()
    monkeypatch.setenv("DICTLEARN_CPU_KERNELS", "0")
    cpu_kernels.available.cache_clear()
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      assert not cpu_kernels.available()  # Switched off on purpose: no warning.
  finally:
    monkeypatch.undo()
    cpu_kernels.available.cache_clear()
