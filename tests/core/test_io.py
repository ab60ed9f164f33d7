"""Loading and saving: Gemma Scope 2/1 layouts, SAELens parity, the hub cache, bad files."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import dictlearn as dl
from dictlearn import io

FIXTURES = Path(__file__).parents[1] / "fixtures"


def _same(a, b):
  assert type(a) is type(b) and a.meta.kind == b.meta.kind
  for name in ("w_enc", "b_enc", "threshold", "w_dec", "b_dec", "w_skip"):
    x, y = getattr(a, name), getattr(b, name)
    assert (x is None) == (y is None), name
    if x is not None:
      assert x.dtype == y.dtype, name
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


@given(kind=st.sampled_from(["sae", "transcoder", "affine"]),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       d_in=st.sampled_from([1, 4, 9]), width=st.sampled_from([1, 6, 40]),
       seed=st.integers(0, 999))
def test_save_load_round_trip_is_bit_exact(tmp_path_factory, kind, dtype, d_in, width, seed):
  meta = dl.DictMeta(kind="sae" if kind == "sae" else "transcoder", site="mlp_in", layer=4,
                     model_name="gemma-v3-270m-pt", l0=17.5)
  d = dl.random_dictionary(jax.random.key(seed), d_in, width,
                           kind="sae" if kind == "sae" else "transcoder",
                           d_out=d_in if kind == "sae" else d_in + 1, affine=kind == "affine",
                           threshold=0.25, dtype=dtype, meta=meta)
  d = d.replace(b_enc=jax.random.normal(jax.random.key(seed + 1), (width,)).astype(dtype))
  folder = dl.save(d, tmp_path_factory.mktemp("d") / "dict")
  back = dl.load(folder)
  _same(d, back)
  assert (back.meta.site, back.meta.layer, back.meta.l0) == ("mlp_in", 4, 17.5)
  assert back.meta.model_name == "gemma-v3-270m-pt"
  # Saving what was loaded writes the same files again.
  again = dl.save(back, folder.parent / "again")
  assert json.loads((again / "config.json").read_text()) == json.loads(
      (folder / "config.json").read_text())


def test_config_carries_site_and_hook_points(tmp_path):
  t = dl.random_dictionary(jax.random.key(0), 6, 8, kind="transcoder", d_out=6, affine=True,
                           meta=dl.DictMeta(kind="transcoder", site="mlp_in", layer=9))
  cfg = json.loads((dl.save(t, tmp_path) / "config.json").read_text())
  assert cfg["hf_hook_point_in"] == "model.layers.9.pre_feedforward_layernorm.output"
  assert cfg["hf_hook_point_out"] == "model.layers.9.post_feedforward_layernorm.output"
  assert cfg["affine_connection"] is True and cfg["type"] == "transcoder"
  assert cfg["architecture"] == "jump_relu" and cfg["width"] == 8
  back = dl.load(tmp_path)
  assert (back.meta.site, back.meta.site_out, back.meta.layer) == ("mlp_in", "mlp_out", 9)


@pytest.mark.parametrize("name", ["sae", "transcoder_affine"])
def test_matches_saelens_on_the_same_tensors(name):
  d = dl.load(FIXTURES / "saelens" / name)
  ref = np.load(FIXTURES / "saelens" / f"{name}_io.npz")
  x = jnp.asarray(ref["x"])
  np.testing.assert_allclose(dl.encode(d, x), ref["feature_acts"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dl.forward(d, x), ref["out"], rtol=1e-5, atol=1e-5)
  if name == "transcoder_affine":
    assert isinstance(d, dl.Transcoder) and d.w_skip is not None
    assert (d.meta.site, d.meta.layer, d.meta.site_out) == ("mlp_in", 9, "mlp_out")
  else:
    assert isinstance(d, dl.JumpReLUSAE) and (d.meta.site, d.meta.layer) == ("resid_post", 9)


def test_gemma_scope_1_npz_is_read_without_pickle(tmp_path):
  folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_20" / "width_16k" / "average_l0_71"
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  arrays = dict(W_enc=rng.normal(size=(8, 32)).astype(np.float32),
                W_dec=rng.normal(size=(32, 8)).astype(np.float32),
                b_enc=np.zeros(32, np.float32), b_dec=np.zeros(8, np.float32),
                threshold=np.full(32, 0.1, np.float32))
  np.savez(folder / "params.npz", **arrays)
  d = dl.load(folder)
  np.testing.assert_array_equal(d.w_enc, arrays["W_enc"])
  assert (d.meta.site, d.meta.layer, d.meta.l0) == ("resid_post", 20, 71)
  # An object array would need pickle: refused, not executed.
  np.savez(folder / "params.npz", **arrays, evil=np.array([object()], dtype=object))
  with pytest.raises(io.DictionaryFileError):
    dl.load(folder)


def test_truncated_file_is_a_clear_error(tmp_path):
  d = dl.random_dictionary(jax.random.key(0), 8, 16)
  dl.save(d, tmp_path)
  p = tmp_path / "params.safetensors"
  p.write_bytes(p.read_bytes()[:-100])
  with pytest.raises(io.DictionaryFileError, match="truncated or corrupt"):
    dl.load(tmp_path)


def _write(tmp_path, tensors, config=None):
  from safetensors.numpy import save_file
  save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()},
            str(tmp_path / "params.safetensors"))
  if config is not None:
    (tmp_path / "config.json").write_text(json.dumps(config))
  return tmp_path


def _tensors(d_in=4, width=6, d_out=4):
  return dict(w_enc=np.ones((d_in, width)), b_enc=np.zeros(width), threshold=np.zeros(width),
              w_dec=np.ones((width, d_out)), b_dec=np.zeros(d_out))


def test_missing_tensor_is_named(tmp_path):
  t = _tensors()
  del t["threshold"]
  with pytest.raises(io.DictionaryFileError, match="lacks threshold"):
    dl.load(_write(tmp_path, t))


def test_unexpected_tensor_is_refused(tmp_path):
  with pytest.raises(io.DictionaryFileError, match=r"unexpected tensors \['extra'\]"):
    dl.load(_write(tmp_path, {**_tensors(), "extra": np.ones(3)}))


def test_inconsistent_shapes_in_file(tmp_path):
  t = _tensors()
  t["b_enc"] = np.zeros(5)
  with pytest.raises(io.DictionaryFileError, match="b_enc must have shape"):
    dl.load(_write(tmp_path, t))


def test_config_width_must_match(tmp_path):
  with pytest.raises(io.DictionaryFileError, match="width=7"):
    dl.load(_write(tmp_path, _tensors(), {"width": 7, "type": "sae"}))


def test_affine_flag_must_match_tensors(tmp_path):
  with pytest.raises(io.DictionaryFileError, match="affine_connection=True"):
    dl.load(_write(tmp_path, _tensors(), {"type": "transcoder", "affine_connection": True}))


def test_non_finite_weights_refused_on_load(tmp_path):
  t = _tensors()
  t["w_dec"][0, 0] = np.inf
  with pytest.raises(ValueError, match="non-finite"):
    dl.load(_write(tmp_path, t))
  assert np.isinf(dl.load(tmp_path, check_finite=False).w_dec[0, 0])


def test_missing_local_path_says_what_is_accepted():
  with pytest.raises(FileNotFoundError, match="hub reference"):
    dl.load("./no/such/folder")


# ------------------------------------------------------------------ the hub, offline


REPO = "google/gemma-scope-2-270m-pt"
FOLDER = "transcoder/layer_9_width_16k_l0_small_affine"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _prefill_cache(cache: Path, src: Path, revision_ref="main"):
  """Lays out files as huggingface_hub's cache does after a download."""
  repo = cache / ("models--" + REPO.replace("/", "--"))
  snap = repo / "snapshots" / COMMIT / FOLDER
  snap.mkdir(parents=True)
  for f in ("params.safetensors", "config.json"):
    shutil.copy(src / f, snap / f)
  (repo / "refs").mkdir()
  (repo / "refs" / revision_ref).write_text(COMMIT)


def test_hub_reference_loads_from_a_prefilled_cache_offline(tmp_path):
  src = FIXTURES / "saelens" / "transcoder_affine"
  _prefill_cache(tmp_path, src)
  d = dl.load(f"{REPO}/{FOLDER}", cache_dir=tmp_path)
  _same(d, dl.load(src))
  assert d.meta.source == f"{REPO}/{FOLDER}"
  # Pinning the commit works offline too.
  _same(dl.load(f"{REPO}/{FOLDER}", cache_dir=tmp_path, revision=COMMIT), d)


def test_hub_reference_not_cached_offline_says_how_to_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="local folder|instead"):
    dl.load(f"{REPO}/resid_post/layer_9_width_16k_l0_small", cache_dir=tmp_path)


def test_catalog_references_are_consistent():
  from dictlearn import catalog
  assert catalog.sweep_layers("1b")[-1] == 22 and 9 in catalog.sweep_layers("270m")
  assert catalog.ref("1b", "resid_post", 22, "65k", "medium") == (
      "google/gemma-scope-2-1b-pt/resid_post/layer_22_width_65k_l0_medium")
  assert catalog.ref("270m", "transcoder", 9) == f"{REPO}/{FOLDER}"
  assert catalog.ref("270m", "mlp_out", 3, "262k", "big").startswith(f"{REPO}/mlp_out_all/")
  assert len(catalog.releases()) == 10
  with pytest.raises(ValueError, match="out of range"):
    catalog.ref("270m", "resid_post", 18)
  with pytest.raises(ValueError, match="medium"):
    catalog.ref("270m", "resid_post", 3, l0="medium")  # *_all has small and big only.
  for r in catalog.find("270m", "resid_post", layer=9):
    assert r.startswith(REPO)
