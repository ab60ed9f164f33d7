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
  bw, bk = sparse.plan_blocks(1024, 1152, 65536, 128, backend="cpu")
  assert 65536 % bw == 0 and bw * 4 * 1024 <= sparse._CPU_PRE_BYTES
  assert bw * 4 * 1152 <= sparse._cpu_weight_bytes(1024) and 1 <= bk <= min(128, bw)
  assert sparse.plan_blocks(128, 1152, 65536, 128, backend="cpu")[0] == 1024
  bw, _ = sparse.plan_blocks(4096, 1152, 1 << 20, 128, backend="gpu")
  assert 4 * 4096 * bw <= sparse._GPU_BLOCK_BYTES
  assert sparse.plan_blocks(8, 4, 7, 3, block_width=100)[0] == 7
  # bf16 on CPU: read in place, only the pre-activations bound a block; widened copies
  # are bounded by the weight budget too, and never span the width when it is too big.
  plan = lambda n, width, mode: sparse.plan_blocks(n, 1152, width, 128, backend="cpu",
                                                   weights=mode)[0]
  assert plan(1, 65536, "in_place") == 65536 and plan(32, 1 << 20, "in_place") == 65536
  assert plan(1, 65536, "copy") * 4 * 1152 <= sparse._cpu_weight_bytes(1)
  with pytest.raises(ValueError, match="weights must be"):
    plan(1, 64, "dense")


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
  d = make_dictionary(4, 16, 512, threshold=2.0)
  dl.encode_decode(d, inputs(0, (7,), 16), k=8)
  dl.encode_sparse(d, inputs(0, (7,), 16), k=8)
  before = sparse._run_jit._cache_size()
  for seed in range(1, 4):  # New values, new dictionary values, same shapes.
    d2 = make_dictionary(seed, 16, 512, threshold=2.0)
    jax.block_until_ready(dl.encode_decode(d2, inputs(seed, (7,), 16), k=8))
    jax.block_until_ready(dl.encode_decode(d2, inputs(seed, (7,), 16), k=8,
                                           compute_dtype=np.float32))
    jax.block_until_ready(dl.encode_sparse(d2, inputs(seed, (7,), 16), k=8))
  assert sparse._run_jit._cache_size() == before
  dl.encode_decode(d, inputs(0, (8,), 16), k=8)  # A new shape compiles once more.
  assert sparse._run_jit._cache_size() == before + 1


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
