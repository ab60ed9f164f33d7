"""dictlearn_gemma: Gemma 3 weights and tokenizer for any framework (numpy and jax only).

Modules:
  config            ``Gemma3Config``, ``PRESETS`` (built from ``dictlearn.catalog.MODELS``),
                    ``get_preset``
  params            the canonical flat parameter tree: names, expected shapes, layout
                    normalisation, size inference, checks, random init
  load_gguf         llama.cpp GGUF files (weights dequantized with the ``gguf`` package)
  load_safetensors  transformers safetensors folders (text or multimodal Gemma 3)
  load_orbax        orbax checkpoints written by Google's ``gemma`` package (Kaggle layout)
  tokenizer         ``Tokenizer`` (SentencePiece, from ``tokenizer.model`` or GGUF metadata),
                    ``format_chat``
  loading           ``load_params(source) -> (params, tokenizer)`` for every format above;
                    ``load_checkpoint(source)`` also reads Gemma 2 and says which it is
  corpus            text corpora (folders, files, strings, ``datasets``) cut into token
                    sequences with BOS first, for harvesting and evals
  image_preprocess  images -> SigLIP pixels, as transformers' Gemma3ImageProcessor (Pillow)
  vision            ``SiglipConfig``; SigLIP and the multimodal projector in JAX
                    (``encode_images``) for the 4B+ vision-language models
  load_vision       their vision weights from safetensors or flax/orbax (``load_vision``)

Nothing here imports a neural-network framework; ``dictlearn_penzai.load_gemma3`` builds a
penzai model from ``load_params``' tree. Needs the ``gemma`` extra:
``pip install 'dictlearn[gemma]'``.
"""

from dictlearn_gemma.config import PRESETS, Gemma3Config, get_preset
from dictlearn_gemma.params import (
    check_params, expected_shapes, infer_config, init_gemma_params, normalize_gemma_params,
    resolve_config)
from dictlearn_gemma.tokenizer import Tokenizer, format_chat
from dictlearn_gemma.loading import GemmaCheckpoint, load_checkpoint, load_params
from dictlearn_gemma.config import GEMMA2_PRESETS, Gemma2Config, get_gemma2_preset
from dictlearn_gemma.params import architecture_of, resolve_gemma2_config
