"""A tiny random Gemma 2 as a transformers safetensors folder, rebuilt from a seed with numpy.

Imported by ``scripts/make_gemma2_fixtures.py`` (in a transformers venv, to record reference
outputs) and by the tests (to rebuild the same folder), so the fixture stores only outputs.
Needs numpy and safetensors only.

Sizes: 4 layers (sliding window on 0 and 2, global on 1 and 3), d_model 64, 4 query heads
over 2 kv heads (grouped-query), head_dim 16, GeGLU width 96, window 8, vocabulary 320
(room for ``tokenizer()``'s SentencePiece vocabulary with byte fallback).
The soft-caps are small (attention 5, final logits 8) so both are far from linear on these
weights, and ``query_pre_attn_scalar`` (24) differs from head_dim so a wrong query scale
shows.
"""

from __future__ import annotations

import json
import os

import numpy as np

SEED = 6  # A seed whose greedy continuation changes token (many random ones repeat one).
CONFIG = {
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "sliding_window": 8,
    "query_pre_attn_scalar": 24,
    "attn_logit_softcapping": 5.0,
    "final_logit_softcapping": 8.0,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}
# BOS then 19 ids: longer than the window, so local layers drop early keys.
PROMPT = [2, 17, 91, 200, 45, 3, 128, 77, 250, 9, 64, 133, 5, 180, 31, 99, 222, 14, 58, 143]
NEW_TOKENS = 8


def hf_weights(seed: int = SEED, scale: float = 1.0) -> dict[str, np.ndarray]:
  """transformers ``Gemma2ForCausalLM`` tensors (float32), ``scale`` times every matrix."""
  c = CONFIG
  d, f, h = c["hidden_size"], c["intermediate_size"], c["head_dim"]
  n, k = c["num_attention_heads"], c["num_key_value_heads"]
  rng = np.random.default_rng(seed)

  def mat(rows, cols):  # (out, in), variance 1/fan_in
    return (scale * rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

  def norm(size):  # stored as scale, applied as 1 + scale
    return (0.2 * rng.standard_normal(size)).astype(np.float32)

  out = {"model.embed_tokens.weight":
         (scale * 0.15 * rng.standard_normal((c["vocab_size"], d))).astype(np.float32)}
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    out[p + "self_attn.q_proj.weight"] = mat(n * h, d)
    out[p + "self_attn.k_proj.weight"] = mat(k * h, d)
    out[p + "self_attn.v_proj.weight"] = mat(k * h, d)
    out[p + "self_attn.o_proj.weight"] = mat(d, n * h)
    out[p + "mlp.gate_proj.weight"] = mat(f, d)
    out[p + "mlp.up_proj.weight"] = mat(f, d)
    out[p + "mlp.down_proj.weight"] = mat(d, f)
    for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"):
      out[p + name + ".weight"] = norm(d)
  out["model.norm.weight"] = norm(d)
  return out


def write_folder(folder: str | os.PathLike, seed: int = SEED, scale: float = 1.0) -> str:
  """Writes ``config.json`` and ``model.safetensors`` into ``folder``; returns its path."""
  from safetensors.numpy import save_file

  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as fh:
    json.dump(CONFIG, fh, indent=1)
  save_file(hf_weights(seed, scale), os.path.join(folder, "model.safetensors"),
            metadata={"format": "pt"})
  return folder



def load_model(folder: str | os.PathLike):
  """The penzai Gemma 2 of ``write_folder(folder)`` (``dictlearn_penzai.load_gemma``; the
  folder has no tokenizer, so the loader's warning about it is expected and swallowed)."""
  import warnings

  from dictlearn_penzai import load_gemma
  path = write_folder(folder)
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="no tokenizer.model")
    return load_gemma(path)[0]

# transformers block tensor -> llama.cpp's name (Gemma 2: Gemma 3's without the QK-norms).
_GGUF_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_gguf(path: str | os.PathLike, seed: int = SEED) -> str:
  """The same weights as a ``gemma2`` GGUF (float32; norms stored as 1 + scale, as llama.cpp
  does). Needs the ``gguf`` package. GGUF has no ``query_pre_attn_scalar``."""
  import gguf

  c, path = CONFIG, os.fspath(path)
  writer = gguf.GGUFWriter(path, "gemma2")
  writer.add_context_length(c["max_position_embeddings"])
  writer.add_block_count(c["num_hidden_layers"])
  writer.add_embedding_length(c["hidden_size"])
  writer.add_feed_forward_length(c["intermediate_size"])
  writer.add_head_count(c["num_attention_heads"])
  writer.add_head_count_kv(c["num_key_value_heads"])
  writer.add_key_length(c["head_dim"])
  writer.add_value_length(c["head_dim"])
  writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
  writer.add_sliding_window(c["sliding_window"])
  writer.add_attn_logit_softcapping(c["attn_logit_softcapping"])
  writer.add_final_logit_softcapping(c["final_logit_softcapping"])
  for name, value in hf_weights(seed).items():
    parts = name.removesuffix(".weight").split(".")
    if parts[1] == "layers":
      gname = f"blk.{parts[2]}.{_GGUF_BLOCK['.'.join(parts[3:])]}.weight"
    else:
      gname = {"embed_tokens": "token_embd", "norm": "output_norm"}[parts[1]] + ".weight"
    writer.add_tensor(gname, value + 1.0 if "norm" in gname else value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def tokenizer():
  """A SentencePiece tokenizer for the tiny model: Gemma's specials, the 256 byte pieces
  (byte fallback), then lower-case letters with and without a leading space. Needs
  dictlearn_gemma."""
  from dictlearn_gemma.tokenizer import Tokenizer

  letters = "abcdefghijklmnopqrstuvwxyz"
  pieces = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2), ("<start_of_turn>", 3),
            ("<end_of_turn>", 3)]
  pieces += [(f"<0x{b:02X}>", 6) for b in range(256)]
  pieces += [("\u2581", 1)] + [(c, 1) for c in letters] + [("\u2581" + c, 1) for c in letters]
  pieces += [(f"<unused{i}>", 3) for i in range(CONFIG["vocab_size"] - len(pieces))]
  scores = [0.0 if kind != 1 else -float(i) for i, (_, kind) in enumerate(pieces)]
  return Tokenizer.from_vocabulary([p for p, _ in pieces], scores, [k for _, k in pieces])
