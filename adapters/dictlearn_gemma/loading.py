"""``load_params``: Gemma 3 weights (the canonical tree) and tokenizer from any checkpoint format.

Sources, recognised in this order:

  ``kaggle:google/gemma-3/flax/gemma3-1b``  downloaded with kagglehub (its cache and
                                            credentials), then loaded as an orbax folder
  ``*.gguf`` file                            llama.cpp GGUF, tokenizer from its metadata
  folder or file with ``*.safetensors``      transformers Gemma 3 (text or multimodal)
  folder with an orbax checkpoint            the ``gemma`` package's (Kaggle layout), at or
                                            below it

Weights come back as the canonical flat tree of ``dictlearn_gemma.params`` (numpy), ready for
any framework's model (``dictlearn_penzai.load_gemma3`` builds a penzai one from it). The
tokenizer is read from the GGUF metadata, or from a ``tokenizer.model`` beside (or,
for orbax, up to two folders above) the weights; when there is none, a warning says so and
the tokenizer returned is None.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

from dictlearn_gemma.config import Gemma2Config, get_gemma2_preset
from dictlearn_gemma.load_orbax import (
    find_checkpoint, find_tokenizer, load_orbax_params, read_orbax_tree)
from dictlearn_gemma.load_safetensors import (
    GEMMA2_MODEL_TYPES, hf_to_gemma_params, load_gemma2_safetensors_params,
    load_safetensors_params, read_hf_config, read_safetensors_tensors)
from dictlearn_gemma.load_vision import (
    VisionCheckpoint, flax_to_vision_params, has_vision, load_hf_vision, vision_from_flax_tree)
from dictlearn_gemma.params import architecture_of, normalize_gemma_params, resolve_gemma2_config
from dictlearn_gemma.tokenizer import Tokenizer

KAGGLE_PREFIX = "kaggle:"


def _kaggle_download(handle: str) -> str:
  try:
    import kagglehub
  except ImportError as e:
    raise ImportError(
        f"loading {KAGGLE_PREFIX}{handle} needs kagglehub: pip install 'dictlearn[kaggle]' "
        "(and Kaggle credentials with the Gemma license accepted); or download the model "
        "yourself and pass its folder") from e
  return kagglehub.model_download(handle)


def _is_gguf(path: str) -> bool:
  if not os.path.isfile(path):
    return False
  with open(path, "rb") as f:
    return f.read(4) == b"GGUF"


def _tokenizer_or_warn(path: str | None, where: str) -> Tokenizer | None:
  if path is not None:
    return Tokenizer.from_file(path)
  warnings.warn(f"no tokenizer.model found for {where!r}; returning tokenizer=None. Put "
                "Gemma's tokenizer.model beside the weights, or build one with "
                "dictlearn_gemma.Tokenizer.from_file / from_gguf", stacklevel=3)
  return None



def _local_path(source, what: str) -> str:
  """The local path of ``source``, a ``kaggle:`` handle downloaded first.

  Raises:
    FileNotFoundError: nothing at the path.
  """
  if isinstance(source, str) and source.startswith(KAGGLE_PREFIX):
    source = _kaggle_download(source[len(KAGGLE_PREFIX):])
  path = os.fspath(source)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no {what} checkpoint at {path!r} (expected a .gguf file, a "
                            "safetensors folder, an orbax checkpoint folder, or kaggle:<handle>)")
  return path


def load_params(source: str | os.PathLike) -> tuple[dict[str, Any], Tokenizer | None]:
  """(canonical param tree, tokenizer or None) from any supported source; see module doc.

  Args:
    source: a ``.gguf`` file; a transformers safetensors folder or file
      (``Gemma3ForCausalLM``, or the text part of a multimodal checkpoint); an orbax
      checkpoint folder written by the ``gemma`` package (Kaggle layout: the download
      folder or the checkpoint inside it); or ``"kaggle:<handle>"`` (needs kagglehub).

  Returns:
    ``(params, tokenizer)``: the canonical flat tree (numpy arrays; GGUF weights
    dequantized to float32, others in the checkpoint's dtype) and a ``Tokenizer`` (None,
    with a warning, when none is found with the weights).

  Raises:
    FileNotFoundError: nothing (recognisable) at ``source``.
    ValueError: not a Gemma 3 checkpoint, missing tensors, or GGUF tensor types that
      cannot be dequantized.
  """
  path = _local_path(source, "Gemma 3")
  if _is_gguf(path):
    from dictlearn_gemma.load_gguf import load_gguf_params

    params, gf = load_gguf_params(path)
    tokenizer = Tokenizer.from_gguf(gf) if "tokenizer.ggml.tokens" in gf.metadata else None
    return params, tokenizer
  if os.path.isfile(path):
    if path.endswith(".safetensors"):
      params = load_safetensors_params(path)
      tok = os.path.join(os.path.dirname(path), "tokenizer.model")
      return params, _tokenizer_or_warn(tok if os.path.isfile(tok) else None, path)
    raise ValueError(f"{path!r} is neither a GGUF nor a .safetensors file; "
                     "not a Gemma 3 checkpoint")
  has_safetensors = any(name.endswith(".safetensors") for name in os.listdir(path))
  if has_safetensors:
    params = load_safetensors_params(path)
    tok = os.path.join(path, "tokenizer.model")
    return params, _tokenizer_or_warn(tok if os.path.isfile(tok) else None, path)
  # find_checkpoint raises FileNotFoundError when there is no checkpoint at or below path.
  params = load_orbax_params(path)
  return params, _tokenizer_or_warn(find_tokenizer(find_checkpoint(path)), path)


@dataclasses.dataclass
class GemmaCheckpoint:
  """What ``load_checkpoint`` read: which Gemma, its canonical tree, tokenizer and config.

  Attributes:
    architecture: "gemma3" or "gemma2".
    params: the canonical flat tree (``dictlearn_gemma.params``; Gemma 2's lacks the
      QK-norm scales).
    tokenizer: a ``Tokenizer``, or None (with a warning) when none is found.
    config: the ``Gemma2Config`` for Gemma 2 (from config.json, GGUF metadata, or the
      preset the shapes match); None for Gemma 3, whose size the shapes give.
    vision: Gemma 3 4B+ only: the SigLIP encoder and projector (``dictlearn_gemma.
      load_vision``) when the safetensors or orbax checkpoint holds them and ``vision`` was
      asked for; None otherwise (GGUF files keep vision in a separate mmproj file).
  """

  architecture: str
  params: dict[str, Any]
  tokenizer: Tokenizer | None
  config: Gemma2Config | None = None
  vision: VisionCheckpoint | None = None


def load_checkpoint(source: str | os.PathLike, config: str | Gemma2Config | None = None,
                    *, vision: bool = False) -> GemmaCheckpoint:
  """Reads a Gemma 3 or Gemma 2 checkpoint of any supported format, telling them apart.

  Gemma 2 is recognised by config.json (``model_type`` "gemma2"), by GGUF
  ``general.architecture`` "gemma2", or, for flax/orbax trees and bare safetensors, by its
  tensors (post-attention norms and no QK-norm).

  Args:
    source: as ``load_params``.
    config: Gemma 2 only: a ``Gemma2Config`` or preset name ("2b", "9b", "27b") for sources
      that do not carry one (a flax tree of a custom size, a lone .safetensors file);
      checked against the shapes. None: from the files, else the preset of these shapes.
    vision: also read the vision weights of a Gemma 3 4B+ checkpoint (``.vision``).

  Raises:
    FileNotFoundError, ValueError: as ``load_params``; also a Gemma 1 checkpoint, or a
      Gemma 2 one whose config cannot be found.
  """
  path = _local_path(source, "Gemma")
  if _is_gguf(path):
    from dictlearn_gemma.load_gguf import gguf_gemma2_config, gguf_to_gemma_params, read_gguf

    gf = read_gguf(path)
    params = gguf_to_gemma_params(gf, architectures=("gemma3", "gemma2"))
    tokenizer = Tokenizer.from_gguf(gf) if "tokenizer.ggml.tokens" in gf.metadata else None
    if gf.metadata.get("general.architecture") == "gemma2":
      found = gguf_gemma2_config(gf) if config is None else config
      return GemmaCheckpoint("gemma2", params, tokenizer, resolve_gemma2_config(params, found))
    return GemmaCheckpoint("gemma3", params, tokenizer)
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  if os.path.isfile(path) or any(n.endswith(".safetensors") for n in os.listdir(path)):
    if os.path.isfile(path) and not path.endswith(".safetensors"):
      raise ValueError(f"{path!r} is neither a GGUF nor a .safetensors file; "
                       "not a Gemma checkpoint")
    tok = os.path.join(folder, "tokenizer.model")
    tokenizer = _tokenizer_or_warn(tok if os.path.isfile(tok) else None, path)
    hf = read_hf_config(folder)  # Beside a lone .safetensors file too.
    model_type = (hf or {}).get("model_type")
    if model_type in GEMMA2_MODEL_TYPES:
      params, found = load_gemma2_safetensors_params(path)
      return GemmaCheckpoint("gemma2", params, tokenizer,
                             resolve_gemma2_config(params, config or found))
    seen = (load_hf_vision(folder) if vision and os.path.isdir(path) and has_vision(path)
            else None)
    if model_type is not None:  # config.json names Gemma 3 (or another model: an error).
      return GemmaCheckpoint("gemma3", load_safetensors_params(path), tokenizer, vision=seen)
    tensors, where = read_safetensors_tensors(path)
    if "model.layers.0.self_attn.q_norm.weight" in tensors or config is None:
      return GemmaCheckpoint("gemma3", hf_to_gemma_params(tensors, source=where), tokenizer,
                             vision=seen)
    # No config.json and no QK-norm: Gemma 2 described by the caller's config.
    cfg = get_gemma2_preset(config)
    params = hf_to_gemma_params(tensors, source=where, gemma2_head_dim=cfg.head_dim)
    return GemmaCheckpoint("gemma2", params, tokenizer, resolve_gemma2_config(params, cfg))
  tree = read_orbax_tree(path)  # Once: text and vision come from the same restore.
  params = normalize_gemma_params(tree)
  tokenizer = _tokenizer_or_warn(find_tokenizer(find_checkpoint(path)), path)
  arch = architecture_of(params)
  if arch == "gemma2":
    return GemmaCheckpoint("gemma2", params, tokenizer, resolve_gemma2_config(params, config))
  seen = (vision_from_flax_tree(tree, source=path)
          if vision and flax_to_vision_params(tree) else None)
  return GemmaCheckpoint("gemma3", params, tokenizer, vision=seen)

