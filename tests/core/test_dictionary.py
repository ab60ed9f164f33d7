"""Properties of the core dictionary math: JumpReLU, encode/decode/forward, shapes, dtypes."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import dictlearn as dl

# Few distinct shapes: each new shape costs XLA compilations, and these cover the edges
# (a single feature, a single latent, odd and wider sizes).
dims = st.sampled_from([1, 3, 8, 17])
widths = st.sampled_from([1, 5, 32])


@st.composite
def dictionaries(draw, kind=None):
  kind = kind or draw(st.sampled_from(["sae", "transcoder", "affine"]))
  d_in, width = draw(dims), draw(widths)
  d_out = d_in if kind == "sae" else draw(dims)
  seed = draw(st.integers(0, 2**16))
  ks = jax.random.split(jax.random.key(seed), 6)
  n = lambda k, s, scale=1.0: scale * jax.random.normal(k, s, jnp.float32)
  w = dict(w_enc=n(ks[0], (d_in, width)), b_enc=n(ks[1], (width,), 0.3),
           threshold=jnp.abs(n(ks[2], (width,), 0.5)), w_dec=n(ks[3], (width, d_out)),
           b_dec=n(ks[4], (d_out,), 0.3))
  if kind == "sae":
    return dl.JumpReLUSAE(**w)
  return dl.Transcoder(**w, w_skip=n(ks[5], (d_in, d_out)) if kind == "affine" else None)


def inputs(d, batch_shape, seed=0):
  return jax.random.normal(jax.random.key(seed), (*batch_shape, d.d_in), jnp.float32)


@given(dictionaries(), st.integers(0, 1000))
def test_jumprelu_zero_at_or_below_threshold_and_pre_above(d, seed):
  x = inputs(d, (7,), seed)
  pre = np.asarray(dl.pre_activations(d, x))
  f = np.asarray(dl.encode(d, x))
  thr = np.asarray(d.threshold)
  assert np.all(f[pre <= thr] == 0)
  np.testing.assert_array_equal(f[pre > thr], pre[pre > thr])


def test_threshold_boundary_is_exclusive():
  # A pre-activation exactly equal to its threshold must give 0 (pre > threshold).
  d = dl.JumpReLUSAE(w_enc=jnp.eye(3), b_enc=jnp.zeros(3), threshold=jnp.array([1.0, 2.0, 0.5]),
                     w_dec=jnp.eye(3), b_dec=jnp.zeros(3))
  f = dl.encode(d, jnp.array([1.0, 2.5, 0.5]))
  np.testing.assert_array_equal(f, [0.0, 2.5, 0.0])


def numpy_forward(d, x):
  """JumpReLU forward in float64 numpy: (pre, f, y), written out independently."""
  w = {name: np.asarray(getattr(d, name), np.float64)
       for name in ("w_enc", "b_enc", "threshold", "w_dec", "b_dec")}
  x = np.asarray(x, np.float64)
  pre = x @ w["w_enc"] + w["b_enc"]
  f = np.where(pre > w["threshold"], pre, 0.0)
  y = f @ w["w_dec"] + w["b_dec"]
  if getattr(d, "w_skip", None) is not None:
    y = y + x @ np.asarray(d.w_skip, np.float64)
  return pre, f, y


def _margin_ok(pre, thr, rel=1e-4):
  """No pre-activation so close to its threshold that float32 rounding could flip it."""
  return bool(np.all(np.abs(pre - thr) > rel * (1.0 + np.abs(pre))))


@given(dictionaries(), st.integers(0, 1000))
def test_forward_encode_decode_equal_numpy_jumprelu(d, seed):
  x = inputs(d, (3, 5), seed)
  pre, f, y = numpy_forward(d, x)
  assume(_margin_ok(pre, np.asarray(d.threshold, np.float64)))
  scale = lambda a: 1e-5 * max(1.0, float(np.abs(a).max(initial=0.0)))
  np.testing.assert_allclose(dl.encode(d, x), f, rtol=0, atol=scale(f))
  np.testing.assert_allclose(dl.forward(d, x), y, rtol=0, atol=scale(y))
  np.testing.assert_allclose(dl.decode(d, jnp.asarray(f, jnp.float32), x), y, rtol=0,
                             atol=scale(y))


@given(dictionaries(), st.integers(0, 1000))
def test_batch_shape_and_composition_do_not_change_a_row(d, seed):
  x = inputs(d, (4, 6), seed)
  full = dl.forward(d, x)
  assert full.shape == (4, 6, d.d_out)
  # The same row alone, inside another batch, and flattened, gives the same result.
  other = jnp.concatenate([inputs(d, (5,), seed + 1), x[2, 3:4]], axis=0)
  np.testing.assert_allclose(dl.forward(d, x[2, 3]), full[2, 3], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dl.forward(d, other)[-1], full[2, 3], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dl.forward(d, x.reshape(24, -1)).reshape(full.shape), full,
                             rtol=1e-5, atol=1e-5)


@given(dictionaries(), st.integers(0, 1000))
def test_jit_and_vmap_agree_with_eager(d, seed):
  x = inputs(d, (3, 4), seed)
  eager = dl.forward(d, x)
  np.testing.assert_allclose(jax.jit(dl.forward)(d, x), eager, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.vmap(dl.forward, in_axes=(None, 0))(d, x), eager,
                             rtol=1e-5, atol=1e-5)


@given(dims, st.integers(0, 1000))
def test_orthonormal_dictionary_with_zero_thresholds_reconstructs(d_in, seed):
  # Columns [Q, -Q] with threshold 0: relu(z) - relu(-z) = z, so x = Q Q^T x exactly.
  q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(seed), (d_in, d_in)))
  sae = dl.JumpReLUSAE(w_enc=jnp.concatenate([q, -q], 1), b_enc=jnp.zeros(2 * d_in),
                       threshold=jnp.zeros(2 * d_in), w_dec=jnp.concatenate([q.T, -q.T], 0),
                       b_dec=jnp.zeros(d_in))
  x = jax.random.normal(jax.random.key(seed + 1), (9, d_in))
  np.testing.assert_allclose(dl.forward(sae, x), x, rtol=1e-5, atol=1e-5)


def test_gradients_flow_through_active_latents():
  d = dl.random_dictionary(jax.random.key(0), 8, 16)
  x = jax.random.normal(jax.random.key(1), (5, 8))
  g = jax.grad(lambda d: jnp.sum(dl.forward(d, x) ** 2))(d)
  assert float(jnp.abs(g.w_dec).sum()) > 0 and float(jnp.abs(g.w_enc).sum()) > 0


def test_bfloat16_weights_are_computed_in_float32():
  d = dl.random_dictionary(jax.random.key(0), 64, 256, kind="transcoder", affine=True,
                           threshold=0.1)
  d = d.replace(w_skip=jax.random.normal(jax.random.key(2), (64, 64)) / 8)
  x = jax.random.normal(jax.random.key(1), (4, 64))
  bf = d.astype(jnp.bfloat16)
  assert bf.w_enc.dtype == jnp.bfloat16
  # The reference: float64 math on the bf16-rounded weights (numpy_forward upcasts them).
  pre, _, want = numpy_forward(bf, x)
  assert _margin_ok(pre, np.asarray(bf.threshold, np.float64))  # Fixed keys: no tie.
  y = dl.forward(bf, x)
  assert y.dtype == jnp.float32
  scale = max(1.0, float(np.abs(want).max()))
  # compute_dtype float32 (the default): float32 rounding only, although the weights are
  # bf16 (x is not rounded to bf16, products are not bf16).
  err32 = float(np.abs(np.asarray(y, np.float64) - want).max()) / scale
  assert err32 < 1e-5
  # bf16 operands (the fast option) round x and f to bf16: visibly less exact, still close.
  ybf = dl.forward(bf, x, compute_dtype=jnp.bfloat16)
  assert ybf.dtype == jnp.float32
  errbf = float(np.abs(np.asarray(ybf, np.float64) - want).max()) / scale
  assert 1e-4 < errbf < 0.1


def test_affine_transcoder_decode_needs_input():
  t = dl.random_dictionary(jax.random.key(0), 6, 10, kind="transcoder", d_out=4, affine=True)
  f = dl.encode(t, jnp.ones((2, 6)))
  with pytest.raises(ValueError, match=r"decode\(d, f, x\)"):
    dl.decode(t, f)
  assert dl.decode(t, f, jnp.ones((2, 6))).shape == (2, 4)


def test_big_bf16_weights_on_cpu_warn_and_small_ones_do_not():
  # Shapes only: check_input looks at dtype and size, so nothing is allocated.
  def shaped(d_in, width, dtype):
    s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
    return dl.JumpReLUSAE(w_enc=s(d_in, width), b_enc=s(width), threshold=s(width),
                          w_dec=s(width, d_in), b_dec=s(d_in))
  x = jnp.ones((2, 1024))
  if jax.default_backend() == "cpu":
    with pytest.warns(UserWarning, match=r"d.astype\(jnp.float32\)"):
      dl.dictionary.check_input(shaped(1024, 32768, jnp.bfloat16), x)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    dl.dictionary.check_input(shaped(1024, 32768, jnp.float32), x)
    dl.dictionary.check_input(shaped(1024, 1024, jnp.bfloat16), x)


def test_wrong_input_width_is_a_clear_error():
  d = dl.random_dictionary(jax.random.key(0), 8, 16,
                           meta=dl.DictMeta(site="resid_post", layer=22))
  with pytest.raises(ValueError, match=r"resid_post\(22\).*d_in=8.*\(3, 5\)"):
    dl.encode(d, jnp.ones((3, 5)))


@pytest.mark.parametrize("name,shape,pattern", [
    ("b_enc", (7,), "b_enc must have shape"),
    ("threshold", (16, 1), "threshold must have shape"),
    ("w_dec", (15, 8), "w_dec must have shape"),
    ("b_dec", (9,), "b_dec must have shape"),
])
def test_inconsistent_shapes_are_refused(name, shape, pattern):
  d = dl.random_dictionary(jax.random.key(0), 8, 16)
  with pytest.raises(ValueError, match=pattern):
    d.replace(**{name: jnp.zeros(shape)}).validate()


def test_sae_must_reconstruct_its_input_width():
  d = dl.random_dictionary(jax.random.key(0), 8, 16)
  with pytest.raises(ValueError, match="Transcoder"):
    d.replace(w_dec=jnp.zeros((16, 5)), b_dec=jnp.zeros(5)).validate()


def test_non_finite_weights_are_refused_when_checked():
  d = dl.random_dictionary(jax.random.key(0), 4, 8)
  bad = d.replace(w_enc=d.w_enc.at[0, 0].set(jnp.nan))
  bad.validate()  # Shape checks alone pass.
  with pytest.raises(ValueError, match="w_enc has non-finite"):
    bad.validate(check_finite=True)


def test_dictionaries_are_pytrees_with_static_meta():
  meta = dl.DictMeta(site="mlp_in", layer=3, kind="transcoder")
  t = dl.random_dictionary(jax.random.key(0), 4, 8, kind="transcoder", affine=True, meta=meta)
  leaves, treedef = jax.tree_util.tree_flatten(t)
  assert len(leaves) == 6
  back = jax.tree_util.tree_unflatten(treedef, leaves)
  assert back.meta == meta and isinstance(back, dl.Transcoder)
  assert len(jax.tree_util.tree_leaves(dl.random_dictionary(jax.random.key(0), 4, 8))) == 5
