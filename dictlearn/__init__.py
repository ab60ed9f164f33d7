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
from dictlearn import catalog, hookpoints, metrics
from dictlearn.io import load, save

__version__ = "0.1.0"
