"""dictlearn_penzai: Gemma 3 in penzai, with named sites and dictionary hooks."""

from dictlearn_penzai.hookpoint import HookPoint

# Named sites, hooks, dictionary layers and the tutorial's analyses.
from dictlearn_penzai import analysis, hooks, layers, sites
from dictlearn_penzai.hooks import (
    ActivationCache, ablate, capture, clamp, read_cache, remove_hooks, run_with_cache, splice,
    steer)
from dictlearn_penzai.layers import SAELayer, TranscoderLayer
from dictlearn_penzai.sites import Site, site_of
