"""Dictionaries sharded along the width over a ``jax.sharding.Mesh`` (optionally tokens too).

The widest dictionaries (1m latents: 4.5 GiB per f32 matrix at d_in 1152) are split by
latent: device j of the width axis holds w_enc[:, cols_j], b_enc[cols_j],
threshold[cols_j] and w_dec[cols_j, :]; b_dec and w_skip are replicated. Tokens may be
split over a second, data axis. Placement::

    w_enc  P(None, width)     b_enc, threshold  P(width)     w_dec  P(width, None)
    b_dec  P()                w_skip            P()          x, y   P(data, None)

Communication (width axis of size W, n tokens on a data shard, per call):

- ``encode``: none; f stays sharded by latent, P(data, width).
- ``decode`` / ``forward``: each device multiplies its latents by its w_dec rows, then
  one all-reduce (sum) of the (n, d_out) float32 partial outputs over the width axis.
- ``encode_decode`` (shard_map): each device runs the fused pass on its own latents (its
  codes, its exact partial reconstruction, its own spill pass), then an all-reduce of the
  (n, d_out) partial outputs and of the (n,) counts, and an all-gather of the (n, k)
  codes (values and global indices, 8 bytes a slot) over the width axis; every device
  keeps the k largest of the W * k gathered slots. No weights ever move, and x is read
  where it lies (replicated over the width axis, split over the data axis).

Results equal the single-device functions (up to float summation order): a row whose
active latents exceed k on one shard is repaired on that shard, so outputs are exact,
and the merged codes hold all actives (count <= k) or the k largest (overflow).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dictlearn import dictionary as _dict
from dictlearn import sparse as _sparse
from dictlearn.dictionary import Dictionary

Array = jax.Array


def auto_axes(mesh: Mesh) -> Mesh:
  """``mesh`` with every axis of type Auto (the same devices and names).

  ``jax.make_mesh`` gives Explicit axes, whose shardings are part of array types; the
  functions here place arrays with shardings and constraints, which is what Auto axes
  mean, so every function taking a mesh runs on this view of it. Arrays already placed
  on the original mesh are used where they lie.
  """
  types = getattr(mesh, "axis_types", None)
  auto = jax.sharding.AxisType.Auto
  if types is None or all(t == auto for t in types):
    return mesh
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(auto,) * len(mesh.axis_names))


def dictionary_specs(d: Dictionary, width_axis: str = "width") -> Dictionary:
  """A pytree like ``d`` whose leaves are the PartitionSpecs of the table above."""
  specs = dict(w_enc=P(None, width_axis), b_enc=P(width_axis), threshold=P(width_axis),
               w_dec=P(width_axis, None), b_dec=P())
  if d.w_skip is not None:
    specs["w_skip"] = P()
  return d.replace(**specs)


def _check_mesh(d: Dictionary, mesh: Mesh, width_axis: str, data_axis: str | None):
  for a in (width_axis, data_axis):
    if a is not None and a not in mesh.axis_names:
      raise ValueError(f"mesh has axes {mesh.axis_names}, not {a!r}")
  w = mesh.shape[width_axis]
  if d.width % w:
    raise ValueError(f"width {d.width} is not divisible by the {w} devices of mesh axis "
                     f"{width_axis!r}")


def shard_dictionary(d: Dictionary, mesh: Mesh, width_axis: str = "width") -> Dictionary:
  """Places d's width axis over ``mesh[width_axis]`` (other mesh axes hold replicas)."""
  mesh = auto_axes(mesh)
  _check_mesh(d, mesh, width_axis, None)
  specs = dictionary_specs(d, width_axis)
  return jax.tree_util.tree_map(
      lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), d, specs)


def shard_tokens(x: Array, mesh: Mesh, data_axis: str | None = None) -> Array:
  """Places x (n, ...) with its first axis over ``data_axis`` (replicated if None)."""
  mesh = auto_axes(mesh)
  spec = P(data_axis) if data_axis else P()
  return jax.device_put(x, NamedSharding(mesh, spec))


# --------------------------------------------------------------------- dense functions


def _specs_x(ndim, data_axis):
  return P(data_axis, *([None] * (ndim - 1))) if data_axis else P()


@functools.partial(jax.jit, static_argnames=("mesh", "width_axis", "data_axis",
                                             "compute_dtype"))
def _encode(d, x, mesh, width_axis, data_axis, compute_dtype):
  f = _dict.encode(d, x, compute_dtype=jnp.dtype(compute_dtype))
  spec = P(data_axis, *([None] * (x.ndim - 2)), width_axis) if data_axis else P(
      *([None] * (x.ndim - 1)), width_axis)
  return lax.with_sharding_constraint(f, NamedSharding(mesh, spec))


def encode(d: Dictionary, x: Array, mesh: Mesh, *, width_axis: str = "width",
           data_axis: str | None = None, compute_dtype=jnp.float32) -> Array:
  """``dictionary.encode`` on a sharded d: f (..., width) stays split by latent, no comms."""
  mesh = auto_axes(mesh)
  return _encode(d, x, mesh, width_axis, data_axis, jnp.dtype(compute_dtype).name)


@functools.partial(jax.jit, static_argnames=("mesh", "data_axis", "compute_dtype"))
def _decode(d, f, x, mesh, data_axis, compute_dtype):
  y = _dict.decode(d, f, x, compute_dtype=jnp.dtype(compute_dtype))
  return lax.with_sharding_constraint(y, NamedSharding(mesh, _specs_x(y.ndim, data_axis)))


def decode(d: Dictionary, f: Array, x: Array | None = None, *, mesh: Mesh,
           data_axis: str | None = None, compute_dtype=jnp.float32) -> Array:
  """``dictionary.decode``: partial products per width shard, one all-reduce."""
  mesh = auto_axes(mesh)
  return _decode(d, f, x, mesh, data_axis, jnp.dtype(compute_dtype).name)


@functools.partial(jax.jit, static_argnames=("mesh", "data_axis", "compute_dtype"))
def _forward(d, x, mesh, data_axis, compute_dtype):
  y = _dict.forward(d, x, compute_dtype=jnp.dtype(compute_dtype))
  return lax.with_sharding_constraint(y, NamedSharding(mesh, _specs_x(y.ndim, data_axis)))


def forward(d: Dictionary, x: Array, mesh: Mesh, *, data_axis: str | None = None,
            compute_dtype=jnp.float32) -> Array:
  """``dictionary.forward`` on a sharded d (encode without comms, decode all-reduce)."""
  mesh = auto_axes(mesh)
  return _forward(d, x, mesh, data_axis, jnp.dtype(compute_dtype).name)


# ------------------------------------------------------------------ fused, shard_map


def _local_encode_decode(d, x, *, k, width_axis, compute_dtype, block_width, block_k,
                         spill_rows, with_y):
  """Per-device body: this shard's fused pass, then y summed and codes merged over shards."""
  cd = jnp.dtype(compute_dtype)
  offset = lax.axis_index(width_axis) * d.width  # d is this device's shard.
  plan = _sparse.make_plan(d, x.shape[0], k, impl="xla", block_width=block_width,
                           block_k=block_k, spill_rows=spill_rows)
  # After its spill pass every shard holds all its actives, or (local overflow) its k largest.
  y, sel = _sparse.fused_pass(d, x, plan, cd, with_y)
  valid = lax.iota(jnp.int32, k)[None, :] < sel.fill[:, None]
  key = jnp.where(valid, sel.values, -jnp.inf)
  keys = lax.all_gather(key, width_axis, axis=1, tiled=True)            # (n, W*k)
  idxs = lax.all_gather(sel.indices + offset, width_axis, axis=1, tiled=True)
  total = lax.psum(sel.count, width_axis)
  top, pick = lax.top_k(keys, k)
  idx = jnp.take_along_axis(idxs, pick, axis=1)
  keep = lax.iota(jnp.int32, k)[None, :] < jnp.minimum(total, k)[:, None]
  codes = _sparse.SparseCodes(values=jnp.where(keep, top, 0.0),
                              indices=jnp.where(keep, idx, 0),
                              count=total, overflow=total > k)
  if with_y:
    y = _dict.add_bias_and_skip(d, lax.psum(y, width_axis), x, cd)
  return y, codes


@functools.lru_cache(maxsize=64)
def _sharded_fn(mesh, width_axis, data_axis, k, compute_dtype, block_width, block_k,
                spill_rows, with_y, treedef_key):
  del treedef_key  # Only part of the cache key (affine or not).

  def run(d, x2):
    specs = dictionary_specs(d, width_axis)
    row = P(data_axis) if data_axis else P()
    rowk = P(data_axis, None) if data_axis else P()
    out_codes = _sparse.SparseCodes(values=rowk, indices=rowk, count=row, overflow=row)
    body = functools.partial(
        _local_encode_decode, k=k, width_axis=width_axis, compute_dtype=compute_dtype,
        block_width=block_width, block_k=block_k, spill_rows=spill_rows, with_y=with_y)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(specs, rowk),
                       out_specs=(rowk if with_y else None, out_codes), check_vma=False)
    return fn(d, x2)
  return jax.jit(run)


def encode_decode(d: Dictionary, x: Array, mesh: Mesh, *, k: int = 256,
                  width_axis: str = "width", data_axis: str | None = None,
                  block_width: int | None = None, block_k: int | None = None,
                  spill_rows: int | None = None, compute_dtype=jnp.float32,
                  with_y: bool = True):
  """``sparse.encode_decode`` with d split by latent over ``mesh[width_axis]``.

  x (..., d_in) is flattened; with ``data_axis`` its tokens are split over that axis
  (padded to a multiple of its size). Returns (y (..., d_out), SparseCodes) like the
  single-device function (y is None when ``with_y`` is False: encode_sparse).
  """
  mesh = auto_axes(mesh)
  _dict.check_input(d, x)
  _check_mesh(d, mesh, width_axis, data_axis)
  lead = x.shape[:-1]
  n = int(np.prod(lead)) if lead else 1
  x2 = x.reshape(n, d.d_in)
  dsize = mesh.shape[data_axis] if data_axis else 1
  pad = (-n) % dsize
  if pad:
    x2 = jnp.pad(x2, ((0, pad), (0, 0)))
  fn = _sharded_fn(mesh, width_axis, data_axis, int(k), jnp.dtype(compute_dtype).name,
                   block_width, block_k, spill_rows, with_y, d.w_skip is not None)
  y, codes = fn(d, x2)
  codes = jax.tree_util.tree_map(lambda a: a[:n], codes)
  y = None if y is None else y[:n].reshape(*lead, d.d_out)
  return y, codes.reshape(*lead)


def encode_sparse(d: Dictionary, x: Array, mesh: Mesh, **kwargs) -> _sparse.SparseCodes:
  """``sparse.encode_sparse`` on a width-sharded d (see ``encode_decode``)."""
  return encode_decode(d, x, mesh, with_y=False, **kwargs)[1]
