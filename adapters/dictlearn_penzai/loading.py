"""``load_gemma3``: a penzai Gemma 3 and its tokenizer from any checkpoint format.

Reading the checkpoint is framework-free and lives in ``dictlearn_gemma.loading.load_params``
(GGUF, transformers safetensors, the ``gemma`` package's orbax checkpoints, ``kaggle:``
handles); this module places the weights in a penzai model with ``from_gemma_params``.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp

from dictlearn_gemma.config import Gemma3Config
from dictlearn_gemma.loading import load_params
from dictlearn_penzai.gemma3_model import from_gemma_params

# The framework-free loader under the name dictlearn_penzai has always exported.
load_gemma3_params = load_params


def load_gemma3(source: str | os.PathLike, *, preset: str | Gemma3Config = "auto",
                dtype: Any = jnp.float32, activation_dtype: Any = jnp.float32):
  """Loads a Gemma 3 text model and its tokenizer.

  Args:
    source: a ``.gguf`` file; a transformers safetensors folder (``Gemma3ForCausalLM``, or
      the ``language_model`` part of a multimodal checkpoint); an orbax checkpoint folder
      written by the ``gemma`` package (Kaggle layout: the download folder or the
      checkpoint inside it); or ``"kaggle:google/gemma-3/flax/gemma3-1b"`` (needs
      kagglehub). See ``dictlearn_gemma.loading``.
    preset: "auto" (from the shapes), "270m", "1b", "4b", "12b", "27b", or a Gemma3Config.
    dtype: parameter dtype (bfloat16 halves memory; GGUF weights are dequantized first).
    activation_dtype: activation/KV-cache dtype (float32 = the tutorial's upcast).

  Returns:
    ``(model, tokenizer)``: a penzai ``TransformerLM`` (see ``from_gemma_params``) and a
    ``dictlearn_gemma.Tokenizer`` (None, with a warning, when no tokenizer is found with
    the weights).

  Raises:
    FileNotFoundError: nothing (recognisable) at ``source``.
    ValueError: not a Gemma 3 checkpoint, missing tensors, a preset that does not match the
      shapes, or GGUF tensor types that cannot be dequantized.
  """
  params, tokenizer = load_params(source)
  model = from_gemma_params(params, preset=preset, dtype=dtype, activation_dtype=activation_dtype)
  return model, tokenizer
