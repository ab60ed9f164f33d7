"""The XLA sparse encoder: blocks of pre-activations -> a ``Selection`` of k slots per row."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dictlearn import cpu_kernels
from dictlearn.dictionary import Dictionary
from dictlearn.sparse.blocks import active, block_reader
from dictlearn.sparse.codes import Selection
from dictlearn.sparse.plan import GROUP, Plan

Array = jax.Array


def _append(buf_v, buf_i, fill, v, i, c, k):
  """Appends the first c of (v, i) (n, kb) to each row's buffer (n, k) after ``fill``.

  A scatter of n * kb slots (those past c or k go out of bounds and are dropped): on CPU
  much cheaper than rebuilding the (n, k) buffer with a gather per block.
  """
  n, kb = v.shape
  slot = lax.iota(jnp.int32, kb)[None, :]
  pos = fill[:, None] + slot
  pos = jnp.where((slot < c[:, None]) & (pos < k), pos, k)
  rows = lax.iota(jnp.int32, n)[:, None]
  buf_v = buf_v.at[rows, pos].set(v, mode="drop", unique_indices=True)
  buf_i = buf_i.at[rows, pos].set(i, mode="drop", unique_indices=True)
  return buf_v, buf_i, jnp.minimum(fill + c, k)


def _block_candidates(pre: Array, act: Array, kb: int, grouped: bool):
  """Up to kb active latents per row of one block: (values (n, kb), cols (n, kb), missed).

  Actives come first (by value), inactive slots follow with value -inf. ``missed`` (n,)
  flags rows with an active latent left out. The path without ``cpu_kernels`` (GPU, TPU,
  CPU without a compiler). ``grouped``: the block is cut into groups of 16 columns: a
  vectorised max per group, top_k over the group maxima picks the kb groups holding
  actives, and a top_k over those kb * 16 values picks the latents; exact whenever a row
  has at most kb active groups (else ``missed``). It pays on few, very wide rows (the
  one-block, few token case); with many rows the group gather costs more than it saves.
  """
  n, bw = pre.shape
  key = jnp.where(act, pre, -jnp.inf)  # Actives are > threshold >= -inf: they sort first.
  c = act.sum(-1, dtype=jnp.int32)
  if not grouped:
    v, i = lax.top_k(key, kb)
    return v, i.astype(jnp.int32), c > kb
  g = GROUP
  key3 = key.reshape(n, bw // g, g)
  gmax = key3.max(-1)
  _, gi = lax.top_k(gmax, kb)
  cand = jnp.take_along_axis(key3, gi[:, :, None], axis=1).reshape(n, kb * g)
  v, ci = lax.top_k(cand, kb)
  col = jnp.take_along_axis(gi, ci // g, axis=1) * g + ci % g
  groups = (gmax > -jnp.inf).sum(-1, dtype=jnp.int32)
  return v, col.astype(jnp.int32), (c > kb) | (groups > kb)


def select_blocks(d: Dictionary, x: Array, plan: Plan, compute_dtype=jnp.float32
                  ) -> Selection:
  """The XLA sparse encoder over x (n, d_in): the plan's blocks, its selection.

  ``lost`` marks rows whose buffer misses an active latent (count > k, or a block with
  more than block_k): exactly the rows the spill pass must redo. Codes are in no
  particular order ("ffi" compacts in column order, the top_k paths by value).
  """
  n = x.shape[0]
  k, width, block_k = plan.k, d.width, plan.block_k
  nb = plan.num_blocks
  get = block_reader(d, x, plan, compute_dtype)

  def candidates(j, kb):
    """Block j: (values (n, kb), cols in the block (n, kb), count (n,), missed (n,), start)."""
    pre, t, start, valid_from = get(j)
    if plan.select == "ffi":
      v, i, c = cpu_kernels.select_active(pre, t, kb)
      return v, i, c, c > kb, start
    act = active(pre, t, start, valid_from)
    v, i, missed = _block_candidates(pre, act, kb, plan.select == "grouped")
    return v, i, act.sum(-1, dtype=jnp.int32), missed, start

  if nb == 1:
    # One block (few tokens): select straight into k slots, no merging.
    kk = min(k, width)
    v, i, count, missed, _ = candidates(0, kk)
    keep = lax.iota(jnp.int32, kk)[None, :] < count[:, None]
    v = jnp.where(keep, v, 0.0)
    i = jnp.where(keep, i, 0)
    if kk < k:
      v = jnp.pad(v, ((0, 0), (0, k - kk)))
      i = jnp.pad(i, ((0, 0), (0, k - kk)))
    return Selection(v, i, jnp.minimum(count, k), count, missed)

  def body(carry, j):
    buf_v, buf_i, fill, count, lost = carry
    v, i, c, missed, start = candidates(j, block_k)
    lost = lost | missed | (fill + c > k)
    buf_v, buf_i, fill = _append(buf_v, buf_i, fill, v, i + start, jnp.minimum(c, block_k), k)
    return (buf_v, buf_i, fill, count + c, lost), None

  init = (jnp.zeros((n, k), jnp.float32), jnp.zeros((n, k), jnp.int32),
          jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.int32), jnp.zeros((n,), bool))
  carry, _ = lax.scan(body, init, jnp.arange(nb))
  return Selection(*carry)
