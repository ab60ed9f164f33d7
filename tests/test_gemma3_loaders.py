"""Loaders: the same weights written as HF safetensors, a Gemma flax/orbax checkpoint and GGUF
load to the same logits (tiny random model and the real 270M); clear errors otherwise.

The writers here are independent inverses of the loaders' conversions, spelled out from the
transformers / llama.cpp / Kaggle layouts, so a round trip checks both directions.
"""

import json
import os
import re
import sys

import numpy as np
import pytest

import dictlearn_gemma
import dictlearn_penzai as dp
from dictlearn_gemma.config import PRESETS
from dictlearn_gemma.params import init_gemma_params
from dictlearn_gemma.tokenizer import Tokenizer
from gemma_layouts import flat_layout, nested_layout

TINY = PRESETS["tiny"]
TOKENS = np.array([2, 40, 41, 7, 300, 12, 9, 100])
_NORM_NAMES = {"pre_attention_norm": "input_layernorm",
               "post_attention_norm": "post_attention_layernorm",
               "pre_ffw_norm": "pre_feedforward_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"}
_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def to_hf(params, num_layers, prefix="model."):
  """Canonical tree -> transformers Gemma3 tensors ((out, in) matrices, norms as scale)."""
  get = lambda k: np.asarray(params["transformer/" + k])
  out = {prefix + "embed_tokens.weight": get("embedder/input_embedding"),
         prefix + "norm.weight": get("final_norm/scale")}
  for i in range(num_layers):
    p, t = f"layer_{i}/", f"{prefix}layers.{i}."
    q = get(p + "attn/q_einsum/w")  # (N, D, H)
    k, v = get(p + "attn/kv_einsum/w")  # (K, D, H) each
    o = get(p + "attn/attn_vec_einsum/w")  # (N, H, D)
    flat = lambda w: w.transpose(0, 2, 1).reshape(-1, w.shape[1])  # (n, D, H) -> (n*H, D)
    out[t + "self_attn.q_proj.weight"] = flat(q)
    out[t + "self_attn.k_proj.weight"] = flat(k)
    out[t + "self_attn.v_proj.weight"] = flat(v)
    out[t + "self_attn.o_proj.weight"] = o.transpose(2, 0, 1).reshape(o.shape[2], -1)
    out[t + "self_attn.q_norm.weight"] = get(p + "attn/_query_norm/scale")
    out[t + "self_attn.k_norm.weight"] = get(p + "attn/_key_norm/scale")
    for flax_name, hf_name in _NORM_NAMES.items():
      out[t + f"{hf_name}.weight"] = get(p + f"{flax_name}/scale")
    gate, up = get(p + "mlp/gating_einsum/w")
    out[t + "mlp.gate_proj.weight"], out[t + "mlp.up_proj.weight"] = gate, up
    out[t + "mlp.down_proj.weight"] = get(p + "mlp/linear/w").T
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def write_hf_folder(folder, params, config, tokenizer=None, prefix="model.", extra=None):
  from safetensors.numpy import save_file
  os.makedirs(folder, exist_ok=True)
  tensors = to_hf(params, config.num_layers, prefix)
  tensors.update(extra or {})
  names = sorted(tensors)
  half = len(names) // 2  # Two shards and an index, as the hub writes them.
  shards = {"model-00001-of-00002.safetensors": names[:half],
            "model-00002-of-00002.safetensors": names[half:]}
  for shard, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, os.path.join(folder, shard))
  with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
    json.dump({"weight_map": {k: s for s, keys in shards.items() for k in keys}}, f)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
               "num_hidden_layers": config.num_layers, "hidden_size": config.d_model,
               "num_attention_heads": config.num_heads,
               "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
               "intermediate_size": config.hidden_dim, "vocab_size": config.vocab_size}, f)
  if tokenizer is not None:
    tokenizer.save(os.path.join(folder, "tokenizer.model"))


def write_orbax_kaggle(folder, params, tokenizer=None, name="gemma3-tiny", nested=False):
  """Kaggle layout: folder/tokenizer.model and folder/<name>/ (FLAT orbax checkpoint, or the
  NESTED one that ``gemma``'s own ``ckpts.save_params`` writes)."""
  import orbax.checkpoint as ocp
  arrays = {k: np.asarray(v) for k, v in params.items()}
  os.makedirs(folder, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(os.path.abspath(folder), name),
                    nested_layout(arrays) if nested else flat_layout(arrays))
  checkpointer.wait_until_finished()
  if tokenizer is not None:
    tokenizer.save(os.path.join(folder, "tokenizer.model"))
  return os.path.join(folder, name)


def tiny_vocabulary(size):
  """A small Gemma-like SentencePiece vocabulary in GGUF form (pieces, scores, types)."""
  pieces = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2), ("<start_of_turn>", 3),
            ("<end_of_turn>", 3)]
  pieces += [(f"<0x{b:02X}>", 6) for b in range(256)]
  pieces += [("  ", 4), ("   ", 4), ("\n", 4), ("<b>", 4)]  # Literal spaces, as in GGUF.
  letters = "abcdefghijklmnopqrstuvwxyz"
  pieces += [("\u2581", 1)] + [(c, 1) for c in letters] + [("\u2581" + c, 1) for c in letters]
  pieces += [(f"<unused{i}>", 3) for i in range(size - len(pieces))]
  scores = [-1000.0 if kind != 1 else -float(i) for i, (_, kind) in enumerate(pieces)]
  return [p for p, _ in pieces], scores, [kind for _, kind in pieces]


def write_gguf(path, params, config, arch="gemma3", quant_embedding="Q8_0"):
  """llama.cpp's Gemma 3 layout: (out, in) matrices, norms stored as 1 + scale."""
  import gguf
  writer = gguf.GGUFWriter(path, arch)
  writer.add_block_count(config.num_layers)
  writer.add_embedding_length(config.d_model)
  writer.add_head_count(config.num_heads)
  writer.add_head_count_kv(config.num_kv_heads)
  pieces, scores, types = tiny_vocabulary(config.vocab_size)
  writer.add_tokenizer_model("llama")
  writer.add_token_list(pieces)
  writer.add_token_scores(scores)
  writer.add_token_types(types)
  writer.add_bos_token_id(2)
  writer.add_eos_token_id(1)
  for name, value in to_hf(params, config.num_layers).items():
    parts = name.removesuffix(".weight").split(".")
    if parts[1] == "layers":
      gname = f"blk.{parts[2]}.{_GGUF_NAMES['.'.join(parts[3:])]}.weight"
    else:
      gname = {"embed_tokens": "token_embd", "norm": "output_norm"}[parts[1]] + ".weight"
    value = np.asarray(value, np.float32)
    if "norm" in gname:
      writer.add_tensor(gname, value + 1.0)
    elif gname == "token_embd.weight" and quant_embedding == "Q8_0":
      writer.add_tensor(gname, gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0),
                        raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    elif gname == "token_embd.weight" and quant_embedding == "Q8_1":
      block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
      raw = np.zeros((value.shape[0], value.shape[1] // block * size), np.uint8)
      writer.add_tensor(gname, raw, raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    elif gname.endswith("ffn_up.weight"):
      writer.add_tensor(gname, value.astype(np.float16))
    else:
      writer.add_tensor(gname, value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


@pytest.fixture(scope="module")
def tiny():
  params = init_gemma_params(TINY, seed=3)
  model = dp.from_gemma_params(params)
  tokenizer = Tokenizer.from_vocabulary(*tiny_vocabulary(TINY.vocab_size))
  return params, np.asarray(dp.forward_logits(model, TOKENS)), tokenizer


def test_tiny_round_trip_hf_safetensors(tiny, tmp_path):
  params, want, tokenizer = tiny
  write_hf_folder(tmp_path / "hf", params, TINY, tokenizer)
  model, tok = dp.load_gemma3(tmp_path / "hf")
  np.testing.assert_array_equal(np.asarray(dp.forward_logits(model, TOKENS)), want)
  assert tok.encode("ab  c") == tokenizer.encode("ab  c")


@pytest.mark.parametrize("prefix", ["language_model.model.", "model.language_model."])
def test_multimodal_checkpoint_loads_its_text_model(tiny, tmp_path, prefix):
  params, want, _ = tiny
  vision = {"vision_tower.vision_model.embeddings.patch_embedding.weight": np.ones((2, 3)),
            "multi_modal_projector.mm_input_projection_weight": np.ones((2, 2))}
  write_hf_folder(tmp_path, params, TINY, prefix=prefix, extra=vision)
  with pytest.warns(UserWarning, match="no tokenizer.model"):
    model, tok = dp.load_gemma3(tmp_path)
  assert tok is None
  np.testing.assert_array_equal(np.asarray(dp.forward_logits(model, TOKENS)), want)


def test_tiny_round_trip_orbax_kaggle_layout(tiny, tmp_path):
  params, want, tokenizer = tiny
  checkpoint = write_orbax_kaggle(tmp_path / "kaggle", params, tokenizer)
  for source in (tmp_path / "kaggle", checkpoint):  # The download folder or the checkpoint.
    model, tok = dp.load_gemma3(source)
    np.testing.assert_array_equal(np.asarray(dp.forward_logits(model, TOKENS)), want)
    assert tok is not None and tok.encode("a b") == tokenizer.encode("a b")


def test_load_params_needs_no_framework(tiny, tmp_path):
  """dictlearn_gemma.load_params returns the canonical tree itself, from a NESTED orbax
  checkpoint too; dictlearn_penzai's names for it are re-exports."""
  params, _, tokenizer = tiny
  write_orbax_kaggle(tmp_path / "nested", params, tokenizer, nested=True)
  got, tok = dictlearn_gemma.load_params(tmp_path / "nested")
  assert got.keys() == params.keys()
  for key in params:
    np.testing.assert_array_equal(got[key], params[key])
  assert isinstance(tok, dictlearn_gemma.Tokenizer) and tok.encode("a b") == tokenizer.encode("a b")
  assert dp.load_gemma3_params is dictlearn_gemma.load_params
  assert dp.Tokenizer is Tokenizer and dp.PRESETS is PRESETS
  assert dp.init_gemma_params is init_gemma_params


def test_tiny_round_trip_gguf(tiny, tmp_path):
  import gguf
  params, _, tokenizer = tiny
  write_gguf(tmp_path / "tiny.gguf", params, TINY)
  model, tok = dp.load_gemma3(tmp_path / "tiny.gguf")
  # What the file holds: a Q8_0 embedding and float16 up-projections.
  q8 = gguf.GGMLQuantizationType.Q8_0
  rounded = dict(params)
  emb = params["transformer/embedder/input_embedding"]
  rounded["transformer/embedder/input_embedding"] = gguf.quants.dequantize(
      gguf.quants.quantize(emb, q8), q8)
  for key in [k for k in params if k.endswith("gating_einsum/w")]:
    w = params[key].copy()
    w[1] = w[1].astype(np.float16).astype(np.float32)
    rounded[key] = w
  want = np.asarray(dp.forward_logits(dp.from_gemma_params(rounded), TOKENS))
  np.testing.assert_allclose(np.asarray(dp.forward_logits(model, TOKENS)), want, atol=1e-5)
  a, b, c, nl = (tok.piece_to_id(p) for p in ("a", "b", "c", "\n"))
  assert tok.encode("ab  c\n") == [2, a, b, 262, c, nl]  # Piece 262 "  " respelled as ▁▁.
  assert tok.decode(tok.encode("ab  c\n")) == "<bos>ab  c\n"
  assert Tokenizer.from_gguf(tmp_path / "tiny.gguf").encode("ab  c\n") == tok.encode("ab  c\n")


def test_gguf_errors(tiny, tmp_path):
  params, _, _ = tiny
  write_gguf(tmp_path / "llama.gguf", params, TINY, arch="llama")
  with pytest.raises(ValueError, match="not a Gemma 3 GGUF.*'llama'"):
    dp.load_gemma3(tmp_path / "llama.gguf")
  write_gguf(tmp_path / "q81.gguf", params, TINY, quant_embedding="Q8_1")
  with pytest.raises(ValueError, match=r"token_embd.weight \(Q8_1\).*Supported GGUF types:.*Q4_K"):
    dp.load_gemma3(tmp_path / "q81.gguf")
  data = (tmp_path / "llama.gguf").read_bytes()
  (tmp_path / "cut.gguf").write_bytes(data[:200])
  with pytest.raises(ValueError, match="corrupt or truncated"):
    dp.load_gemma3(tmp_path / "cut.gguf")


@pytest.mark.filterwarnings("ignore:no tokenizer.model found")
def test_safetensors_errors(tiny, tmp_path):
  params, _, _ = tiny
  write_hf_folder(tmp_path / "hf", params, TINY)
  shard = tmp_path / "hf" / "model-00002-of-00002.safetensors"
  from safetensors.numpy import load_file, save_file
  tensors = load_file(shard)
  dropped = sorted(k for k in tensors if "layers.6." in k)[:2]
  save_file({k: v for k, v in tensors.items() if k not in dropped}, shard)
  with pytest.raises(ValueError, match=r"missing 2 Gemma 3 tensor.*" + re.escape(dropped[0])):
    dp.load_gemma3(tmp_path / "hf")
  write_hf_folder(tmp_path / "ok", params, TINY)
  with pytest.raises(ValueError, match="preset '270m' does not match"):
    dp.load_gemma3(tmp_path / "ok", preset="270m")
  config = json.loads((tmp_path / "ok" / "config.json").read_text())
  (tmp_path / "ok" / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
  with pytest.raises(ValueError, match="'llama' model.*not Gemma 3"):
    dp.load_gemma3(tmp_path / "ok")


def test_source_errors(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="no Gemma 3 checkpoint at"):
    dp.load_gemma3(tmp_path / "nothing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="holds no orbax checkpoint"):
    dp.load_gemma3(tmp_path / "empty")
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(ValueError, match="neither a GGUF nor a .safetensors file"):
    dp.load_gemma3(tmp_path / "notes.txt")
  monkeypatch.setitem(sys.modules, "kagglehub", None)  # As if not installed.
  with pytest.raises(ImportError, match="pip install 'dictlearn\\[kaggle\\]'"):
    dp.load_gemma3("kaggle:google/gemma-3/flax/gemma3-1b")


@pytest.mark.slow
def test_270m_same_logits_from_gguf_hf_and_orbax(gemma3_270m_params, gemma3_270m, tmp_path):
  """The real 270M written as HF safetensors and as a Kaggle orbax checkpoint loads back to
  the logits of the GGUF-loaded model (same float32 values, so bit-identical)."""
  params, tokenizer = gemma3_270m_params
  model, _ = gemma3_270m
  tokens = np.array(tokenizer.encode("The Eiffel Tower is located in the city of"))
  want = np.asarray(dp.forward_logits(model, tokens))
  config = dp.model_config(model)
  write_hf_folder(tmp_path / "hf", params, config, tokenizer)
  hf_model, hf_tok = dp.load_gemma3(tmp_path / "hf")
  np.testing.assert_array_equal(np.asarray(dp.forward_logits(hf_model, tokens)), want)
  assert hf_tok.encode("    if x:") == tokenizer.encode("    if x:")
  del hf_model
  checkpoint = write_orbax_kaggle(tmp_path / "kaggle", params, tokenizer, name="gemma3-270m")
  flax_model, flax_tok = dp.load_gemma3(tmp_path / "kaggle")
  np.testing.assert_array_equal(np.asarray(dp.forward_logits(flax_model, tokens)), want)
  assert dp.model_config(flax_model).name == "270m" and flax_tok is not None
