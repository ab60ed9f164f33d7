"""Gemma 3 from a Hugging Face safetensors folder (transformers' ``Gemma3ForCausalLM`` names).

Accepts the text model (``model.layers.{i}...``) and the text part of a multimodal
``Gemma3ForConditionalGeneration`` checkpoint (``language_model.model.layers...`` in older
transformers, ``model.language_model.layers...`` in newer); vision tensors are skipped.
transformers stores matrices as (out, in) and RMSNorm weights as ``scale`` (applied as
``1 + scale``), like the flax checkpoints. Conversions to the canonical tree (N query
heads, K kv heads, head_dim H, shapes in ``dictlearn_gemma.params``):

  q_proj (N*H, D) -> q_einsum (N, D, H)      k_proj, v_proj (K*H, D) -> kv_einsum (2, K, D, H)
  o_proj (D, N*H) -> attn_vec_einsum (N, H, D)
  gate_proj, up_proj (F, D) -> gating_einsum (2, F, D)    down_proj (D, F) -> linear (F, D)
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from dictlearn_gemma.config import Gemma2Config
from dictlearn_gemma.params import PREFIX, layer_prefix, name_some

_NORMS = {"input_layernorm": "pre_attention_norm",
          "post_attention_layernorm": "post_attention_norm",
          "pre_feedforward_layernorm": "pre_ffw_norm",
          "post_feedforward_layernorm": "post_ffw_norm",
          "self_attn.q_norm": "attn/_query_norm", "self_attn.k_norm": "attn/_key_norm"}
_MATRICES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_GEMMA3_MODEL_TYPES = ("gemma3_text", "gemma3")
GEMMA2_MODEL_TYPES = ("gemma2",)


def text_model_name(name: str) -> str | None:
  """A checkpoint tensor name -> its ``model.*`` text-model name, or None if not text."""
  for old, new in (("model.language_model.", "model."), ("language_model.model.", "model."),
                   ("language_model.", "")):
    if name.startswith(old):
      name = new + name[len(old):]
      break
  if name.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
    return None  # Newer multimodal checkpoints: vision is dictlearn_gemma.load_vision's.
  return name if name.startswith("model.") else None


def hf_to_gemma_params(tensors: Mapping[str, Any], *, norm_offset: float = 0.0,
                       source: str = "checkpoint", gemma2_head_dim: int | None = None
                       ) -> dict[str, np.ndarray]:
  """transformers-named Gemma 3 (or Gemma 2) tensors -> the canonical flax-named tree.

  Args:
    tensors: ``model.*`` names (see ``text_model_name``) -> arrays.
    norm_offset: subtracted from every RMSNorm weight (1.0 for GGUF, which stores 1+scale).
    source: named in error messages.
    gemma2_head_dim: set for a Gemma 2 checkpoint (no QK-norm, so the head size, which
      Gemma 3 reads off the q_norm weight, must come from the config).

  Raises:
    ValueError: not a Gemma 3 (Gemma 2) text model, or missing tensors (all named).
  """
  family = "Gemma 3" if gemma2_head_dim is None else "Gemma 2"
  emb = tensors.get("model.embed_tokens.weight")
  if emb is None:
    raise ValueError(f"{source}: not a {family} checkpoint (no model.embed_tokens.weight; "
                     f"found e.g. {sorted(tensors)[:4]})")
  layers = {int(m.group(1)) for k in tensors if (m := re.match(r"model\.layers\.(\d+)\.", k))}
  num_layers = max(layers) + 1 if layers else 0
  if num_layers == 0:
    raise ValueError(f"{source}: not a {family} checkpoint (no model.layers.* tensors)")
  norms = dict(_NORMS)
  if gemma2_head_dim is None:
    if "model.layers.0.self_attn.q_norm.weight" not in tensors:
      raise ValueError(f"{source}: not a Gemma 3 checkpoint (layer 0 has no self_attn.q_norm: "
                       "Gemma 1/2 and other models have no QK-norm)")
  else:
    norms = {hf: flax for hf, flax in _NORMS.items() if not hf.startswith("self_attn.")}
  wanted = ["model.norm.weight"] + [
      f"model.layers.{i}.{part}.weight" for i in range(num_layers)
      for part in (*_MATRICES, *norms)]
  missing = [k for k in wanted if k not in tensors]
  if missing:
    raise ValueError(f"{source}: missing {len(missing)} {family} tensor(s): {name_some(missing)}")

  head_dim = gemma2_head_dim or tensors["model.layers.0.self_attn.q_norm.weight"].shape[0]
  d_model = emb.shape[1]

  def norm(w):
    return np.asarray(w, np.float32) - norm_offset if norm_offset else np.asarray(w)

  def heads(w, axis_heads_first=True):
    w = np.asarray(w)
    if axis_heads_first:  # (n*H, D) -> (n, D, H)
      return w.reshape(-1, head_dim, d_model).transpose(0, 2, 1)
    return w.reshape(d_model, -1, head_dim).transpose(1, 2, 0)  # (D, n*H) -> (n, H, D)

  out = {PREFIX + "embedder/input_embedding": np.asarray(emb),
         PREFIX + "final_norm/scale": norm(tensors["model.norm.weight"])}
  for i in range(num_layers):
    get = lambda part: tensors[f"model.layers.{i}.{part}.weight"]
    p = layer_prefix(i)
    q, k, v = heads(get("self_attn.q_proj")), heads(get("self_attn.k_proj")), heads(
        get("self_attn.v_proj"))
    if q.shape[0] == k.shape[0]:
      out[p + "attn/qkv_einsum/w"] = np.stack([q, k, v])
    else:
      out[p + "attn/q_einsum/w"] = q
      out[p + "attn/kv_einsum/w"] = np.stack([k, v])
    out[p + "attn/attn_vec_einsum/w"] = heads(get("self_attn.o_proj"), axis_heads_first=False)
    for hf, flax in norms.items():
      out[p + f"{flax}/scale"] = norm(get(hf))
    out[p + "mlp/gating_einsum/w"] = np.stack([np.asarray(get("mlp.gate_proj")),
                                               np.asarray(get("mlp.up_proj"))])
    out[p + "mlp/linear/w"] = np.asarray(get("mlp.down_proj")).T
  return out


def safetensors_files(folder: str) -> list[str]:
  """The .safetensors files of a folder: those its index names, else every one in it."""
  index = os.path.join(folder, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map", {})
    return sorted({os.path.join(folder, name) for name in weight_map.values()})
  return sorted(glob.glob(os.path.join(folder, "*.safetensors")))


def read_hf_config(folder: str) -> dict | None:
  """``config.json`` of a folder as a dict, or None when there is none."""
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def check_hf_config(folder: str, model_types: tuple[str, ...] = _GEMMA3_MODEL_TYPES
                    ) -> dict | None:
  """Reads ``config.json`` if present; raises ValueError if it names another model."""
  config = read_hf_config(folder)
  model_type = None if config is None else config.get("model_type")
  if model_type is not None and model_type not in model_types:
    family = "Gemma 2" if model_types == GEMMA2_MODEL_TYPES else "Gemma 3"
    hint = (" Gemma 2 loads with dictlearn_penzai.load_gemma (or dictlearn_gemma."
            "load_checkpoint)." if model_type in GEMMA2_MODEL_TYPES else "")
    raise ValueError(f"{folder!r} holds a {model_type!r} model (config.json), not {family} "
                     f"(model_type {' or '.join(model_types)}).{hint}")
  return config


def load_safetensors_params(folder: str | os.PathLike) -> dict[str, np.ndarray]:
  """Canonical params from a transformers Gemma 3 safetensors folder (or one .safetensors file)."""
  folder = os.fspath(folder)
  if os.path.isdir(folder):
    check_hf_config(folder)
  tensors, source = read_safetensors_tensors(folder)
  return hf_to_gemma_params(tensors, source=source)


def read_safetensors_tensors(folder: str | os.PathLike) -> tuple[dict[str, np.ndarray], str]:
  """(text-model tensors by ``model.*`` name, source) of a safetensors folder or file."""
  from safetensors import safe_open

  folder = os.fspath(folder)
  if os.path.isfile(folder) and folder.endswith(".safetensors"):
    files, source = [folder], folder
  else:
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"no safetensors folder at {folder!r}")
    files, source = safetensors_files(folder), folder
    if not files:
      raise FileNotFoundError(f"no .safetensors files in {folder!r}")
  tensors = {}
  for path in files:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path!r} (listed in model.safetensors.index.json) is missing")
    with safe_open(path, framework="numpy") as f:
      for name in f.keys():
        text_name = text_model_name(name)
        if text_name is not None:
          tensors[text_name] = f.get_tensor(name)
  return tensors, source


def load_gemma2_safetensors_params(folder: str | os.PathLike
                                   ) -> tuple[dict[str, np.ndarray], Gemma2Config]:
  """(canonical params, config) of a transformers ``Gemma2ForCausalLM`` safetensors folder
  (or one ``.safetensors`` file in it).

  The folder's ``config.json`` is required: Gemma 2 tensors do not give the head size, the
  soft-caps or the window. The canonical tree is Gemma 3's without the QK-norm scales.

  Raises:
    ValueError: no config.json, a config for another model, or missing tensors.
  """
  path = os.fspath(folder)
  folder = os.path.dirname(path) if path.endswith(".safetensors") else path
  if not os.path.exists(path):
    raise FileNotFoundError(f"no safetensors folder at {path!r}")
  hf = check_hf_config(folder, GEMMA2_MODEL_TYPES)
  if hf is None:
    raise ValueError(f"{folder!r} has no config.json; a Gemma 2 folder needs it (head_dim, "
                     "soft-caps and window are not in the tensors)")
  config = Gemma2Config.from_hf_config(hf, source=os.path.join(folder, "config.json"))
  tensors, source = read_safetensors_tensors(path)
  return hf_to_gemma_params(tensors, source=source, gemma2_head_dim=config.head_dim), config
