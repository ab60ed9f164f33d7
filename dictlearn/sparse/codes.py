"""The fused pass's result contracts: ``SparseCodes`` (public) and ``Selection``."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SparseCodes:
  """Active latents of each row: values (..., k) f32, indices (..., k) i32, count, overflow."""

  values: Array
  indices: Array
  count: Array
  overflow: Array

  @property
  def k(self) -> int:
    return self.values.shape[-1]

  def reshape(self, *lead: int) -> SparseCodes:
    """The same codes over rows of leading shape ``lead`` (k stays the last axis)."""
    return SparseCodes(values=self.values.reshape(*lead, self.k),
                       indices=self.indices.reshape(*lead, self.k),
                       count=self.count.reshape(lead), overflow=self.overflow.reshape(lead))

  def to_dense(self, width: int) -> Array:
    """Scatters the codes into a dense (..., width) float32 array (for tests and small data)."""
    lead = self.values.shape[:-1]
    v = self.values.reshape(-1, self.k)
    i = self.indices.reshape(-1, self.k)
    rows = jnp.arange(v.shape[0])[:, None]
    dense = jnp.zeros((v.shape[0], width), jnp.float32).at[rows, i].add(v)
    return dense.reshape(*lead, width)


jax.tree_util.register_dataclass(
    SparseCodes, data_fields=["values", "indices", "count", "overflow"], meta_fields=[])


class Selection(NamedTuple):
  """What a selection pass leaves per row (n rows, k slots).

  values (n, k) f32, indices (n, k) i32: slots [0, fill) hold active latents, the rest 0.
  fill (n,) i32: filled slots. count (n,) i32: the row's exact number of active latents.
  lost (n,) bool: the slots miss an active latent the row has (count > k, or a block or
  kernel buffer overflowed), so the spill pass must redo the row. After ``fused_pass``
  every row holds all its actives or its k largest, fill = min(count, k), and lost marks
  the rows that were redone.
  """

  values: Array
  indices: Array
  fill: Array
  count: Array
  lost: Array
