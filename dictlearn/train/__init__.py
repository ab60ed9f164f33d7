"""Training JumpReLU SAEs and transcoders in pure JAX (arXiv 2407.14435, Gemma Scope).

``fit(data, kind=..., width=..., ...) -> (dictionary, history)`` is the entry point; see
:mod:`dictlearn.train.loop` for the recipe and :mod:`dictlearn.activation_data` for the
data it reads.

Modules: ``ste`` (pseudo-derivatives), ``objective`` (loss, init, folding the
normalisation), ``optim`` (Adam, schedules, unit-norm decoder), ``checkpoint``
(Gemma Scope 2 folder + exact train state), ``loop`` (``fit``).
"""

from dictlearn.train.checkpoint import latest_checkpoint
from dictlearn.train.loop import HISTORY_KEYS, TrainConfig, fit, geometric_median

__all__ = ["fit", "latest_checkpoint", "TrainConfig", "HISTORY_KEYS", "geometric_median"]
