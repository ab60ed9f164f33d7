"""encode_decode / encode_sparse / decode_sparse against the dense reference.

Exact for every input (overflowed rows included), any leading shape, f32 and bf16, SAEs
and (affine) transcoders, under vmap and jit, without recompiling for repeated shapes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import dictlearn as dl
from dictlearn import sparse
from sparse_helpers import (assert_close, check_codes, inputs, make_dictionary,
                            margin_ok, tolerance)

# Density regimes (threshold around which latents fire, see make_dictionary): rows empty,
# sparse, a few dozen active (overflows small k), nearly all active.
REGIMES = {"empty": 50.0, "sparse": 2.0, "busy": 0.7, "dense": -3.0}


@st.composite
def cases(draw):
  kind = draw(st.sampled_from(["sae", "transcoder", "affine"]))
  d_in = draw(st.sampled_from([2, 5, 16, 33]))
  width = draw(st.sampled_from([8, 37, 256, 1024]))
  regime = draw(st.sampled_from(sorted(REGIMES)))
  dtype = draw(st.sampled_from(["float32", "bfloat16"]))
  compute = draw(st.sampled_from(["float32", dtype]))
  shape = draw(st.sampled_from([(), (1,), (5,), (2, 3), (33,)]))
  k = draw(st.sampled_from([1, 4, 16, 40]))
  block_width = draw(st.sampled_from([None, None, 16, 48, 128]))
  block_k = draw(st.sampled_from([None, 2, 8]))
  seed = draw(st.integers(0, 10_000))
  d = make_dictionary(seed, d_in, width, kind=kind, dtype=dtype, threshold=REGIMES[regime])
  return d, inputs(seed, shape, d_in), k, block_width, block_k, jnp.dtype(compute)


@settings(max_examples=8)
@given(cases())
def test_encode_decode_equals_forward_and_codes_are_the_nonzeros(case):
  d, x, k, bw, bk, cd = case
  assume(margin_ok(d, x, cd))
  y, codes = dl.encode_decode(d, x, k=k, block_width=bw, block_k=bk, compute_dtype=cd,
                              spill_rows=3)
  tol = tolerance(cd)
  assert y.shape == x.shape[:-1] + (d.d_out,) and y.dtype == jnp.float32
  assert codes.values.shape == x.shape[:-1] + (k,) and codes.count.shape == x.shape[:-1]
  assert codes.indices.dtype == jnp.int32 and codes.overflow.dtype == jnp.bool_
  assert_close(y, dl.forward(d, x, compute_dtype=cd), tol)
  check_codes(codes, dl.encode(d, x, compute_dtype=cd), k, tol)


@settings(max_examples=4)
@given(cases())
def test_decode_sparse_of_encode_sparse_is_forward(case):
  d, x, k, bw, bk, cd = case
  assume(margin_ok(d, x, cd))
  tol = tolerance(cd)
  codes = dl.encode_sparse(d, x, k=k, block_width=bw, block_k=bk, compute_dtype=cd)
  check_codes(codes, dl.encode(d, x, compute_dtype=cd), k, tol)
  # Exact on every row that did not overflow (an overflowed row keeps only k latents).
  y = dl.decode_sparse(d, codes, x, compute_dtype=cd)
  keep = ~np.asarray(codes.overflow)[..., None]
  want = dl.forward(d, x, compute_dtype=cd)
  assert_close(np.where(keep, y, 0), np.where(keep, want, 0), tol)


@pytest.mark.parametrize("kind", ["sae", "affine"])
def test_overflow_rows_are_exact_and_flagged(kind):
  # Rows alternate between empty and nearly-all-active; spill_rows=2 forces several
  # spill steps, the wide blocks take the grouped selection path.
  d = make_dictionary(1, 24, 2048, kind=kind, threshold=2.5)
  x = inputs(1, (9,), 24) * jnp.asarray([0.0, 1.0, 8.0] * 3)[:, None]
  y, codes = dl.encode_decode(d, x, k=16, block_width=512, block_k=4, spill_rows=2)
  f = dl.encode(d, x)
  assert np.asarray(codes.overflow).any() and not np.asarray(codes.overflow).all()
  assert_close(y, dl.forward(d, x), 1e-5)
  check_codes(codes, f, 16, 1e-5)
  # One block over the whole width, few slots: the grouped (two-stage) selection.
  y, codes = dl.encode_decode(d, x, k=4)
  assert_close(y, dl.forward(d, x), 1e-5)
  check_codes(codes, f, 4, 1e-5)


def test_width_not_divisible_by_block_uses_overlapping_blocks():
  d = make_dictionary(2, 12, 250, threshold=1.5)
  x = inputs(2, (6,), 12)
  for bw in (64, 249):
    y, codes = dl.encode_decode(d, x, k=32, block_width=bw)
    assert_close(y, dl.forward(d, x), 1e-5)
    check_codes(codes, dl.encode(d, x), 32, 1e-5)


def test_plan_blocks_respects_budget_and_divides_width():
  bw, bk = sparse.plan_blocks(1, 1152, 65536, 128, backend="cpu")
  assert bw == 65536 and bk == 128  # One token: one block, no weight slices.
  for n in (128, 1024):
    bw, bk = sparse.plan_blocks(n, 1152, 65536, 128, backend="cpu")
    assert 65536 % bw == 0 and bw < 65536 and bw * 4 * n <= sparse.CPU_PRE_BYTES
    assert bw * 4 * 1152 <= sparse.cpu_weight_bytes(n) and 1 <= bk <= min(128, bw)
  bw, _ = sparse.plan_blocks(4096, 1152, 1 << 20, 128, backend="gpu")
  assert 4 * 4096 * bw <= sparse.GPU_BLOCK_BYTES
  assert sparse.plan_blocks(8, 4, 7, 3, block_width=100)[0] == 7
  # bf16 on CPU: read in place, only the pre-activations bound a block; widened copies
  # are bounded by the weight budget too, and never span the width when it is too big.
  plan = lambda n, width, mode: sparse.plan_blocks(n, 1152, width, 128, backend="cpu",
                                                   weights=mode)[0]
  assert plan(1, 65536, "in_place") == 65536 and plan(32, 1 << 20, "in_place") == 65536
  assert plan(1, 65536, "copy") * 4 * 1152 <= sparse.cpu_weight_bytes(1)
  with pytest.raises(ValueError, match="weights must be"):
    plan(1, 64, "dense")


def _shaped(d_in, width, dtype="float32", d_out=None):
  """A dictionary of ShapeDtypeStructs: make_plan reads only shapes and dtypes."""
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
  d_out = d_out or d_in
  return dl.Transcoder(w_enc=s(d_in, width), b_enc=s(width), threshold=s(width),
                       w_dec=s(width, d_out), b_dec=s(d_out), w_skip=None)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 1 << 16), d_in=st.integers(1, 8192),
       width=st.one_of(st.integers(1, 1 << 21), st.sampled_from([1 << 14, 1 << 16, 1 << 20])),
       k=st.integers(1, 1024), backend=st.sampled_from(["cpu", "gpu", "tpu"]),
       dtype=st.sampled_from(["float32", "bfloat16"]))
def test_planned_blocks_fit_the_budgets_and_cover_the_width(n, d_in, width, k, backend,
                                                            dtype):
  p = sparse.make_plan(_shaped(d_in, width, dtype), n, k, backend=backend, impl="xla")
  cpu = backend == "cpu"
  assert p.width == width and p.k == k and p.impl == "xla"
  # The spill pass plans its own (copy-sized, spill_rows) blocks only when the encoder
  # reads w_enc in place; else it reuses the encoder's blocks, planned for n rows.
  spill_rows = p.spill_rows if p.weights == "in_place" else n
  for bw, rows, mode in ((p.block_width, n, p.weights),
                         (p.spill_block_width, spill_rows, p.spill_weights)):
    assert 1 <= bw <= width
    # The blocks j * bw, clamped to end at the width, cover every column exactly once
    # after the overlap mask (``valid_from``): starts step by bw and the last ends at width.
    nb = -(-width // bw)
    starts = np.minimum(np.arange(nb) * bw, width - bw)
    assert starts[0] == 0 and starts[-1] + bw == width
    assert np.all(np.diff(starts) <= bw) and np.all(np.diff(starts) > 0)
    one = 4 * rows * width <= (sparse.CPU_ONE_BLOCK_BYTES if cpu else sparse.GPU_BLOCK_BYTES)
    if bw == width and one and mode != "copy":
      continue  # One block: within the one-block budget.
    # Else a power-of-two cap within the budgets (at least 128 columns).
    cap = (sparse.CPU_PRE_BYTES if cpu else sparse.GPU_BLOCK_BYTES) // (4 * rows)
    if cpu and mode != "in_place":
      cap = min(cap, sparse.cpu_weight_bytes(rows) // (4 * d_in))
    assert bw <= max(128, cap), (bw, cap)
  assert 1 <= p.block_k <= min(k, p.block_width)
  assert 1 <= p.spill_rows <= n
  assert 1 <= p.decode_chunk <= k
  row_bytes = 4 * d_in * n
  assert (p.decode_chunk == 1 or p.decode_chunk == k or p.decode_chunk * row_bytes
          <= (sparse.CPU_DECODE_BYTES if cpu else sparse.GPU_DECODE_BYTES))
  if not cpu:  # The CPU kernels are for CPUs only.
    assert p.weights == p.spill_weights == "slice" and p.select != "ffi" and not p.widen_dec
  if p.select == "grouped":
    assert p.block_width % 16 == 0


def test_plan_is_a_static_argument_and_refuses_impossible_paths():
  d = make_dictionary(8, 16, 256, threshold=1.8)
  x = inputs(8, (5,), 16)
  p = sparse.make_plan(d, 5, 8, block_width=64, select="top_k", spill_rows=2)
  assert hash(p) == hash(sparse.make_plan(d, 5, 8, block_width=64, select="top_k",
                                          spill_rows=2))
  y, codes = jax.jit(lambda d, x: dl.encode_decode(d, x, k=8, plan=p))(d, x)
  assert_close(y, dl.forward(d, x), 1e-5)
  check_codes(codes, dl.encode(d, x), 8, 1e-5)
  with pytest.raises(ValueError, match="not both"):
    dl.encode_decode(d, x, k=8, plan=p, block_width=64)
  with pytest.raises(ValueError, match="k=8"):
    dl.encode_sparse(d, x, k=9, plan=p)
  with pytest.raises(ValueError, match="select="):
    sparse.make_plan(d, 5, 8, backend="gpu", select="ffi")
  with pytest.raises(ValueError, match="select="):
    sparse.make_plan(d, 5, 8, block_width=40, select="grouped")
  with pytest.raises(ValueError, match="weights="):
    sparse.make_plan(d, 5, 8, weights="in_place")  # float32 weights: nothing to widen.


@pytest.mark.parametrize("select", ["top_k", "grouped"])
def test_forced_selection_paths_equal_forward(select):
  # Few rows over one wide block: both XLA selections, with overflowing rows.
  d = make_dictionary(9, 24, 2048, kind="affine", threshold=2.5)
  x = inputs(9, (6,), 24) * jnp.asarray([0.0, 1.0, 8.0] * 2)[:, None]
  p = sparse.make_plan(d, 6, 16, select=select, use_cpu_kernels=False)
  assert p.select == select and p.block_width == 2048
  y, codes = dl.encode_decode(d, x, k=16, plan=p)
  assert np.asarray(codes.overflow).any()
  assert_close(y, dl.forward(d, x), 1e-5)
  check_codes(codes, dl.encode(d, x), 16, 1e-5)


def test_vmap_and_inside_a_jitted_model():
  d = make_dictionary(3, 16, 256, kind="affine", threshold=1.8)
  x = inputs(3, (4, 5), 16)
  ys, codes = jax.vmap(lambda xi: dl.encode_decode(d, xi, k=24))(x)
  assert_close(ys, dl.forward(d, x), 1e-5)
  check_codes(codes, dl.encode(d, x), 24, 1e-5)

  @jax.jit
  def model(d, x):  # A block that feeds the transcoder's output on.
    h = jnp.tanh(x)
    y, c = dl.encode_decode(d, h, k=24)
    return jnp.tanh(y), c.count.sum()
  out, total = model(d, x)
  assert_close(out, jnp.tanh(dl.forward(d, jnp.tanh(x))), 1e-5)
  assert int(total) == int((dl.encode(d, jnp.tanh(x)) != 0).sum())


def test_repeated_calls_with_the_same_shapes_never_recompile():
  compiles = []

  def listen(event, duration, **_):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(duration)
  d = make_dictionary(4, 16, 512, threshold=2.0)
  xs = [inputs(seed, (7,), 16) for seed in range(4)]
  ds = [make_dictionary(seed, 16, 512, threshold=2.0) for seed in range(1, 4)]
  x8 = inputs(0, (8,), 16)
  dl.encode_decode(d, xs[0], k=8)
  dl.encode_sparse(d, xs[0], k=8)
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    for seed, d2 in enumerate(ds, 1):  # New values, new dictionary values, same shapes.
      jax.block_until_ready(dl.encode_decode(d2, xs[seed], k=8))
      jax.block_until_ready(dl.encode_decode(d2, xs[seed], k=8, compute_dtype=np.float32))
      jax.block_until_ready(dl.encode_sparse(d2, xs[seed], k=8))
    assert not compiles
    jax.block_until_ready(dl.encode_decode(d, x8, k=8))  # A new shape compiles once more.
    assert len(compiles) == 1
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


def test_donation_gives_the_same_result():
  d = make_dictionary(5, 16, 128, threshold=1.5)
  x = inputs(5, (6,), 16)
  want = dl.forward(d, x)
  y, _ = dl.encode_decode(d, jnp.array(x), k=32, donate=True)
  assert_close(y, want, 1e-5)


def test_errors_are_clear():
  d = make_dictionary(6, 8, 32)
  with pytest.raises(ValueError, match="d_in=8"):
    dl.encode_decode(d, jnp.zeros((3, 9)))
  with pytest.raises(ValueError, match="k must be"):
    dl.encode_decode(d, jnp.zeros((3, 8)), k=0)
  with pytest.raises(ValueError, match="impl"):
    dl.encode_decode(d, jnp.zeros((3, 8)), impl="cuda")
  t = make_dictionary(6, 8, 32, kind="affine")
  codes = dl.encode_sparse(t, jnp.ones((2, 8)), k=4)
  with pytest.raises(ValueError, match="skip"):
    dl.decode_sparse(t, codes)


def test_empty_batch_and_sparse_codes_pytree():
  d = make_dictionary(7, 8, 32)
  y, codes = dl.encode_decode(d, jnp.zeros((0, 8)), k=4)
  assert y.shape == (0, 8) and codes.values.shape == (0, 4)
  leaves = jax.tree_util.tree_leaves(codes)
  assert len(leaves) == 4
  dense = dl.encode_sparse(d, inputs(7, (3,), 8), k=32).to_dense(32)
  assert_close(dense, dl.encode(d, inputs(7, (3,), 8)), 1e-5)
