"""Cross-layer transcoders: the math against a plain loop, and the Gemma Scope 2 folder layout."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from safetensors.numpy import load_file, save_file

import dictlearn
from dictlearn import crosslayer
from dictlearn.io import DictionaryFileError


def a_clt(n_layers=4, d=8, width=16, skip=True, seed=0):
  c = crosslayer.random_clt(jax.random.key(seed), n_layers, d, width, skip=skip,
                            threshold=0.1)
  return c.replace(b_dec=jax.random.normal(jax.random.key(seed + 1), (n_layers, d)))


@given(n_layers=st.integers(1, 4), skip=st.booleans(), seed=st.integers(0, 100))
def test_forward_equals_a_loop_over_source_and_target_layers(n_layers, skip, seed):
  c = a_clt(n_layers, skip=skip, seed=seed)
  x = np.asarray(jax.random.normal(jax.random.key(seed + 2), (n_layers, 3, 8)))
  w_enc, b_enc, thr, w_dec = (np.asarray(a, np.float64) for a in
                              (c.w_enc, c.b_enc, c.threshold, c.w_dec))
  want = np.zeros((n_layers, 3, 8))
  for j in range(n_layers):
    for i in range(j + 1):
      pre = x[i] @ w_enc[i] + b_enc[i]
      want[j] += np.where(pre > thr[i], pre, 0) @ w_dec[i, :, j]
    want[j] += np.asarray(c.b_dec[j])
    if skip:
      want[j] += x[j] @ np.asarray(c.w_skip[j])
  np.testing.assert_allclose(crosslayer.forward(c, jnp.asarray(x)), want, atol=1e-4)


def test_decoder_entries_before_the_source_layer_are_ignored():
  c = a_clt(skip=False)
  x = jax.random.normal(jax.random.key(5), (4, 3, 8))
  noisy = c.replace(w_dec=c.w_dec + jnp.triu(jnp.ones((4, 4)), 1).T[:, None, :, None] * 9.0)
  np.testing.assert_allclose(crosslayer.forward(noisy, x), crosslayer.forward(c, x), atol=1e-5)


@pytest.mark.parametrize("skip", [True, False])
def test_folder_round_trip_is_exact_in_the_gemma_scope_2_layout(tmp_path, skip):
  c = a_clt(skip=skip).astype(jnp.bfloat16)
  dictlearn.save(c, tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "config.json", *[f"params_layer_{i}.safetensors" for i in range(4)]]
  layer1 = load_file(tmp_path / "params_layer_1.safetensors")
  assert layer1["w_enc"].shape == (8, 16) and layer1["w_dec"].shape == (16, 4, 8)
  assert ("affine_skip_connection" in layer1) == skip
  back = dictlearn.load(tmp_path)
  assert isinstance(back, dictlearn.CrossLayerTranscoder) and back.dtype == jnp.bfloat16
  for a, b in zip(jax.tree_util.tree_leaves(c), jax.tree_util.tree_leaves(back)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  assert dictlearn.load(tmp_path, dtype=jnp.float32).dtype == jnp.float32


def _write_layers(folder, n=3, width=4, d=5, changes=None):
  rng = np.random.default_rng(0)
  for i in range(n):
    t = dict(w_enc=rng.standard_normal((d, width)), b_enc=np.zeros(width),
             threshold=np.zeros(width), w_dec=rng.standard_normal((width, n, d)))
    t.update((changes or {}).get(i, {}))
    t = {k: np.asarray(v, np.float32) for k, v in t.items() if v is not None}
    save_file(t, str(folder / f"params_layer_{i}.safetensors"))


def test_every_layer_file_is_read_up_to_the_last(tmp_path):
  _write_layers(tmp_path, n=3)
  c = dictlearn.load(tmp_path)
  assert c.n_layers == 3
  np.testing.assert_array_equal(np.asarray(c.w_enc[2]),
                                load_file(tmp_path / "params_layer_2.safetensors")["w_enc"])


@pytest.mark.parametrize("case, match", [
    ("missing_layer", "none missing"),
    ("extra_tensor", "unexpected tensors"),
    ("short_w_dec", "n_layers"),
    ("shape_differs", "layer 0's"),
    ("config_width", "width"),
    ("nan", "non-finite"),
])
def test_bad_folders_are_refused_naming_the_problem(tmp_path, case, match):
  if case == "missing_layer":
    _write_layers(tmp_path, n=3)
    (tmp_path / "params_layer_1.safetensors").unlink()
    (tmp_path / "params_layer_2.safetensors").rename(tmp_path / "params_layer_5.safetensors")
  elif case == "extra_tensor":
    _write_layers(tmp_path, n=2, changes={1: dict(extra=np.zeros(3))})
  elif case == "short_w_dec":
    _write_layers(tmp_path, n=2, changes={0: dict(w_dec=np.zeros((4, 1, 5))),
                                          1: dict(w_dec=np.zeros((4, 1, 5)))})
  elif case == "shape_differs":
    _write_layers(tmp_path, n=2, changes={1: dict(b_enc=np.zeros(3))})
  elif case == "config_width":
    _write_layers(tmp_path, n=2)
    (tmp_path / "config.json").write_text(json.dumps({"width": 99}))
  elif case == "nan":
    _write_layers(tmp_path, n=2, changes={1: dict(threshold=np.full(4, np.nan))})
  with pytest.raises(DictionaryFileError, match=match):
    dictlearn.load(tmp_path)


def test_wrong_shapes_in_memory_name_the_tensor():
  c = a_clt()
  with pytest.raises(ValueError, match="threshold"):
    c.replace(threshold=jnp.zeros((4, 3))).validate()
  with pytest.raises(ValueError, match="n_layers=4"):
    crosslayer.encode(c, jnp.zeros((3, 2, 8)))
