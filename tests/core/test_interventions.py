"""dictlearn.interventions, driven through a toy model in plain JAX (no framework): what
a second adapter needs, and nothing more. Plus: the fused path equals the dense one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import dictlearn
from dictlearn import interventions as iv
from dictlearn import sites
from dictlearn.sites import Site

D, VOCAB, LAYERS = 16, 50, 2


# ----------------------------------------------------------------- a toy model in plain JAX


def toy_params(seed=0):
  ks = jax.random.split(jax.random.key(seed), 2 + 3 * LAYERS)
  n = lambda k, shape, s=1.0: s * jax.random.normal(k, shape) / np.sqrt(shape[0])  # noqa: E731
  return dict(embed=n(ks[0], (VOCAB, D), np.sqrt(VOCAB)), unembed=n(ks[1], (D, VOCAB)),
              blocks=[dict(attn=n(ks[2 + 3 * i], (D, D)), w1=n(ks[3 + 3 * i], (D, 2 * D)),
                           w2=n(ks[4 + 3 * i], (2 * D, D))) for i in range(LAYERS)])


def toy_forward(params, tokens, positions, hooks=None):
  """Logits (batch, seq, vocab); ``hooks[site](x, positions) -> x`` run at each named site.

  A causal running mean stands for attention (padding, position < 0, is not attended to).
  """
  hooks = hooks or {}

  def at(kind, layer, x):
    fn = hooks.get(Site(kind, layer))
    return x if fn is None else fn(x, positions)

  x = params["embed"][tokens]
  valid = (positions >= 0)[..., None].astype(x.dtype)
  for layer, p in enumerate(params["blocks"]):
    x = at("resid_pre", layer, x)
    mean = jnp.cumsum(x * valid, axis=-2) / jnp.maximum(jnp.cumsum(valid, axis=-2), 1.0)
    attn = at("attn_out", layer, jnp.tanh(mean @ p["attn"]))
    x = at("resid_mid", layer, x + attn)
    h = at("mlp_in", layer, x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6))
    x = at("resid_post", layer, x + at("mlp_out", layer, jax.nn.gelu(h @ p["w1"]) @ p["w2"]))
  return x @ params["unembed"]


def capture(params, tokens, positions, wanted):
  """The values at the ``wanted`` sites of a clean run."""
  got = {}

  def record(site):
    def fn(x, _):
      got[site] = x
      return x
    return fn
  toy_forward(params, tokens, positions, {s: record(s) for s in wanted})
  return got


def splice_hooks(d, read=None):
  """What an adapter does: capture the read site, replace the write site."""
  src, dst = sites.read_write(d, read)
  seen = {}

  def stash(x, _):
    seen["x"] = x
    return x

  def write(x, positions):
    return iv.splice(d, seen.get("x", x), x, iv.active_positions(positions))
  return {src: stash, dst: write} if src != dst else {dst: write}


# A batch with a left-padded row: [pad, pad, BOS, ...] next to an unpadded one.
TOKENS = jnp.array([[2, 7, 9, 11, 13, 15, 17], [0, 0, 2, 8, 10, 12, 14]])
POSITIONS = iv.positions_from_padding(TOKENS, pad_id=0)


def exact_sae(d=D, seed=0, layer=1, kind="resid_post"):
  """[Q, -Q] with threshold 0 reconstructs every input exactly."""
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
  w_enc = np.concatenate([q, -q], axis=1).astype(np.float32)
  return dictlearn.JumpReLUSAE(
      w_enc=jnp.asarray(w_enc), b_enc=jnp.zeros(2 * d), threshold=jnp.zeros(2 * d),
      w_dec=jnp.asarray(w_enc.T), b_dec=jnp.zeros(d),
      meta=dictlearn.DictMeta(site=kind, layer=layer))


def random_sae(seed, site, width=64, threshold=0.2):
  return dictlearn.random_dictionary(jax.random.key(seed), D, width, threshold=threshold,
                                     meta=dictlearn.DictMeta(site=site.kind, layer=site.layer))


@pytest.fixture(scope="module")
def params():
  return toy_params()


def test_positions_and_mask_rule():
  np.testing.assert_array_equal(POSITIONS, [[0, 1, 2, 3, 4, 5, 6], [-1, -1, 0, 1, 2, 3, 4]])
  np.testing.assert_array_equal(iv.active_positions(POSITIONS), POSITIONS > 0)
  np.testing.assert_array_equal(iv.active_positions(POSITIONS, skip_bos=False), POSITIONS >= 0)
  np.testing.assert_array_equal(iv.positions_from_padding(TOKENS[:1], None), [np.arange(7)])


@pytest.mark.parametrize("kind", ["resid_pre", "attn_out", "resid_mid", "resid_post"])
def test_splicing_an_exact_dictionary_changes_nothing(params, kind):
  clean = toy_forward(params, TOKENS, POSITIONS)
  out = toy_forward(params, TOKENS, POSITIONS, splice_hooks(exact_sae(kind=kind)))
  np.testing.assert_allclose(out, clean, atol=1e-5)


def test_neutral_edits_change_nothing(params):
  site = sites.resid_post(0)
  sae = random_sae(1, site)
  clean = toy_forward(params, TOKENS, POSITIONS)
  for fn in (lambda x, p: iv.steer(x, jnp.ones(D), 0.0, iv.active_positions(p)),
             lambda x, p: iv.edit_latents(sae, x, mask=iv.active_positions(p)),
             lambda x, p: iv.edit_latents(sae, x, ablate=(), clamp={})):
    out = toy_forward(params, TOKENS, POSITIONS, {site: fn})
    np.testing.assert_array_equal(out, clean)


def test_steering_matches_the_formula_and_spares_bos_and_padding(params):
  site = sites.resid_mid(1)
  x = capture(params, TOKENS, POSITIONS, [site])[site]
  direction = jax.random.normal(jax.random.key(3), (D,))
  for scale, coeff in (("norm", 0.3), ("none", 2.0)):
    seen = {}

    def hook(v, p, scale=scale, coeff=coeff):
      seen["y"] = iv.steer(v, direction, coeff, iv.active_positions(p), scale)
      return seen["y"]
    toy_forward(params, TOKENS, POSITIONS, {site: hook})
    y = np.asarray(seen["y"])
    size = np.linalg.norm(np.asarray(x), axis=-1, keepdims=True) if scale == "norm" else 1.0
    want = np.asarray(x) + coeff * size * np.asarray(direction)
    keep = np.asarray(POSITIONS) > 0
    np.testing.assert_allclose(y[keep], want[keep], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y[~keep], np.asarray(x)[~keep])  # BOS and padding


def test_splice_mask_leaves_bos_and_padding_alone(params):
  site = sites.resid_post(0)
  sae = random_sae(2, site)
  x = capture(params, TOKENS, POSITIONS, [site])[site]
  y = iv.splice(sae, x, mask=iv.active_positions(POSITIONS))
  keep = np.asarray(POSITIONS) > 0
  np.testing.assert_array_equal(np.asarray(y)[~keep], np.asarray(x)[~keep])
  np.testing.assert_allclose(np.asarray(y)[keep],
                             np.asarray(dictlearn.forward(sae, x))[keep], atol=1e-5)


def test_transcoder_splice_writes_its_output_site(params):
  tc = dictlearn.random_dictionary(jax.random.key(4), D, 48, kind="transcoder", affine=True,
                                   threshold=0.1,
                                   meta=dictlearn.DictMeta(kind="transcoder", site="mlp_in",
                                                           layer=1))
  tc = tc.replace(w_skip=0.1 * jax.random.normal(jax.random.key(5), (D, D)))
  got = capture(params, TOKENS, POSITIONS, [sites.mlp_in(1), sites.mlp_out(1)])
  seen = {}

  def record(x, _):
    seen["out"] = x
    return x
  hooks = splice_hooks(tc)
  write = hooks[sites.mlp_out(1)]
  hooks[sites.mlp_out(1)] = lambda x, p: record(write(x, p), p)
  toy_forward(params, TOKENS, POSITIONS, hooks)
  keep = np.asarray(POSITIONS) > 0
  want = np.asarray(dictlearn.forward(tc, got[sites.mlp_in(1)]))
  np.testing.assert_allclose(np.asarray(seen["out"])[keep], want[keep], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(seen["out"])[~keep],
                                np.asarray(got[sites.mlp_out(1)])[~keep])
  with pytest.raises(ValueError, match="pass target="):
    iv.splice(tc.replace(w_dec=tc.w_dec[:, :8], b_dec=tc.b_dec[:8], w_skip=tc.w_skip[:, :8]),
              got[sites.mlp_in(1)])


# --------------------------------------------------------------------- fused == dense


def _dense_edit(d, x_in, target, ablate, clamp, keep_error):
  f = dictlearn.encode(d, x_in)
  f2 = f
  for i in ablate:
    f2 = f2.at[..., i].set(0.0)
  for i, v in clamp.items():
    f2 = f2.at[..., i].set(v)
  if keep_error:
    return target + dictlearn.decode(d, f2, x_in) - dictlearn.decode(d, f, x_in)
  return dictlearn.decode(d, f2, x_in)


@settings(max_examples=12)
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["sae", "transcoder"]),
       width=st.sampled_from([32, 256]), threshold=st.sampled_from([0.0, 0.3, 1.0]),
       dtype=st.sampled_from(["float32", "bfloat16"]), n_edit=st.integers(0, 4),
       keep_error=st.booleans())
def test_fused_interventions_equal_the_dense_reference(seed, kind, width, threshold, dtype,
                                                       n_edit, keep_error):
  rng = np.random.default_rng(seed)
  d = dictlearn.random_dictionary(jax.random.key(seed), D, width, kind=kind,
                                  affine=kind == "transcoder", threshold=threshold)
  d = d.replace(b_enc=jnp.asarray(rng.normal(0, 0.3, width), jnp.float32)).astype(dtype)
  x = jnp.asarray(rng.normal(size=(2, 5, D)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(2, 5, D)), jnp.float32)
  mask = jnp.asarray(rng.random((2, 5)) < 0.7)
  want = jnp.where(mask[..., None], dictlearn.forward(d, x), target)
  np.testing.assert_allclose(iv.splice(d, x, target, mask), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(iv.splice(d, x, target, mask, fused=False), want, rtol=1e-5,
                             atol=1e-5)
  latents = rng.choice(width, size=n_edit, replace=False).tolist()
  ablate, clamp = latents[: n_edit // 2], {i: float(rng.normal(2, 1)) for i in latents[n_edit // 2:]}
  got = iv.edit_latents(d, x, target, ablate=ablate, clamp=clamp, mask=mask,
                        keep_error=keep_error)
  want = jnp.where(mask[..., None], _dense_edit(d, x, target, ablate, clamp, keep_error), target)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_bf16_values_keep_their_dtype_and_untouched_positions_are_bit_exact():
  sae = random_sae(6, sites.resid_post(0))
  x = jax.random.normal(jax.random.key(7), (3, 4, D)).astype(jnp.bfloat16)
  mask = jnp.array([False, True, True, False])
  for y in (iv.splice(sae, x, mask=mask), iv.steer(x, jnp.ones(D), 0.5, mask),
            iv.edit_latents(sae, x, ablate=[1, 2], mask=mask)):
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    np.testing.assert_array_equal(np.asarray(y[:, ~mask], np.float32),
                                  np.asarray(x[:, ~mask], np.float32))


def test_bad_edits_are_clear_errors():
  sae = random_sae(8, sites.resid_post(0))
  x = jnp.zeros((1, 3, D))
  with pytest.raises(ValueError, match="both ablated and clamped"):
    iv.edit_latents(sae, x, ablate=[1], clamp={1: 2.0})
  with pytest.raises(ValueError, match="latent indices must be in 0..63"):
    iv.edit_latents(sae, x, ablate=[64])
  with pytest.raises(ValueError, match="direction has shape"):
    iv.steer(x, jnp.ones(3), 1.0)
  with pytest.raises(ValueError, match="scale must be"):
    iv.steer(x, jnp.ones(D), 1.0, scale="raw")
  with pytest.raises(ValueError, match="mask has shape"):
    iv.splice(sae, x, mask=jnp.ones((2,), bool))
  with pytest.raises(ValueError, match="expects x_in with last axis d_in=16"):
    iv.splice(sae, jnp.zeros((1, 3, 5)))
