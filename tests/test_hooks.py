"""Hooks on a tiny hooked penzai model: capture, splice, steer, ablate, clamp.

Properties: capturing changes nothing; an exact dictionary spliced anywhere changes
nothing; coefficient-0 steering changes nothing; splice leaves BOS alone; results are the
same jitted or not, KV-cached or not, alone or in a (left-padded) batch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from penzai import pz
from penzai.models.transformer import sampling_mode
from penzai.toolshed import jit_wrapper

import dictlearn
from dictlearn.sites import KINDS as SITE_KINDS
from dictlearn_penzai import hooks, layers, sites
from dictlearn_penzai.sites import Site

from penzai_tiny import D_MODEL, VOCAB, tiny_model

SEQ = 8
ATTN_Z = 16  # 2 kv heads x 2 queries each x head_dim 4
token_lists = st.lists(st.integers(1, VOCAB - 1), min_size=SEQ - 1, max_size=SEQ - 1)


@pytest.fixture(scope="module")
def model():
  return tiny_model()


def _ids(rest, bos=2):
  return np.asarray([[bos, *rest]], np.int32)


def _logits(model, ids, jit=True, **side):
  return np.asarray(hooks.call(model, ids, jit=jit, **side).unwrap("batch", "seq", "vocabulary"))


def test_compiled_calls_write_back_captures_and_never_copy_the_weights(model):
  """Parameters go in frozen and come back untouched (the same arrays, not copies
  written back), while a capture's state variable is updated as under pz.variable_jit."""
  params = pz.unbind_params(model)[1]
  before = [p.value for p in params]
  logits, cache = hooks.run_with_cache(model, _ids(range(1, SEQ)), ["resid_post.0"])
  eager = hooks.run_with_cache(model, _ids(range(1, SEQ)), ["resid_post.0"], jit=False)[1]
  assert all(p.value is v for p, v in zip(params, before))
  np.testing.assert_allclose(cache.array("resid_post.0"), eager.array("resid_post.0"),
                             rtol=1e-5, atol=1e-6)


def exact_sae(d, site, seed=0):
  """An SAE that reconstructs every input exactly: columns [Q, -Q], threshold 0.

  JumpReLU with threshold 0 is ReLU here, and ReLU(z) - ReLU(-z) = z, so decoding with
  rows [Q^T; -Q^T] gives x Q Q^T = x.
  """
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
  w_enc = np.concatenate([q, -q], axis=1).astype(np.float32)
  return dictlearn.JumpReLUSAE(
      w_enc=jnp.asarray(w_enc), b_enc=jnp.zeros(2 * d), threshold=jnp.zeros(2 * d),
      w_dec=jnp.asarray(w_enc.T), b_dec=jnp.zeros(d),
      meta=dictlearn.DictMeta(site=site.kind, layer=site.layer))


def rand_sae(site, d=D_MODEL, width=32, seed=0):
  return dictlearn.random_dictionary(jax.random.key(seed), d, width, threshold=0.1,
                                     meta=dictlearn.DictMeta(site=site.kind, layer=site.layer))


def rand_tc(layer, seed=1, affine=True):
  d = dictlearn.random_dictionary(
      jax.random.key(seed), D_MODEL, 32, kind="transcoder", affine=affine,
      meta=dictlearn.DictMeta(kind="transcoder", site="mlp_in", layer=layer))
  if affine:
    d = d.replace(w_skip=0.1 * jax.random.normal(jax.random.key(seed + 7), (D_MODEL, D_MODEL)))
  return d


# ------------------------------------------------------------------ capture


def test_run_with_cache_axes_and_keys(model):
  want = [sites.resid_pre(0), sites.attn_z(1), sites.attn_out(1), sites.resid_mid(2),
          sites.mlp_in(2), sites.mlp_out(3), sites.resid_post(3)]
  logits, cache = hooks.run_with_cache(model, _ids(range(3, 3 + SEQ - 1)), want)
  assert logits.named_shape == {"batch": 1, "seq": SEQ, "vocabulary": VOCAB}
  assert set(cache) == set(want)
  for s in want:
    axis = "attn_z" if s.kind == "attn_z" else "embedding"
    v = cache[s]
    assert tuple(v.named_shape) == ("batch", "seq", axis), v.named_shape
    assert v.named_shape[axis] == (ATTN_Z if s.kind == "attn_z" else D_MODEL)
    assert cache[str(s)] is v and s in cache and str(s) in cache
    assert cache.array(s).shape == (1, SEQ, v.named_shape[axis])
  assert "resid_post.9" not in cache
  with pytest.raises(KeyError, match="was not captured"):
    cache["resid_post.0"]
  # Residual bookkeeping ties the sites together: resid_mid = resid_pre + attn_out, etc.
  _, c = hooks.run_with_cache(model, _ids(range(3, 3 + SEQ - 1)),
                              ["resid_pre.1", "attn_out.1", "resid_mid.1", "mlp_out.1",
                               "resid_post.1", "resid_post.0"])
  a = {k: np.asarray(c.array(k)) for k in c.names()}
  np.testing.assert_allclose(a["resid_pre.1"], a["resid_post.0"], rtol=1e-6)
  np.testing.assert_allclose(a["resid_mid.1"], a["resid_pre.1"] + a["attn_out.1"], atol=1e-5)
  np.testing.assert_allclose(a["resid_post.1"], a["resid_mid.1"] + a["mlp_out.1"], atol=1e-5)


def test_attn_z_is_o_proj_input_in_o_proj_order(model):
  """attn_z flattened head-major: o_proj(attn_z) reproduces attn_out's pre-norm input."""
  ids = _ids(range(4, 4 + SEQ - 1))
  _, c = hooks.run_with_cache(model, ids, ["attn_z.2"])
  block = [s for s in model.body.sublayers if hasattr(s, "sublayers") and any(
      isinstance(h, sites.HookPoint) for h in s.sublayers)][2]
  attn = block.sublayers[1].delta.sublayers[1]
  o_proj = attn.attn_value_to_output.sublayers[-1]
  w = o_proj.weights.value  # axes head_groups, query_heads, projection, embedding
  flat_w = np.asarray(w.unwrap("head_groups", "query_heads", "projection", "embedding")).reshape(
      ATTN_Z, D_MODEL)
  z = np.asarray(c.array("attn_z.2"))
  # Re-run o_proj through penzai on the value split back into head axes: z @ W agrees.
  heads = pz.nx.wrap(jnp.asarray(z).reshape(1, SEQ, 2, 2, 4)).tag(
      "batch", "seq", "head_groups", "query_heads", "projection")
  np.testing.assert_array_equal(
      np.asarray(layers.features(heads).unwrap("batch", "seq", "attn_z")), z)
  via_penzai = np.asarray(o_proj(heads).unwrap("batch", "seq", "embedding"))
  np.testing.assert_allclose(z @ flat_w, via_penzai, rtol=1e-4, atol=1e-5)


@settings(max_examples=10)
@given(rest=token_lists)
def test_capture_does_not_change_logits(model, rest):
  ids = _ids(rest)
  clean = _logits(model, ids)
  every_kind = [Site(k, 1 + i % 3) for i, k in enumerate(SITE_KINDS)]
  logits, _ = hooks.run_with_cache(model, ids, every_kind)
  np.testing.assert_allclose(np.asarray(logits.unwrap("batch", "seq", "vocabulary")), clean,
                             rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ splice


@pytest.mark.parametrize("kind", ["resid_pre", "attn_z", "attn_out", "resid_mid", "mlp_in",
                                  "mlp_out", "resid_post"])
def test_exact_dictionary_splice_leaves_logits_unchanged(model, kind):
  site = Site(kind, 1)
  d = ATTN_Z if kind == "attn_z" else D_MODEL
  sae = exact_sae(d, site)
  x = np.random.default_rng(0).normal(size=(5, d)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(dictlearn.forward(sae, x)), x, atol=1e-5)
  ids = _ids(range(7, 7 + SEQ - 1))
  patched = hooks.splice(model, sae, skip_bos=False)
  np.testing.assert_allclose(_logits(patched, ids), _logits(model, ids), rtol=1e-4, atol=1e-4)


@settings(max_examples=10)
@given(rest=token_lists)
def test_splice_leaves_bos_alone(model, rest):
  site = sites.resid_post(1)
  ids = _ids(rest)
  patched = hooks.splice(model, rand_sae(site))
  clean_l, clean_c = hooks.run_with_cache(model, ids, [site])
  l, c = hooks.run_with_cache(patched, ids, [site])
  x, y = np.asarray(clean_c.array(site)), np.asarray(c.array(site))
  np.testing.assert_array_equal(y[:, 0], x[:, 0])
  # Elsewhere the site holds the reconstruction.
  recon = np.asarray(dictlearn.forward(rand_sae(site), x))
  np.testing.assert_allclose(y[:, 1:], recon[:, 1:], rtol=1e-5, atol=1e-5)
  # The logits at position 0 only see position 0: unchanged.
  np.testing.assert_allclose(np.asarray(l.unwrap("batch", "seq", "vocabulary"))[:, 0],
                             np.asarray(clean_l.unwrap("batch", "seq", "vocabulary"))[:, 0],
                             rtol=1e-6, atol=1e-6)
  # skip_bos=False replaces BOS too.
  _, c2 = hooks.run_with_cache(hooks.splice(model, rand_sae(site), skip_bos=False), ids, [site])
  np.testing.assert_allclose(np.asarray(c2.array(site))[:, 0], recon[:, 0], rtol=1e-5, atol=1e-5)


def test_transcoder_splice_reads_mlp_in_and_replaces_mlp_out(model):
  tc = rand_tc(2)
  ids = _ids(range(9, 9 + SEQ - 1))
  _, clean = hooks.run_with_cache(model, ids, ["mlp_in.2", "mlp_out.2"])
  patched = hooks.splice(model, tc)
  assert set(hooks.hooks_at(patched)) == {sites.mlp_in(2), sites.mlp_out(2)}
  _, c = hooks.run_with_cache(patched, ids, ["mlp_in.2", "mlp_out.2"])
  x_in = np.asarray(c.array("mlp_in.2"))
  np.testing.assert_array_equal(x_in, np.asarray(clean.array("mlp_in.2")))
  want = np.asarray(dictlearn.forward(tc, x_in))
  out = np.asarray(c.array("mlp_out.2"))
  np.testing.assert_allclose(out[:, 1:], want[:, 1:], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out[:, 0], np.asarray(clean.array("mlp_out.2"))[:, 0])
  # The stash is emptied by its reader: state between calls is always None.
  (stash,) = [h for h in hooks.hooks_at(patched)[sites.mlp_in(2)]]
  assert stash.slot.value is None
  # An explicit (input, output) pair works as well.
  again = hooks.splice(model, tc, site=("mlp_in.2", "mlp_out.2"))
  np.testing.assert_allclose(_logits(again, ids), _logits(patched, ids), atol=1e-6)


# ------------------------------------------------------------------ steer / ablate / clamp


@settings(max_examples=10)
@given(direction=st.lists(st.floats(-3, 3), min_size=D_MODEL, max_size=D_MODEL).filter(
    lambda v: np.linalg.norm(v) > 1e-3), scale=st.sampled_from(["norm", "none"]))
def test_zero_coefficient_steering_changes_nothing(model, direction, scale):
  ids = _ids(range(11, 11 + SEQ - 1))
  patched = hooks.steer(model, "resid_post.1", np.asarray(direction), 0.0, scale=scale)
  np.testing.assert_allclose(_logits(patched, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)


def test_steering_adds_the_direction(model):
  site = sites.resid_mid(2)
  ids = _ids(range(12, 12 + SEQ - 1))
  direction = np.random.default_rng(3).normal(size=D_MODEL).astype(np.float32)
  _, clean = hooks.run_with_cache(model, ids, [site])
  x = np.asarray(clean.array(site))
  for scale, coeff in (("norm", 0.7), ("none", 2.0)):
    _, c = hooks.run_with_cache(hooks.steer(model, site, direction, coeff, scale=scale), ids,
                                [site])
    y = np.asarray(c.array(site))
    if scale == "norm":
      add = coeff * np.linalg.norm(x, axis=-1, keepdims=True) * direction
    else:
      add = coeff * direction
    np.testing.assert_allclose(y[:, 1:], (x + add)[:, 1:], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y[:, 0], x[:, 0])
  with pytest.raises(ValueError, match="has 3 entries but the site carries 16"):
    hooks.steer(model, site, np.ones(3), 1.0)
  with pytest.raises(ValueError, match="scale must be"):
    hooks.steer(model, site, direction, 1.0, scale="unit")


def test_steer_attn_z_uses_flat_o_proj_axis(model):
  ids = _ids(range(13, 13 + SEQ - 1))
  direction = np.zeros(ATTN_Z, np.float32)
  direction[5] = 1.0
  _, clean = hooks.run_with_cache(model, ids, ["attn_z.0"])
  _, c = hooks.run_with_cache(hooks.steer(model, "attn_z.0", direction, 3.0, scale="none"), ids,
                              ["attn_z.0"])
  diff = np.asarray(c.array("attn_z.0")) - np.asarray(clean.array("attn_z.0"))
  np.testing.assert_allclose(diff[0, 1:, 5], 3.0, rtol=1e-6)
  assert np.abs(np.delete(diff[0, 1:], 5, axis=-1)).max() < 1e-6


def test_ablate_and_clamp_keep_the_error(model):
  site = sites.resid_post(2)
  sae = rand_sae(site, seed=4)
  ids = _ids(range(14, 14 + SEQ - 1))
  _, clean = hooks.run_with_cache(model, ids, [site])
  x = jnp.asarray(clean.array(site))
  f = dictlearn.encode(sae, x)
  chosen = [int(i) for i in np.argsort(-np.asarray(f[0, 1:]).max(0))[:3]]
  # Ablating nothing changes nothing.
  none = hooks.ablate(model, sae, [])
  np.testing.assert_array_equal(_logits(none, ids), _logits(model, ids))
  _, c = hooks.run_with_cache(hooks.ablate(model, sae, chosen), ids, [site])
  f_cut = f.at[..., jnp.asarray(chosen)].set(0.0)
  want = x + dictlearn.decode(sae, f_cut) - dictlearn.decode(sae, f)
  y = np.asarray(c.array(site))
  np.testing.assert_allclose(y[:, 1:], np.asarray(want)[:, 1:], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(y[:, 0], np.asarray(x)[:, 0])
  assert np.abs(y - np.asarray(x)).max() > 1e-3  # the chosen latents were active
  _, c = hooks.run_with_cache(hooks.clamp(model, sae, chosen, [5.0, 0.0, 1.0]), ids, [site])
  f_set = f.at[..., jnp.asarray(chosen)].set(jnp.asarray([5.0, 0.0, 1.0]))
  want = x + dictlearn.decode(sae, f_set) - dictlearn.decode(sae, f)
  np.testing.assert_allclose(np.asarray(c.array(site))[:, 1:], np.asarray(want)[:, 1:],
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="latent indices must be in 0..31"):
    hooks.ablate(model, sae, [40])


def test_transcoder_ablation_edits_mlp_out(model):
  tc = rand_tc(1, seed=5)
  ids = _ids(range(15, 15 + SEQ - 1))
  _, clean = hooks.run_with_cache(model, ids, ["mlp_in.1", "mlp_out.1"])
  x_in = jnp.asarray(clean.array("mlp_in.1"))
  f = dictlearn.encode(tc, x_in)
  _, c = hooks.run_with_cache(hooks.ablate(model, tc, [0, 1, 2, 3]), ids, ["mlp_out.1"])
  delta = dictlearn.decode(tc, f.at[..., :4].set(0.0), x_in) - dictlearn.decode(tc, f, x_in)
  want = np.asarray(clean.array("mlp_out.1") + delta)
  np.testing.assert_allclose(np.asarray(c.array("mlp_out.1"))[:, 1:], want[:, 1:], atol=1e-5)


# ------------------------------------------------------------------ composition & modes


def _composed(model):
  m = hooks.splice(model, rand_sae(sites.resid_post(0)))
  m = hooks.splice(m, rand_tc(2))
  m = hooks.steer(m, "attn_z.1", np.linspace(-1, 1, ATTN_Z), 0.4)
  m = hooks.ablate(m, rand_sae(sites.resid_mid(3), seed=2), [0, 5, 7])
  return hooks.clamp(m, rand_sae(sites.resid_post(0), seed=3), [1], 2.0)


def test_hooks_compose_in_order(model):
  m = hooks.steer(model, "resid_post.1", np.ones(D_MODEL), 1.0, scale="none")
  m = hooks.steer(m, "resid_post.1", np.ones(D_MODEL), 2.0, scale="none")
  m = hooks.capture(m, ["resid_post.1"])
  at = hooks.hooks_at(m)[sites.resid_post(1)]
  assert [type(h).__name__ for h in at] == ["Steer", "Steer", "Capture"]
  ids = _ids(range(16, 16 + SEQ - 1))
  _, clean = hooks.run_with_cache(model, ids, ["resid_post.1"])
  hooks.call(m, ids)
  got = np.asarray(hooks.read_cache(m).array("resid_post.1"))
  np.testing.assert_allclose(got[:, 1:], np.asarray(clean.array("resid_post.1"))[:, 1:] + 3.0,
                             rtol=1e-5)
  assert hooks.remove_hooks(m) == model
  assert sites.resid_post(1) not in hooks.hooks_at(hooks.remove_hooks(m, "resid_post.1"))


def test_same_results_jitted_and_eager(model):
  m = _composed(model)
  ids = _ids(range(17, 17 + SEQ - 1))
  l1, c1 = hooks.run_with_cache(m, ids, ["attn_z.0", "mlp_out.2"], jit=True)
  l2, c2 = hooks.run_with_cache(m, ids, ["attn_z.0", "mlp_out.2"], jit=False)
  np.testing.assert_allclose(np.asarray(l1.unwrap("batch", "seq", "vocabulary")),
                             np.asarray(l2.unwrap("batch", "seq", "vocabulary")),
                             rtol=1e-4, atol=1e-4)
  for s in c1:
    np.testing.assert_allclose(np.asarray(c1.array(s)), np.asarray(c2.array(s)), atol=1e-4)


def test_same_results_kv_cached(model):
  """Prefill then one token at a time through KV-cached sampling mode == one full pass."""
  m = _composed(model)
  ids = _ids(range(18, 18 + SEQ - 1))
  full = _logits(m, ids)
  kv = sampling_mode.KVCachingTransformerLM.from_uncached(m, cache_len=16,
                                                          batch_axes={"batch": 1})
  kv = pz.select(kv).at(lambda r: r.body).apply(jit_wrapper.Jitted)
  outs = [kv(hooks.as_tokens(ids[:, :3]))]
  for t in range(3, SEQ):
    outs.append(kv(hooks.as_tokens(ids[:, t:t + 1])))
  cached = np.concatenate([np.asarray(o.unwrap("batch", "seq", "vocabulary")) for o in outs], 1)
  np.testing.assert_allclose(cached, full, rtol=1e-4, atol=1e-4)
  # ... and the hooks matter in those decode steps: without them the logits differ.
  assert np.abs(_logits(model, ids)[:, 3:] - full[:, 3:]).max() > 1e-3


def test_batch_composition_and_left_padding(model):
  """A sequence's result does not depend on what else is in the batch, or on left padding."""
  m = _composed(model)
  rng = np.random.default_rng(0)
  a = _ids(rng.integers(3, VOCAB, SEQ - 1))
  b = _ids(rng.integers(3, VOCAB, SEQ - 1))
  alone = _logits(m, a)
  both = _logits(m, np.concatenate([b, a]))
  np.testing.assert_allclose(both[1:], alone, rtol=1e-4, atol=1e-4)
  # Left-pad a shorter prompt; positions mark padding -1 and its BOS 0.
  short = a[:, :5]
  pad = 3
  padded = np.concatenate([np.zeros((1, pad), np.int32), short], 1)
  positions = np.concatenate([-np.ones(pad, np.int32), np.arange(5, dtype=np.int32)])[None]
  batch_ids = np.concatenate([padded, b[:, :pad + 5]])
  batch_pos = np.concatenate([positions, np.arange(pad + 5, dtype=np.int32)[None]])
  got = _logits(m, batch_ids, token_positions=hooks.as_tokens(batch_pos))
  np.testing.assert_allclose(got[0, pad:], _logits(m, short)[0], rtol=1e-4, atol=1e-4)
  # Without explicit positions they come from the pad id (0), left or right padding alike.
  np.testing.assert_allclose(_logits(m, batch_ids), got, rtol=1e-6, atol=1e-6)
  right = np.concatenate([short, np.zeros((1, pad), np.int32)], 1)
  np.testing.assert_allclose(_logits(m, right)[0, :5], _logits(m, short)[0], rtol=1e-4,
                             atol=1e-4)


def test_dictionary_layers_wrap_the_core(model):
  site = sites.resid_post(1)
  sae = rand_sae(site)
  layer = layers.SAELayer(dictionary=sae)
  _, c = hooks.run_with_cache(model, _ids(range(3, 3 + SEQ - 1)), [site])
  x = c[site]
  f = layer.encode(x)
  assert f.named_shape == {"batch": 1, "seq": SEQ, "latents": 32}
  np.testing.assert_allclose(np.asarray(f.unwrap("batch", "seq", "latents")),
                             np.asarray(dictlearn.encode(sae, c.array(site))), rtol=1e-6)
  y = layer.decode(f)
  np.testing.assert_allclose(np.asarray(y.unwrap("batch", "seq", "embedding")),
                             np.asarray(dictlearn.forward(sae, c.array(site))), rtol=1e-5,
                             atol=1e-6)
  assert layer(x).named_shape == x.named_shape
  tc = layers.dictionary_layer(rand_tc(1))
  assert isinstance(tc, layers.TranscoderLayer)
  f = tc.encode(x)
  np.testing.assert_allclose(
      np.asarray(tc.decode(f, x).unwrap("batch", "seq", "embedding")),
      np.asarray(dictlearn.forward(tc.dictionary, c.array(site))), rtol=1e-5, atol=1e-6)
  # attn_z values keep their head axes through SAELayer.__call__.
  _, cz = hooks.run_with_cache(model, _ids(range(3, 3 + SEQ - 1)), ["attn_z.0"])
  flat = cz["attn_z.0"]
  _, _, restore = layers.to_features(flat)
  zl = layers.SAELayer(dictionary=exact_sae(ATTN_Z, sites.attn_z(0)))
  assert zl.encode(flat).named_shape["latents"] == 2 * ATTN_Z
  # treescope renders the layer (and the dictionary inside it) without error.
  import treescope
  assert "SAELayer" in treescope.render_to_text(layer)


def test_hooks_in_kv_cached_generation(model):
  """The adapter's generate (a jitted while loop over a KV-cached model) runs the hooks in
  every step: greedy tokens equal argmax over full uncached passes of the patched model."""
  sampling = pytest.importorskip("dictlearn_penzai.sampling")
  m = _composed(model)
  prompt = _ids([5, 9, 4])
  new = 5
  got = sampling.generate_tokens(m, prompt, max_new_tokens=new, stop_ids=())
  # Causal: trailing filler does not change earlier logits, so one fixed length (one
  # compilation) serves every step.
  seq = np.concatenate([prompt, np.ones((1, new), np.int32)], 1)
  for t in range(prompt.shape[1], prompt.shape[1] + new):
    logits = _logits(m, seq)[:, t - 1].copy()
    logits[:, 0] = -np.inf  # generate never emits the pad id
    seq[:, t] = logits.argmax(-1)
  np.testing.assert_array_equal(got, seq[:, prompt.shape[1]:])
  # The transcoder's stash is empty again after generation.
  stashes = [h for hs in hooks.hooks_at(m).values() for h in hs if isinstance(h, layers.Stash)]
  assert stashes and all(s.slot.value is None for s in stashes)


def test_on_the_tiny_gemma3():
  """The same invariants on the adapter's own Gemma 3 (QK-norm, merged heads, windows)."""
  dp = pytest.importorskip("dictlearn_penzai")
  config = dp.get_preset("tiny")
  m = dp.from_gemma_params(dp.init_gemma_params(config, seed=3), preset=config)
  d, z = config.d_model, config.num_heads * config.head_dim
  ids = np.asarray([[2, 17, 30, 99, 5, 250, 7, 8, 41]], np.int32)
  _, clean = hooks.run_with_cache(m, ids, ["attn_z.6", "resid_post.6"])
  assert clean["attn_z.6"].named_shape == {"batch": 1, "seq": 9, "attn_z": z}
  assert hooks.site_width(m, sites.attn_z(0)) == z
  exact = hooks.splice(hooks.splice(m, exact_sae(z, sites.attn_z(3)), skip_bos=False),
                       exact_sae(d, sites.mlp_out(5)))
  np.testing.assert_allclose(_logits(exact, ids), _logits(m, ids), rtol=1e-4, atol=1e-4)
  tc = dictlearn.random_dictionary(
      jax.random.key(0), d, 64, kind="transcoder", affine=True, threshold=0.05,
      meta=dictlearn.DictMeta(kind="transcoder", site="mlp_in", layer=4))
  patched = hooks.steer(hooks.splice(m, tc), "attn_z.1", np.ones(z), 0.5)
  prompt = ids[:, :4]
  got = dp.generate_tokens(patched, prompt, max_new_tokens=4, stop_ids=())
  seq = np.concatenate([prompt, np.ones((1, 4), np.int32)], 1)
  for t in range(4, 8):
    logits = _logits(patched, seq)[:, t - 1].copy()
    logits[:, 0] = -np.inf
    seq[:, t] = logits.argmax(-1)
  np.testing.assert_array_equal(got, seq[:, 4:])
  with pytest.raises(ValueError, match="layer 7 is out of range: this model has 7 layers"):
    hooks.splice(m, tc, site="mlp_in.7")
