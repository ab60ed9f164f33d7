"""A tiny random Gemma 3 vision-language model (``Gemma3ForConditionalGeneration``) for tests.

Shared by ``scripts/make_gemma3_vision_fixtures.py`` (run in a transformers venv: it builds
the model with these numbers, fills it from ``SEED`` and saves the folder under
``fixtures/gemma3_vision/``) and by the tests. Needs numpy only, and Pillow for ``images``.

Text: the "tiny" preset of ``dictlearn_gemma.config`` (7 layers, layer 5 global, d_model 32,
4 query heads over 2 kv heads, head_dim 16, GeGLU 48, window 4, linear RoPE scale 8 on the
global layer, vocabulary 384), so the loaders infer its size from the shapes. Vision:
SigLIP on 56 x 56 images, patch 14 (4 x 4 patches), width 32, 2 layers, 2 heads, MLP 48;
the projector average-pools the 4 x 4 patches to 2 x 2 = 4 soft tokens per image.

The window (4) is shorter than an image block plus its markers, so local layers exercise
transformers' rule for images: bidirectional within an image, but still cut by the window
(``kv > q - window``) on sliding layers.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

SEED = 17  # A seed whose greedy continuation changes token (many repeat one).
VOCAB = 384
# Vocabulary: Gemma's specials, 256 bytes, letters with and without a leading space, the
# double newline Gemma 3 keeps as one piece (id 108 in the real vocabulary), the image markers.
_HEAD = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2), ("<start_of_turn>", 3),
         ("<end_of_turn>", 3)]
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
PIECES = (_HEAD + [(f"<0x{b:02X}>", 6) for b in range(256)] + [("\u2581", 1)]
          + [(c, 1) for c in _LETTERS] + [("\u2581" + c, 1) for c in _LETTERS]
          + [("\n\n", 4), ("<start_of_image>", 3), ("<end_of_image>", 3),
             ("<image_soft_token>", 3)])
PIECES += [(f"<unused{i}>", 3) for i in range(VOCAB - len(PIECES))]
DOUBLE_NEWLINE_ID = [p for p, _ in PIECES].index("\n\n")
BOI_ID = [p for p, _ in PIECES].index("<start_of_image>")
EOI_ID = [p for p, _ in PIECES].index("<end_of_image>")
IMAGE_ID = [p for p, _ in PIECES].index("<image_soft_token>")

IMAGE_SEED = 11
MM_TOKENS = 4
IMAGE_SIZE = 56
TEXT_CONFIG = {
    "model_type": "gemma3_text", "vocab_size": VOCAB, "hidden_size": 32,
    "intermediate_size": 48, "num_hidden_layers": 7, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 4,
    "layer_types": ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"],
    "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
    "query_pre_attn_scalar": 16, "rms_norm_eps": 1e-6,
    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 128,
    "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
    "final_logit_softcapping": None, "attn_logit_softcapping": None,
}
VISION_CONFIG = {
    "model_type": "siglip_vision_model", "image_size": IMAGE_SIZE, "patch_size": 14,
    "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
    "num_attention_heads": 2, "layer_norm_eps": 1e-6, "vision_use_head": False,
    "hidden_act": "gelu_pytorch_tanh",
}
CONFIG = {
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
    "text_config": TEXT_CONFIG, "vision_config": VISION_CONFIG,
    "mm_tokens_per_image": MM_TOKENS, "boi_token_index": BOI_ID, "eoi_token_index": EOI_ID,
    "image_token_index": IMAGE_ID, "tie_word_embeddings": True,
}
# Two images in one prompt, each where its placeholder stands.
PROMPT = "look at this<start_of_image>and this<start_of_image>what is it"
NEW_TOKENS = 6
# The second row of a batch: shorter (left-padded), one image.
BATCH_PROMPT = "see<start_of_image>it"


def random_value(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
  """The value of one transformers tensor: matrices ~ N(0, 1/fan_in), Gemma RMSNorm scales
  ~ N(0, 0.2) (applied as 1 + scale), SigLIP LayerNorms 1 + N(0, 0.2), biases N(0, 0.1)."""
  if name.endswith("bias"):
    v = 0.1 * rng.standard_normal(shape)
  elif "layer_norm" in name or "post_layernorm" in name:
    v = 1.0 + 0.2 * rng.standard_normal(shape)
  elif len(shape) == 1:
    v = 0.2 * rng.standard_normal(shape)
  elif "embed_tokens" in name:
    v = 0.3 * rng.standard_normal(shape)
  elif "position_embedding" in name:
    v = 0.5 * rng.standard_normal(shape)
  else:  # (out, in) linear, (in, out) projector, (out, c, p, p) conv: fan in = all but dim 0.
    fan_in = shape[0] if "mm_input_projection" in name else int(np.prod(shape[1:]))
    v = rng.standard_normal(shape) / np.sqrt(fan_in)
  return v.astype(np.float32)


def images():
  """Two seeded PIL images: 40 x 70 RGB (resized, aspect changed) and 20 x 20 greyscale
  (converted to RGB)."""
  from PIL import Image

  rng = np.random.default_rng(IMAGE_SEED)
  y, x = np.mgrid[:40, :70]
  rgb = np.stack([x * 3.6, y * 6.3, 128 + 60 * np.sin(x / 5.0)], -1) + 30 * rng.standard_normal(
      (40, 70, 3))
  grey = 255 * rng.random((20, 20))
  return [Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB"),
          Image.fromarray(grey.astype(np.uint8), "L")]


def tokenizer():
  """The tiny SentencePiece tokenizer (needs dictlearn_gemma)."""
  from dictlearn_gemma.tokenizer import Tokenizer

  scores = [0.0 if kind != 1 else -float(i) for i, (_, kind) in enumerate(PIECES)]
  return Tokenizer.from_vocabulary([p for p, _ in PIECES], scores, [k for _, k in PIECES])


FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "gemma3_vision")


def copy_fixture_with(tmp_path, change) -> Path:
  """A copy of the fixture folder, ``tmp_path / "vlm"``, whose safetensors ``change``
  (called with the dict of arrays) edited in place."""
  from safetensors.numpy import load_file, save_file
  out = Path(tmp_path) / "vlm"
  shutil.copytree(FOLDER, out)
  tensors = load_file(out / "model.safetensors")
  change(tensors)
  save_file(tensors, out / "model.safetensors")
  return out
