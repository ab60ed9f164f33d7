"""``load_gemma3``: a penzai Gemma 3 and its tokenizer from any checkpoint format;
``load_gemma``: Gemma 3 or Gemma 2, whichever the files hold.

Reading the checkpoint is framework-free and lives in ``dictlearn_gemma.loading.load_params``
(GGUF, transformers safetensors, the ``gemma`` package's orbax checkpoints, ``kaggle:``
handles); this module places the weights in a penzai model with ``from_gemma_params``.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp

from dictlearn_gemma.config import Gemma2Config, Gemma3Config
from dictlearn_gemma.loading import load_checkpoint, load_params
from dictlearn_penzai.gemma2_model import from_gemma2_params
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


def load_gemma(source: str | os.PathLike, *, config: str | Gemma3Config | Gemma2Config = "auto",
               dtype: Any = jnp.float32, activation_dtype: Any = jnp.float32,
               vision: bool = True):
  """Loads a Gemma 3 or Gemma 2 text model and its tokenizer, telling them apart by the files.

  Gemma 2 is recognised by config.json ``model_type`` "gemma2" (``Gemma2ForCausalLM``),
  GGUF ``general.architecture`` "gemma2", or a flax/orbax tree with post-attention norms
  and no QK-norm; it is built as penzai's own Gemma 2 (``from_gemma2_params``). Anything
  else goes the way of ``load_gemma3``.

  Args:
    source: as ``load_gemma3`` (GGUF file, safetensors folder, orbax folder, ``kaggle:``).
    config: "auto" (from the files and shapes), a preset name, a ``Gemma3Config`` or a
      ``Gemma2Config`` (needed for a Gemma 2 flax tree of a custom size).
    dtype, activation_dtype: as ``load_gemma3``.
    vision: for a Gemma 3 4B+ safetensors or orbax checkpoint with vision weights, attach
      them (``dictlearn_penzai.vision.attach_vision``): the same text model, which also
      reads images through ``vision.prepare``. False: the text model alone.

  Returns:
    ``(model, tokenizer)``: a penzai ``TransformerLM`` with HookPoints at every site, and a
    ``dictlearn_gemma.Tokenizer`` (None, with a warning, when none is found).

  Raises:
    FileNotFoundError, ValueError: as ``load_gemma3``; a Gemma 1 checkpoint; a config of
      the other family than the checkpoint's.
  """
  auto = isinstance(config, str) and config.lower() == "auto"
  ckpt = load_checkpoint(source, config=None if auto or isinstance(config, Gemma3Config)
                         else config, vision=vision)
  if ckpt.architecture == "gemma2":
    if isinstance(config, Gemma3Config):
      raise ValueError(f"{os.fspath(source)!r} holds a Gemma 2 model; config is a Gemma3Config")
    model = from_gemma2_params(ckpt.params, ckpt.config, dtype=dtype,
                               activation_dtype=activation_dtype)
  else:
    if isinstance(config, Gemma2Config):
      raise ValueError(f"{os.fspath(source)!r} holds a Gemma 3 model; config is a Gemma2Config")
    model = from_gemma_params(ckpt.params, preset=config, dtype=dtype,
                              activation_dtype=activation_dtype)
    if ckpt.vision is not None:
      from dictlearn_penzai.vision import attach_vision

      model = attach_vision(model, ckpt.vision, dtype=dtype)
  return model, ckpt.tokenizer
