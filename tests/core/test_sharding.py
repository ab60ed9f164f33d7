"""Width-sharded dictionaries give the single-device results (8 forced CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, PartitionSpec as P

import dictlearn as dl
from dictlearn import sharding
from sparse_helpers import assert_close, check_codes, inputs, make_dictionary, margin_ok

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (CPU) devices")


def meshes():
  """Meshes both ways: ``Mesh`` (Auto axes) and ``jax.make_mesh`` (Explicit axes)."""
  devs = np.array(jax.devices()[:8])
  return {"width8": (Mesh(devs, ("width",)), None),
          "width2xdata4": (Mesh(devs.reshape(2, 4), ("width", "data")), "data"),
          "make_mesh_width8": (jax.make_mesh((8,), ("width",), devices=list(devs)), None),
          "make_mesh_width2xdata4": (jax.make_mesh((2, 4), ("width", "data"),
                                                   devices=list(devs)), "data")}


@pytest.mark.parametrize("mesh_name,kind", [("width8", "sae"), ("width2xdata4", "affine"),
                                            ("make_mesh_width8", "affine"),
                                            ("make_mesh_width2xdata4", "sae")])
def test_sharded_equals_single_device(mesh_name, kind):
  mesh, data_axis = meshes()[mesh_name]
  d = make_dictionary(11, 16, 512, kind=kind, threshold=1.6)
  # Batch of 9 (not a multiple of the data axis: padded inside); some rows overflow k=12.
  x = inputs(11, (9,), 16) * jnp.linspace(0.2, 3.0, 9)[:, None]
  ds = sharding.shard_dictionary(d, mesh)
  assert ds.w_enc.sharding.spec == P(None, "width")
  assert ds.w_dec.sharding.spec == P("width", None)
  assert ds.b_dec.sharding.spec == P()
  f = dl.encode(d, x)
  # The dense functions on 8 tokens split over the data axis (when there is one).
  x8 = sharding.shard_tokens(x[:8], mesh, data_axis)
  fs = sharding.encode(ds, x8, mesh, data_axis=data_axis)
  assert fs.sharding.spec[-1] == "width"  # Stays split by latent: no communication.
  assert fs.sharding.spec[0] == data_axis
  assert_close(fs, f[:8], 1e-6)
  assert_close(sharding.decode(ds, fs, x8, mesh=mesh, data_axis=data_axis),
               dl.decode(d, f[:8], x[:8]), 1e-5)
  ys = sharding.forward(ds, x8, mesh, data_axis=data_axis)
  assert tuple(ys.sharding.spec)[:1] == ((data_axis,) if data_axis else ())
  assert_close(ys, dl.forward(d, x[:8]), 1e-5)

  y, codes = sharding.encode_decode(ds, x, mesh, k=12, data_axis=data_axis, spill_rows=2)
  assert np.asarray(codes.overflow).any()
  assert_close(y, dl.forward(d, x), 1e-5)
  check_codes(codes, f, 12, 1e-5)
  y1, codes1 = dl.encode_decode(d, x, k=12)
  assert_close(y, y1, 1e-5)
  np.testing.assert_array_equal(codes.count, codes1.count)
  codes2 = sharding.encode_sparse(ds, x, mesh, k=12, data_axis=data_axis)
  check_codes(codes2, f, 12, 1e-5)


def test_leading_shape_and_bad_mesh():
  mesh, _ = meshes()["width2xdata4"]
  d = make_dictionary(12, 8, 64, threshold=1.0)
  x = inputs(12, (2, 3), 8)
  y, codes = sharding.encode_decode(sharding.shard_dictionary(d, mesh), x, mesh, k=8,
                                    data_axis="data")
  assert y.shape == (2, 3, 8) and codes.values.shape == (2, 3, 8)
  assert_close(y, dl.forward(d, x), 1e-5)
  with pytest.raises(ValueError, match="not divisible"):
    sharding.shard_dictionary(make_dictionary(12, 8, 63), mesh)
  with pytest.raises(ValueError, match="axes"):
    sharding.encode_decode(d, x, mesh, width_axis="model")


@settings(max_examples=3)
@given(st.integers(0, 1000), st.sampled_from(["float32", "bfloat16"]),
       st.sampled_from([0.5, 2.0]), st.sampled_from([(1,), (8,), (3, 5)]))
def test_sharded_encode_decode_hypothesis(seed, dtype, threshold, shape):
  mesh, data_axis = meshes()["width2xdata4"]
  d = make_dictionary(seed, 12, 256, kind="transcoder", dtype=dtype, threshold=threshold)
  x = inputs(seed, shape, 12)
  assume(margin_ok(d, x, jnp.float32))
  y, codes = sharding.encode_decode(sharding.shard_dictionary(d, mesh), x, mesh, k=16,
                                    data_axis=data_axis)
  assert_close(y, dl.forward(d, x), 1e-5)
  check_codes(codes, dl.encode(d, x), 16, 1e-5)
