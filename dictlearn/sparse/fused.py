"""One fused pass: select (XLA or Pallas), decode, spill; shared by ``sparse`` and ``sharding``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dictlearn.dictionary import Dictionary
from dictlearn.sparse.codes import Selection
from dictlearn.sparse.decode import decode_codes
from dictlearn.sparse.plan import Plan
from dictlearn.sparse.select import select_blocks
from dictlearn.sparse.spill import spill

Array = jax.Array


def fused_pass(d: Dictionary, x2: Array, plan: Plan, compute_dtype=jnp.float32,
               with_y: bool = True) -> tuple[Array | None, Selection]:
  """Steps 1-3 on x2 (n, d_in): (y_partial (n, d_out) f32 | None, Selection after spill).

  y_partial is the exact decode of the active latents, without b_dec and the skip term
  (``dictionary.add_bias_and_skip`` adds them; a width-sharded caller sums the shards'
  partials first). The Selection holds every row's actives, or its k largest.
  """
  cd = jnp.dtype(compute_dtype)
  if plan.impl == "xla":
    sel = select_blocks(d, x2, plan, cd)
  else:
    from dictlearn import pallas_encode
    sel = pallas_encode.select(d, x2, plan.kernel, k=plan.k, compute_dtype=cd,
                               interpret=plan.impl == "pallas_interpret")
  y = decode_codes(d.w_dec, sel.values, sel.indices, sel.fill, plan, cd) if with_y else None
  y, v, i = spill(d, x2, sel.lost, y, sel.values, sel.indices, plan, cd)
  return y, Selection(v, i, jnp.minimum(sel.count, plan.k), sel.count, sel.lost)
