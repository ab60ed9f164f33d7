"""``load_gemma3``: one entry point for every checkpoint format, all ending in from_gemma_params.

Sources, recognised in this order:

  ``kaggle:google/gemma-3/flax/gemma3-1b``  downloaded with kagglehub (its cache and
                                            credentials), then loaded as a flax folder
  ``*.gguf`` file                            llama.cpp GGUF, tokenizer from its metadata
  folder or file with ``*.safetensors``      transformers Gemma 3 (text or multimodal)
  folder with an orbax checkpoint            Gemma flax (Kaggle layout), at or below it

The tokenizer is read from the GGUF metadata, or from a ``tokenizer.model`` beside (or,
for flax, up to two folders above) the weights; when there is none, a warning says so and
the tokenizer returned is None.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax.numpy as jnp

from dictlearn_penzai.gemma3_config import Gemma3Config
from dictlearn_penzai.gemma3_model import from_gemma_params
from dictlearn_penzai.load_flax import find_checkpoint, find_tokenizer, load_flax_params
from dictlearn_penzai.load_safetensors import load_safetensors_params
from dictlearn_penzai.tokenizer import Tokenizer

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
                "dictlearn_penzai.Tokenizer.from_file / from_gguf", stacklevel=3)
  return None


def load_gemma3_params(source: str | os.PathLike) -> tuple[dict[str, Any], Tokenizer | None]:
  """(canonical param tree, tokenizer or None) from any supported source; see module doc."""
  if isinstance(source, str) and source.startswith(KAGGLE_PREFIX):
    source = _kaggle_download(source[len(KAGGLE_PREFIX):])
  path = os.fspath(source)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no Gemma 3 checkpoint at {path!r} (expected a .gguf file, a "
                            "safetensors folder, an orbax checkpoint folder, or kaggle:<handle>)")
  if _is_gguf(path):
    from dictlearn_penzai.load_gguf import load_gguf_params

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
  params = load_flax_params(path)
  return params, _tokenizer_or_warn(find_tokenizer(find_checkpoint(path)), path)


def load_gemma3(source: str | os.PathLike, *, preset: str | Gemma3Config = "auto",
                dtype: Any = jnp.float32, activation_dtype: Any = jnp.float32):
  """Loads a Gemma 3 text model and its tokenizer.

  Args:
    source: a ``.gguf`` file; a transformers safetensors folder (``Gemma3ForCausalLM``, or
      the ``language_model`` part of a multimodal checkpoint); a Gemma flax/orbax checkpoint
      folder (Kaggle layout: the download folder or the checkpoint inside it); or
      ``"kaggle:google/gemma-3/flax/gemma3-1b"`` (needs kagglehub).
    preset: "auto" (from the shapes), "270m", "1b", "4b", "12b", "27b", or a Gemma3Config.
    dtype: parameter dtype (bfloat16 halves memory; GGUF weights are dequantized first).
    activation_dtype: activation/KV-cache dtype (float32 = the tutorial's upcast).

  Returns:
    ``(model, tokenizer)``: a penzai ``TransformerLM`` (see ``from_gemma_params``) and a
    ``Tokenizer`` (None, with a warning, when no tokenizer is found with the weights).

  Raises:
    FileNotFoundError: nothing (recognisable) at ``source``.
    ValueError: not a Gemma 3 checkpoint, missing tensors, a preset that does not match the
      shapes, or GGUF tensor types that cannot be dequantized.
  """
  params, tokenizer = load_gemma3_params(source)
  model = from_gemma_params(params, preset=preset, dtype=dtype, activation_dtype=activation_dtype)
  return model, tokenizer
