"""Gemma 3's vision weights (SigLIP + projector) from transformers safetensors or flax/orbax.

Both formats are converted to the canonical vision tree of ``dictlearn_gemma.vision``
(the ``gemma`` package's flax names). transformers names, after an optional ``model.``
prefix (newer checkpoints) and ``vision_tower.`` then an optional ``vision_model.``
(transformers 5.x saves ``vision_tower.embeddings...``; the hub's files hold
``vision_tower.vision_model.embeddings...`` or ``model.vision_tower.vision_model...``):

  embeddings.patch_embedding.weight (D, 3, p, p)  -> embedding/kernel (p, p, 3, D)
  embeddings.position_embedding.weight (P, D)     -> pos_embedding (1, P, D)
  encoder.layers.{i}.layer_norm1 / layer_norm2    -> LayerNorm_0 / LayerNorm_1 (weight = scale)
  encoder.layers.{i}.self_attn.{q,k,v}_proj (H*K, D) -> {query,key,value}/kernel (D, H, K)
  encoder.layers.{i}.self_attn.out_proj (D, H*K)  -> out/kernel (H, K, D)
  encoder.layers.{i}.mlp.fc1 (F, D), fc2 (D, F)   -> MlpBlock_0/Dense_0 (D, F), Dense_1 (F, D)
  post_layernorm                                  -> Transformer/encoder_norm
  multi_modal_projector.mm_input_projection_weight (D, T) -> mm_input_projection/w (D, T)
  multi_modal_projector.mm_soft_emb_norm.weight   -> mm_soft_embedding_norm/scale

The flax checkpoints (Kaggle FLAT: ``SigLiPFromPatches_0/siglip_encoder/...`` and
``transformer/embedder/mm_*``; or the NESTED ``model.init()`` layout with
``vision_encoder/siglip_encoder/...`` and ``embedder/mm_*``) need only flattening.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from dictlearn_gemma.load_safetensors import read_hf_config, safetensors_files
from dictlearn_gemma.params import flatten_tree
from dictlearn_gemma.vision import (
    ENCODER, PROJECTION, SOFT_NORM, SiglipConfig, check_vision_params, infer_siglip_config)

# Gemma 3's ids (HF config.json: boi_token_index, eoi_token_index, image_token_index).
GEMMA3_IMAGE_IDS = dict(boi_id=255_999, eoi_id=256_000, image_id=262_144)
_HF_TOWER = re.compile(r"^(model\.)?vision_tower\.(vision_model\.)?")
_HF_PROJECTOR = re.compile(r"^(model\.)?multi_modal_projector\.")
_HF_BLOCK = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")


@dataclasses.dataclass
class VisionCheckpoint:
  """What ``load_vision`` read.

  Attributes:
    params: the canonical vision tree (numpy; see ``dictlearn_gemma.vision``).
    config: its ``SiglipConfig``.
    boi_id, eoi_id, image_id: ``<start_of_image>``, ``<end_of_image>`` and
      ``<image_soft_token>`` ids (config.json, else Gemma 3's 255999, 256000, 262144).
  """

  params: dict[str, np.ndarray]
  config: SiglipConfig
  boi_id: int = GEMMA3_IMAGE_IDS["boi_id"]
  eoi_id: int = GEMMA3_IMAGE_IDS["eoi_id"]
  image_id: int = GEMMA3_IMAGE_IDS["image_id"]

  @property
  def d_model(self) -> int:
    return int(self.params[PROJECTION].shape[-1])


def is_vision_tensor(name: str) -> bool:
  """Whether a transformers tensor name belongs to the vision tower or the projector."""
  return bool(_HF_TOWER.match(name) or _HF_PROJECTOR.match(name))


def _hf_block(i: str, rest: str, w: np.ndarray, heads: int, out: dict, source: str, name: str):
  b = f"{ENCODER}Transformer/encoderblock_{i}/"
  a = b + "MultiHeadDotProductAttention_0/"
  norms = {"layer_norm1": "LayerNorm_0", "layer_norm2": "LayerNorm_1"}
  attn = {"q_proj": "query", "k_proj": "key", "v_proj": "value"}
  part, leaf = rest.rsplit(".", 1)
  if part in norms:
    out[b + f"{norms[part]}/{'scale' if leaf == 'weight' else 'bias'}"] = w
  elif part.startswith("self_attn.") and part[10:] in attn:
    key = a + attn[part[10:]]
    d = w.shape[-1] if leaf == "weight" else None
    out[key + ("/kernel" if leaf == "weight" else "/bias")] = (
        w.T.reshape(d, heads, -1) if leaf == "weight" else w.reshape(heads, -1))
  elif part == "self_attn.out_proj":
    out[a + ("out/kernel" if leaf == "weight" else "out/bias")] = (
        w.T.reshape(heads, -1, w.shape[0]) if leaf == "weight" else w)
  elif part in ("mlp.fc1", "mlp.fc2"):
    dense = "Dense_0" if part == "mlp.fc1" else "Dense_1"
    out[b + f"MlpBlock_0/{dense}/{'kernel' if leaf == 'weight' else 'bias'}"] = (
        w.T if leaf == "weight" else w)
  else:
    raise ValueError(f"{source}: unexpected vision tensor {name!r}")


def hf_to_vision_params(tensors: Mapping[str, Any], heads: int, source: str = "checkpoint"
                        ) -> dict[str, np.ndarray]:
  """transformers-named vision tensors (see the module doc) -> the canonical vision tree.

  Raises:
    ValueError: a vision tensor this converter does not know (named).
  """
  out: dict[str, np.ndarray] = {}
  for name, value in tensors.items():
    w = np.asarray(value)
    if (m := _HF_PROJECTOR.match(name)):
      rest = name[m.end():]
      if rest == "mm_input_projection_weight":
        out[PROJECTION] = w
      elif rest == "mm_soft_emb_norm.weight":
        out[SOFT_NORM] = w
      else:
        raise ValueError(f"{source}: unexpected projector tensor {name!r}")
      continue
    m = _HF_TOWER.match(name)
    if m is None:
      continue  # Text tensors are the text loader's.
    rest = name[m.end():]
    if rest == "embeddings.patch_embedding.weight":
      out[ENCODER + "embedding/kernel"] = w.transpose(2, 3, 1, 0)
    elif rest == "embeddings.patch_embedding.bias":
      out[ENCODER + "embedding/bias"] = w
    elif rest == "embeddings.position_embedding.weight":
      out[ENCODER + "pos_embedding"] = w[None]
    elif rest in ("post_layernorm.weight", "post_layernorm.bias"):
      leaf = "scale" if rest.endswith("weight") else "bias"
      out[ENCODER + f"Transformer/encoder_norm/{leaf}"] = w
    elif (b := _HF_BLOCK.match(rest)):
      _hf_block(b.group(1), b.group(2), w, heads, out, source, name)
    else:
      raise ValueError(f"{source}: unexpected vision tensor {name!r} (a SigLIP head? Gemma 3's "
                       "tower has none)")
  return out


def flax_to_vision_params(tree: Mapping) -> dict[str, np.ndarray]:
  """The vision part of a ``gemma`` package param tree (FLAT, NESTED or ``{"params": ...}``)
  as the canonical vision tree; text tensors are left out."""
  if set(tree) >= {"params", "step"} or set(tree) == {"params"}:
    tree = tree["params"]
  out = {}
  for key, value in flatten_tree(tree).items():
    key = re.sub(r"^(transformer/)?vision_encoder/", "SigLiPFromPatches_0/", key)
    if key.startswith("SigLiPFromPatches_0/"):
      out[key] = np.asarray(value)
    elif re.search(r"(^|/)embedder/mm_", key):
      out["transformer/" + key.removeprefix("transformer/")] = np.asarray(value)
  return out


def _config_from_hf(hf: dict | None, params, *, source: str) -> tuple[SiglipConfig, dict]:
  hf = hf or {}
  vision = hf.get("vision_config") or {}
  heads = vision.get("num_attention_heads")
  ids = {"boi_id": hf.get("boi_token_index", hf.get("boi_token_id", GEMMA3_IMAGE_IDS["boi_id"])),
         "eoi_id": hf.get("eoi_token_index", hf.get("eoi_token_id", GEMMA3_IMAGE_IDS["eoi_id"])),
         "image_id": hf.get("image_token_index",
                            hf.get("image_token_id", GEMMA3_IMAGE_IDS["image_id"]))}
  pos = params.get(ENCODER + "pos_embedding")
  if pos is not None and vision.get("image_size") and vision.get("patch_size"):
    want = (vision["image_size"] // vision["patch_size"]) ** 2
    if pos.shape[-2] != want:
      raise ValueError(f"{source}: the position embedding holds {pos.shape[-2]} patches but "
                       f"config.json's vision image_size {vision['image_size']} / patch_size "
                       f"{vision['patch_size']} needs {want}")
  config = infer_siglip_config(
      params, heads=heads, mm_tokens_per_image=hf.get("mm_tokens_per_image", 256),
      layer_norm_eps=vision.get("layer_norm_eps", 1e-6))
  if vision:
    for field, key in (("image_size", "image_size"), ("patch_size", "patch_size"),
                       ("hidden", "hidden_size"), ("intermediate", "intermediate_size"),
                       ("layers", "num_hidden_layers")):
      if key in vision and vision[key] != getattr(config, field):
        raise ValueError(f"{source}: config.json says vision {key}={vision[key]} but the "
                         f"weights have {getattr(config, field)}")
  return config, ids


def has_vision(folder: str | os.PathLike) -> bool:
  """Whether a transformers safetensors folder holds vision weights (tensor names only)."""
  from safetensors import safe_open

  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    return False
  for path in safetensors_files(folder):
    if os.path.isfile(path):
      with safe_open(path, framework="numpy") as f:
        if any(is_vision_tensor(n) for n in f.keys()):
          return True
  return False


def load_hf_vision(folder: str | os.PathLike) -> VisionCheckpoint:
  """The vision weights of a transformers ``Gemma3ForConditionalGeneration`` folder.

  The folder's config.json gives the heads (16 for Gemma 3), the pooled token count and the
  special ids; without one, Gemma 3's values are assumed.

  Raises:
    FileNotFoundError: no folder or no safetensors files.
    ValueError: no vision tensors, unknown, missing or misshaped ones (named).
  """
  from safetensors import safe_open

  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"no safetensors folder at {folder!r}")
  files = safetensors_files(folder)
  if not files:
    raise FileNotFoundError(f"no .safetensors files in {folder!r}")
  tensors = {}
  for path in files:
    with safe_open(path, framework="numpy") as f:
      for name in f.keys():
        if is_vision_tensor(name):
          tensors[name] = f.get_tensor(name)
  if not tensors:
    raise ValueError(f"{folder!r} holds no vision weights (vision_tower.* / "
                     "multi_modal_projector.*): a text-only Gemma 3 (270M, 1B or a "
                     "Gemma3ForCausalLM export) cannot read images")
  hf = read_hf_config(folder) or {}
  heads = (hf.get("vision_config") or {}).get("num_attention_heads", 16)
  params = hf_to_vision_params(tensors, heads, source=folder)
  config, ids = _config_from_hf(hf, params, source=folder)
  check_vision_params(params, config, source=folder)
  return VisionCheckpoint(params, config, **ids)


def vision_from_flax_tree(tree: Mapping, *, source: str = "checkpoint",
                          mm_tokens_per_image: int = 256) -> VisionCheckpoint:
  """The vision weights of a restored ``gemma`` flax tree (``load_orbax.read_orbax_tree``).

  Flax checkpoints carry no config: the pooled token count is Gemma 3's 256 unless given,
  and the special ids are Gemma 3's.

  Raises:
    ValueError: no vision tensors, or missing, unexpected or misshaped ones (named).
  """
  params = flax_to_vision_params(tree)
  if not params:
    raise ValueError(f"{source}: no vision weights (SigLiPFromPatches_0/...): a text-only "
                     "Gemma 3 (270M, 1B) cannot read images")
  try:
    config = infer_siglip_config(params, mm_tokens_per_image=mm_tokens_per_image)
  except ValueError as e:
    raise ValueError(f"{source}: {e}. Flax checkpoints carry no config: pass "
                     "mm_tokens_per_image to dictlearn_gemma.load_vision (or load the text "
                     "model alone with load_gemma(..., vision=False))") from e
  check_vision_params(params, config, source=source)
  return VisionCheckpoint(params, config)


def load_vision(source: str | os.PathLike, *, mm_tokens_per_image: int | None = None
                ) -> VisionCheckpoint:
  """Vision weights from a transformers safetensors folder or a ``gemma`` orbax checkpoint.

  Args:
    source: the folder (as ``dictlearn_gemma.load_params`` takes it).
    mm_tokens_per_image: for flax checkpoints, which carry no config (default 256).

  Raises:
    FileNotFoundError, ValueError: nothing there, or no (valid) vision weights.
  """
  path = os.fspath(source)
  if os.path.isdir(path) and any(n.endswith(".safetensors") for n in os.listdir(path)):
    return load_hf_vision(path)
  from dictlearn_gemma.load_orbax import read_orbax_tree

  return vision_from_flax_tree(read_orbax_tree(path), source=path,
                               mm_tokens_per_image=mm_tokens_per_image or 256)


__all__ = ["GEMMA3_IMAGE_IDS", "VisionCheckpoint", "flax_to_vision_params", "has_vision",
           "hf_to_vision_params", "is_vision_tensor", "load_hf_vision", "load_vision",
           "vision_from_flax_tree"]
