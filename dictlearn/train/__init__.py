"""Training JumpReLU SAEs and transcoders in pure JAX (arXiv 2407.14435, Gemma Scope).

``fit(data, config=None, **settings) -> (dictionary, history)`` is the entry point; see
:mod:`dictlearn.train.loop` for the recipe, :class:`TrainConfig` for every setting and its
default, and :mod:`dictlearn.activation_data` for the data it reads.

Modules: ``config`` (``TrainConfig``: settings, derived defaults, validation), ``init``
(scales, biases and thresholds from the data; the initial state), ``step`` (the optimiser
and the jitted step), ``history`` (logged rows, the result's metadata), ``ste``
(pseudo-derivatives), ``objective`` (loss, init, folding the normalisation), ``optim``
(Adam, schedules, unit-norm decoder), ``resample`` (restarting rarely firing
latents), ``checkpoint`` (Gemma Scope 2 folder + exact train
state), ``loop`` (``fit``).
"""

from dictlearn.train.checkpoint import latest_checkpoint
from dictlearn.train.config import TrainConfig
from dictlearn.train.history import HISTORY_KEYS
from dictlearn.train.init import estimate_init, geometric_median, initial_state
from dictlearn.train.loop import fit
from dictlearn.train.step import compiled_step, make_optimizer, make_step

__all__ = ["fit", "latest_checkpoint", "TrainConfig", "HISTORY_KEYS", "geometric_median",
           "estimate_init", "initial_state", "make_optimizer", "make_step", "compiled_step"]
