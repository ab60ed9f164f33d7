"""dictlearn_penzai: Gemma 3 (and Gemma 2) in penzai, with named sites and dictionary hooks."""

from dictlearn_penzai.hookpoint import HookPoint

# Named sites, hooks, dictionary layers and the tutorial's analyses.
from dictlearn_penzai import analysis, hooks, layers, sites
from dictlearn_penzai.hooks import (
    ActivationCache, ablate, capture, clamp, read_cache, remove_hooks, run_with_cache, splice,
    steer)
from dictlearn_penzai.layers import SAELayer, TranscoderLayer
from dictlearn_penzai.sites import Site, site_of

# Gemma 3 in penzai: configs, the model, loaders, tokenizer and KV-cached sampling.
from dictlearn_gemma.config import PRESETS, Gemma3Config, get_preset
from dictlearn_penzai.gemma3_model import from_gemma_params, hook_points, model_config
from dictlearn_gemma.params import init_gemma_params, normalize_gemma_params
from dictlearn_penzai.loading import load_gemma, load_gemma3, load_gemma3_params
from dictlearn_penzai.sampling import (
    forward_logits, generate, generate_tokens, make_kv_cached, pad_batch)
from dictlearn_gemma.tokenizer import Tokenizer, format_chat

# Gemma 2 (Gemma Scope 1's models): penzai's own Gemma 2 with the same HookPoints.
from dictlearn_gemma.config import GEMMA2_PRESETS, Gemma2Config
from dictlearn_penzai.gemma2_model import from_gemma2_params

# Harvesting activations for training (dictlearn.train.fit reads the shards).
from dictlearn_penzai.harvesting import harvest

# Corpus-level evals (SAEBench core metrics) of many dictionaries in one pass.
from dictlearn_penzai.evaluate import evaluate
from dictlearn_penzai import dashboards  # feature dashboards: collect, write
