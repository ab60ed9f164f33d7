"""dictlearn: JumpReLU sparse autoencoders and transcoders in pure JAX.

The core knows no neural-network framework: dictionaries are pytrees, the math is plain
functions over them. See ``dictlearn_penzai`` for Gemma 3 in penzai.
"""

from dictlearn.dictionary import (
    DictMeta,
    Dictionary,
    JumpReLUSAE,
    Transcoder,
    decode,
    encode,
    forward,
    jumprelu,
    pre_activations,
    random_dictionary,
)
from dictlearn.crosslayer import CrossLayerTranscoder
from dictlearn import activation_data, analysis, catalog, crosslayer, interventions, metrics, sites
from dictlearn.io import load, save
from dictlearn.sparse import SparseCodes, decode_sparse, encode_decode, encode_sparse
from dictlearn import attribution, graphs, sharding
from dictlearn import dashboards

__version__ = "0.1.0"


def __getattr__(name):
  # dictlearn.train needs optax (the "train" extra), so it is imported on first use.
  if name == "train":
    import importlib
    return importlib.import_module("dictlearn.train")
  raise AttributeError(f"module 'dictlearn' has no attribute {name!r}")
