"""``jit`` for penzai models whose parameters are read, never written.

``pz.variable_jit`` returns the new value of every variable it was given, parameters
included, so each call copies all the model's weights into fresh output buffers (1.1 GB
for the 270M in float32): on a CPU that copy takes longer than the forward itself.
``state_jit`` passes parameters in frozen and hands back only the state variables (the
captures and stashes hooks write), which it writes back as ``variable_jit`` does.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from penzai import pz


def split_variables(tree: Any) -> tuple[Any, list, list]:
  """``(slots, frozen parameters, state variables)`` of a tree (``pz.unbind_variables``)."""
  slots, variables = pz.unbind_variables(tree)
  params = [v.freeze() for v in variables if isinstance(v, pz.Parameter)]
  states = [v for v in variables if not isinstance(v, pz.Parameter)]
  return slots, params, states


def state_jit(fun):
  """Like ``pz.variable_jit(fun)`` (variables anywhere in the arguments), but parameters
  are inputs only; state variables are updated in place after the call."""

  @jax.jit
  def inner(slots, params, states):
    live = [s.unfreeze_as_copy() for s in states]
    args, kwargs = pz.bind_variables(slots, [*params, *live])
    return fun(*args, **kwargs), [v.freeze() for v in live]

  @functools.wraps(fun)
  def outer(*args, **kwargs):
    slots, params, states = split_variables((args, kwargs))
    result, new = inner(slots, params, [s.freeze() for s in states])
    for var, value in zip(states, new):
      var.value = value.value
    return result

  return outer


__all__ = ["split_variables", "state_jit"]
