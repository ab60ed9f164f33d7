"""Gemma 3 vision without a framework (numpy, JAX, Pillow): preprocessing, SigLIP and the
projector, the vision loaders, against transformers on the tiny random model of
``fixtures/gemma3_vision/`` (``scripts/make_gemma3_vision_fixtures.py``). The penzai side
(prompt, mask, logits, tour) is in ``tests/test_gemma3_vision.py``.
"""

import json
import os

import numpy as np
import pytest
from gemma3_vision_tiny import copy_fixture_with

from dictlearn_gemma import image_preprocess
from dictlearn_gemma.load_safetensors import load_safetensors_params
from dictlearn_gemma.load_vision import load_hf_vision, load_vision
from dictlearn_gemma.vision import GEMMA3_SIGLIP, SiglipConfig, encode_images, siglip_encode

FOLDER = os.path.join(os.path.dirname(__file__), "..", "fixtures", "gemma3_vision")
REF = np.load(os.path.join(FOLDER, "reference.npz"))
IMAGES = [os.path.join(FOLDER, f"image_{i}.png") for i in range(2)]
with open(os.path.join(FOLDER, "config.json")) as _f:
  HF_CONFIG = json.load(_f)


# ------------------------------------------------------------------ preprocessing


def test_preprocessing_equals_the_processor():
  """Paths, PIL images and uint8 arrays give transformers' pixel_values bit for bit; the
  second image is greyscale (converted to RGB) and both change aspect ratio."""
  from PIL import Image
  want = REF["pixel_values"]
  np.testing.assert_array_equal(image_preprocess.preprocess_images(IMAGES, 56), want)
  pil = [Image.open(p) for p in IMAGES]
  np.testing.assert_array_equal(image_preprocess.preprocess_images(pil, 56), want)
  arrays = [np.asarray(im.convert("RGB")) for im in pil]
  np.testing.assert_array_equal(image_preprocess.preprocess_images(arrays, 56), want)
  one = image_preprocess.preprocess_images(IMAGES[0], 56)
  assert one.shape == (1, 56, 56, 3) and one.dtype == np.float32
  assert -1 <= one.min() and one.max() <= 1


@pytest.mark.parametrize("image, match", [
    (np.zeros((8, 8, 4), np.uint8), r"\(H, W, 3\).*alpha"),
    (np.zeros((3, 8, 8), np.uint8), r"channels first"),
    (np.zeros((8, 8, 3), np.float32) + 2, r"\[0, 1\]"),
    (np.zeros((8, 8, 3), np.int32), r"uint8"),
    (np.zeros((0, 8, 3), np.uint8), r"empty"),
    ("/no/such/image.png", r"no image file"),
])
def test_bad_images_are_refused_clearly(image, match):
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    image_preprocess.preprocess_images([image], 56)


def test_a_file_that_is_not_an_image(tmp_path):
  bad = tmp_path / "notes.png"
  bad.write_text("not an image")
  with pytest.raises(ValueError, match="not an image Pillow can read"):
    image_preprocess.preprocess_images(bad, 56)
  with pytest.raises(ValueError, match="no images"):
    image_preprocess.preprocess_images([], 56)


# ------------------------------------------------------------------ the vision tower


def test_config_from_the_weights():
  vision = load_vision(FOLDER)
  assert vision.config == SiglipConfig(image_size=56, patch_size=14, hidden=32, intermediate=48,
                                       layers=2, heads=2, layer_norm_eps=1e-6,
                                       mm_tokens_per_image=4)
  assert (vision.boi_id, vision.eoi_id, vision.image_id) == (
      HF_CONFIG["boi_token_index"], HF_CONFIG["eoi_token_index"], HF_CONFIG["image_token_index"])
  assert vision.d_model == 32 and vision.config.pool == 2
  # The real 4B+ tower: 896 px, 64 x 64 patches pooled 4 x 4 to 256 tokens.
  assert (GEMMA3_SIGLIP.patches_per_side, GEMMA3_SIGLIP.pool, GEMMA3_SIGLIP.head_dim) == (64, 4, 72)
  with pytest.raises(ValueError, match="must be a square"):
    SiglipConfig(mm_tokens_per_image=200)


def test_image_features_equal_transformers():
  vision = load_vision(FOLDER)
  hidden = np.asarray(siglip_encode(vision.params, REF["pixel_values"], vision.config))
  feats = np.asarray(encode_images(vision.params, REF["pixel_values"], vision.config))
  assert np.abs(hidden - REF["vision_hidden"]).max() < 1e-5
  assert np.abs(feats - REF["image_features"]).max() < 1e-5
  with pytest.raises(ValueError, match=r"pixels must be \(n, 56, 56, 3\)"):
    encode_images(vision.params, REF["pixel_values"].transpose(0, 3, 1, 2), vision.config)


# ------------------------------------------------------------------ loading


@pytest.mark.parametrize("change, match", [
    (lambda t: t.pop("vision_tower.encoder.layers.1.mlp.fc2.bias"),
     r"missing 1 vision tensor.*encoderblock_1/MlpBlock_0/Dense_1/bias"),
    (lambda t: t.update({"vision_tower.head.probe": np.zeros(3, np.float32)}),
     r"unexpected vision tensor 'vision_tower.head.probe'"),
    (lambda t: t.update({"vision_tower.embeddings.position_embedding.weight":
                         np.zeros((9, 32), np.float32)}),
     r"position embedding holds 9 patches but config.json's vision image_size 56"),
    (lambda t: t.update({"multi_modal_projector.mm_soft_emb_norm.weight":
                         np.zeros(31, np.float32)}),
     r"wrong shapes: transformer/embedder/mm_soft_embedding_norm/scale: \(31,\)"),
])
def test_bad_vision_weights_are_refused_by_name(tmp_path, change, match):
  with pytest.raises(ValueError, match=match):
    load_hf_vision(copy_fixture_with(tmp_path, change))


def test_newer_hub_names_load_too(tmp_path):
  """``model.vision_tower.vision_model.*`` / ``model.multi_modal_projector.*`` /
  ``model.language_model.*`` (the hub's current files) read as transformers 5.x's own."""
  def rename(t):
    for k in list(t):
      v = t.pop(k)
      k = k.replace("language_model.model.", "model.language_model.")
      k = k.replace("vision_tower.", "model.vision_tower.vision_model.")
      k = k.replace("multi_modal_projector.", "model.multi_modal_projector.")
      t[k] = v
  folder = copy_fixture_with(tmp_path, rename)
  a, b = load_hf_vision(folder), load_hf_vision(FOLDER)
  assert a.params.keys() == b.params.keys()
  for key in a.params:
    np.testing.assert_array_equal(a.params[key], b.params[key])
  assert load_safetensors_params(folder).keys() == load_safetensors_params(FOLDER).keys()


def test_gemma3_image_size_pools_64x64_patches_to_256_tokens():
  """At Gemma 3's 896 px and patch 14 (narrow random weights: the grid is what matters),
  64 x 64 patches average-pool in 4 x 4 windows, row-major, to 256 tokens."""
  from dictlearn_gemma.vision import expected_vision_shapes, project
  config = SiglipConfig(hidden=32, intermediate=48, layers=1, heads=2)
  assert (config.patches_per_side, config.pool) == (64, 4)
  rng = np.random.default_rng(0)
  params = {k: (0.1 * rng.standard_normal(s)).astype(np.float32)
            for k, s in expected_vision_shapes(config, 40).items()}
  pixels = image_preprocess.preprocess_images(rng.integers(0, 255, (300, 500, 3), np.uint8),
                                              896)
  assert encode_images(params, pixels, config).shape == (1, 256, 40)
  patches = rng.standard_normal((1, 4096, 32)).astype(np.float32)
  grid = patches.reshape(64, 64, 32)
  params["transformer/embedder/mm_soft_embedding_norm/scale"] = np.zeros(32, np.float32)
  params["transformer/embedder/mm_input_projection/w"] = np.eye(32, 40, dtype=np.float32)
  out = np.asarray(project(params, patches, config))[0]
  # Token 17 = row 1, column 1 of the 16 x 16 grid: patches 4..7 x 4..7, then RMS-normalised.
  pooled = grid[4:8, 4:8].mean(axis=(0, 1))
  want = pooled / np.sqrt(np.mean(pooled ** 2) + 1e-6)
  np.testing.assert_allclose(out[17, :32], want, rtol=1e-5, atol=1e-6)
