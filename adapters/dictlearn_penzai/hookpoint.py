"""``HookPoint``: an identity layer that marks a named site inside a penzai model.

The Gemma 3 model puts one HookPoint at every site of every block (see
``dictlearn.sites`` for the site kinds). Interventions never count layers: they
select HookPoints by ``(kind, layer)`` with ``pz.select`` and insert layers after them.

What flows through a HookPoint is a NamedArray with axes ``batch``, ``seq`` and one
feature axis ``embedding``, except at ``attn_z`` where the axes are ``heads`` and
``projection`` (the o_proj input before heads are flattened).
"""

from __future__ import annotations

import dataclasses

from penzai import pz


@pz.pytree_dataclass
class HookPoint(pz.nn.Layer):
  """Returns its input unchanged; exists so a site can be found by name."""

  kind: str = dataclasses.field(metadata={"pytree_node": False})
  layer: int = dataclasses.field(metadata={"pytree_node": False})

  def __call__(self, x, **side_inputs):
    return x
