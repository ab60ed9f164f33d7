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

import os
import warnings
from typing import Any

from dictlearn_gemma.load_orbax import find_checkpoint, find_tokenizer, load_orbax_params
from dictlearn_gemma.load_safetensors import load_safetensors_params
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
  if isinstance(source, str) and source.startswith(KAGGLE_PREFIX):
    source = _kaggle_download(source[len(KAGGLE_PREFIX):])
  path = os.fspath(source)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no Gemma 3 checkpoint at {path!r} (expected a .gguf file, a "
                            "safetensors folder, an orbax checkpoint folder, or kaggle:<handle>)")
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
