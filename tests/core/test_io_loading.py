"""dictlearn.load at scale: dtype conversion while reading, sharded reads of each device's
slices, memory maps, and bad headers refused before anything is allocated."""

import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import dictlearn as dl
from dictlearn import io
from dictlearn.sharding import dictionary_specs

FIELDS = ("w_enc", "b_enc", "threshold", "w_dec", "b_dec", "w_skip")
FILE_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def _dictionary(kind, d_in, width, dtype, seed):
  d = dl.random_dictionary(jax.random.key(seed), d_in, width,
                           kind="sae" if kind == "sae" else "transcoder",
                           d_out=d_in if kind == "sae" else d_in + 1, affine=kind == "affine",
                           threshold=0.25, dtype=dtype)
  return d.replace(b_enc=jax.random.normal(jax.random.key(seed + 1), (width,)).astype(dtype))


def _old_load(folder, dtype=None):
  """The loader as it was: every tensor whole, into jax, then converted."""
  from safetensors.numpy import load_file
  t = load_file(str(Path(folder) / "params.safetensors"))
  t = {k: jnp.asarray(v) for k, v in t.items()}
  if dtype is not None:
    t = {k: v.astype(dtype) for k, v in t.items()}
  t["w_skip"] = t.pop("affine_skip_connection", None)
  return t


def _assert_bit_equal(d, ref: dict):
  for name in FIELDS:
    x, y = getattr(d, name), ref.get(name)
    assert (x is None) == (y is None), name
    if x is not None:
      assert x.dtype == y.dtype, (name, x.dtype, y.dtype)
      a, b = np.asarray(x), np.asarray(y)
      assert a.shape == b.shape, name
      np.testing.assert_array_equal(a.view(f"u{a.itemsize}"), b.view(f"u{b.itemsize}"),
                                    err_msg=name)


def _mesh(n, how, shape=None, names=("width",)):
  devices = jax.devices()[:n]
  shape = shape or (n,)
  if how == "make_mesh":
    return jax.make_mesh(shape, names, devices=devices)
  return Mesh(np.array(devices).reshape(shape), names)


@given(kind=st.sampled_from(["sae", "transcoder", "affine"]),
       file_dtype=st.sampled_from(sorted(FILE_DTYPES)),
       target=st.sampled_from([None, "float32", "bfloat16"]),
       n_dev=st.sampled_from([None, 1, 2, 4, 8]),
       how=st.sampled_from(["make_mesh", "Mesh"]),
       as_named=st.booleans(),
       d_in=st.sampled_from([1, 3, 8]), width=st.sampled_from([8, 16, 40]),
       seed=st.integers(0, 999))
def test_dtype_and_sharding_equal_full_load_then_convert(
    tmp_path_factory, kind, file_dtype, target, n_dev, how, as_named, d_in, width, seed):
  folder = dl.save(_dictionary(kind, d_in, width, FILE_DTYPES[file_dtype], seed),
                   tmp_path_factory.mktemp("d"))
  target_dtype = None if target is None else jnp.dtype(target)
  sharding = mesh = None
  if n_dev is not None:
    mesh = _mesh(n_dev, how)
    sharding = NamedSharding(mesh, P(None, "width")) if as_named else mesh
  stats = io.ReadStats()
  d = dl.load(folder, dtype=target_dtype, sharding=sharding, read_stats=stats)
  _assert_bit_equal(d, _old_load(folder, target_dtype))
  if mesh is not None:
    specs = dictionary_specs(d, "width")
    for name in FIELDS:
      if getattr(d, name) is not None:
        assert getattr(d, name).sharding == NamedSharding(mesh, getattr(specs, name)), name
    for dev, read in stats.bytes_read.items():
      assert read <= 1.1 * stats.shard_bytes[dev], dev
  # Every byte of tensor data was read once (distinct slices are read once).
  header = 8 + int.from_bytes((folder / "params.safetensors").read_bytes()[:8], "little")
  assert stats.total_read == (folder / "params.safetensors").stat().st_size - header


@pytest.mark.parametrize("how", ["make_mesh", "Mesh"])
def test_width_sharded_reads_only_each_devices_slices(tmp_path, how):
  d = _dictionary("affine", 16, 256, np.float32, 0)
  folder = dl.save(d, tmp_path)
  mesh = _mesh(8, how, shape=(2, 4), names=("data", "width"))  # Replicas over "data".
  stats = io.ReadStats()
  back = dl.load(folder, sharding=mesh, read_stats=stats, dtype=jnp.bfloat16)
  _assert_bit_equal(back, _old_load(folder, jnp.bfloat16))
  assert back.w_enc.sharding == NamedSharding(mesh, P(None, "width"))
  assert back.w_skip.sharding == NamedSharding(mesh, P())
  # Each device holds a quarter of the width; it read at most that (its replica read none).
  per_dev_shard = ((16 * 256 + 256 * 17 + 2 * 256) // 4 + 17 + 16 * 17) * 4
  for dev in mesh.devices.flat:
    assert stats.shard_bytes[dev] == per_dev_shard
    assert stats.bytes_read[dev] <= 1.1 * per_dev_shard
  assert sorted(stats.bytes_read.values()).count(0) == 4
  for shard in back.w_enc.addressable_shards:
    assert shard.data.shape == (16, 64)


def test_width_over_two_mesh_axes(tmp_path):
  folder = dl.save(_dictionary("affine", 4, 16, np.float32, 5), tmp_path)
  mesh = _mesh(8, "make_mesh", shape=(2, 4), names=("data", "width"))
  d = dl.load(folder, sharding=NamedSharding(mesh, P(None, ("data", "width"))))
  _assert_bit_equal(d, _old_load(folder))
  assert d.b_enc.sharding == NamedSharding(mesh, P(("data", "width")))
  assert d.w_dec.sharding == NamedSharding(mesh, P(("data", "width"), None))
  assert d.w_enc.addressable_shards[0].data.shape == (4, 2)


def test_replicated_and_single_device_shardings(tmp_path):
  folder = dl.save(_dictionary("sae", 4, 8, np.float32, 1), tmp_path)
  ref = _old_load(folder)
  mesh = _mesh(4, "Mesh")
  d = dl.load(folder, sharding=NamedSharding(mesh, P()))
  _assert_bit_equal(d, ref)
  assert d.w_enc.sharding == NamedSharding(mesh, P())
  dev = jax.devices()[3]
  d = dl.load(folder, sharding=jax.sharding.SingleDeviceSharding(dev))
  assert d.w_dec.devices() == {dev}
  _assert_bit_equal(d, ref)


def test_sharding_mistakes_are_named(tmp_path):
  folder = dl.save(_dictionary("sae", 4, 12, np.float32, 1), tmp_path)
  mesh = _mesh(8, "Mesh")
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    dl.load(folder, sharding=mesh)
  with pytest.raises(ValueError, match=r"P\(None, <width axis>\)"):
    dl.load(folder, sharding=NamedSharding(_mesh(4, "Mesh"), P("width")))
  with pytest.raises(ValueError, match="not the width axis 'latents'"):
    dl.load(folder, sharding=_mesh(4, "Mesh"), width_axis="latents")
  with pytest.raises(ValueError, match="width_axis= names"):
    dl.load(folder, sharding=NamedSharding(mesh, P(None, "width")), width_axis="width")
  with pytest.raises(ValueError, match="floating dtype"):
    dl.load(folder, dtype=jnp.int32)


def test_non_finite_after_conversion_is_refused(tmp_path):
  d = _dictionary("sae", 4, 8, np.float32, 2)
  d = d.replace(w_dec=d.w_dec.at[3, 1].set(3.4e38))  # Finite in f32, inf in bf16.
  folder = dl.save(d, tmp_path)
  dl.load(folder)
  with pytest.raises(io.DictionaryFileError, match="w_dec has non-finite.*to bfloat16"):
    dl.load(folder, dtype=jnp.bfloat16)
  with pytest.raises(io.DictionaryFileError, match="w_dec has non-finite"):
    dl.load(folder, dtype=jnp.bfloat16, sharding=_mesh(8, "make_mesh"))
  assert np.isinf(np.asarray(dl.load(folder, dtype=jnp.bfloat16, check_finite=False)
                             .w_dec[3, 1], np.float32))


# ---------------------------------------------------------------- headers that lie


def _header_file(path, header: dict, data: bytes = b"", length=None):
  raw = json.dumps(header).encode()
  raw += b" " * (-len(raw) % 8)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw + data)
  return path


def _entries(d_in, width, dtype="F32", start=0):
  shapes = dict(w_enc=[d_in, width], b_enc=[width], threshold=[width], w_dec=[width, d_in],
                b_dec=[d_in])
  out, pos = {}, start
  for name, shape in shapes.items():
    n = int(np.prod(shape)) * 4
    out[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
    pos += n
  return out, pos


def _fails_before_allocating(path, match):
  tracemalloc.start()
  try:
    with pytest.raises(io.DictionaryFileError, match=match):
      dl.load(path)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < 4 << 20, f"{peak} bytes allocated before the error"


def test_header_promising_10gb_in_a_1kb_file_fails_at_once(tmp_path):
  entries, _ = _entries(50_000, 50_000)  # w_enc alone claims 10 GB.
  p = _header_file(tmp_path / "a" / "params.safetensors", entries, b"\0" * 512)
  _fails_before_allocating(p, r"truncated or corrupt.*file holds only 512 bytes of data")


def test_lying_headers_are_refused_before_allocating(tmp_path):
  entries, end = _entries(4, 8)
  # Header length beyond the file.
  p = _header_file(tmp_path / "len" / "params.safetensors", entries, b"\0" * end,
                   length=10 << 30)
  _fails_before_allocating(p, "header length field says")
  # Offsets overlap (b_enc reuses w_enc's bytes).
  bad = json.loads(json.dumps(entries))
  bad["b_enc"]["data_offsets"] = [0, 32]
  p = _header_file(tmp_path / "overlap" / "params.safetensors", bad, b"\0" * end)
  _fails_before_allocating(p, "overlap or leave a gap")
  # Offsets that do not match the shape.
  bad = json.loads(json.dumps(entries))
  bad["w_enc"]["data_offsets"][1] -= 4
  p = _header_file(tmp_path / "size" / "params.safetensors", bad, b"\0" * end)
  _fails_before_allocating(p, r"w_enc' is F32 \(4, 8\) \(128 bytes\)")
  # Bytes after the last tensor, not JSON, unknown dtype.
  p = _header_file(tmp_path / "tail" / "params.safetensors", entries, b"\0" * (end + 4))
  _fails_before_allocating(p, "tensors end at data byte")
  p = tmp_path / "json" / "params.safetensors"
  p.parent.mkdir()
  p.write_bytes((6).to_bytes(8, "little") + b"{nope}")
  _fails_before_allocating(p, "not JSON")
  bad = json.loads(json.dumps(entries))
  bad["b_dec"]["dtype"] = "F33"
  p = _header_file(tmp_path / "dtype" / "params.safetensors", bad, b"\0" * end)
  _fails_before_allocating(p, "unknown dtype 'F33'")
  # Shorter than the length field.
  p.write_bytes(b"\1\0")
  _fails_before_allocating(p, "shorter than the 8-byte")


def test_shape_and_name_errors_come_from_the_header_alone(tmp_path):
  """A 4 GB (sparse) file whose header is wrong: refused without reading its data."""
  for case, match in (("shape", "b_enc must have shape"), ("missing", "lacks threshold"),
                      ("extra", r"unexpected tensors \['zz'\]"),
                      ("int", "w_dec must be a floating dtype")):
    entries, end = _entries(32_768, 32_768)
    if case == "shape":
      entries["b_enc"]["shape"] = [8192]
      entries["b_enc"]["data_offsets"][1] = entries["b_enc"]["data_offsets"][0] + 4 * 8192
      entries["threshold"]["data_offsets"] = [entries["b_enc"]["data_offsets"][1],
                                              entries["b_enc"]["data_offsets"][1] + 4 * 32768]
      end = _retile(entries)
    elif case == "missing":
      del entries["threshold"]
      end = _retile(entries)
    elif case == "extra":
      entries["zz"] = {"dtype": "F32", "shape": [1], "data_offsets": [end, end + 4]}
      end += 4
    else:
      entries["w_dec"]["dtype"] = "I32"
    p = _header_file(tmp_path / case / "params.safetensors", entries)
    with open(p, "r+b") as f:
      f.truncate(p.stat().st_size + end)  # Sparse: no disk used.
    _fails_before_allocating(p, match)


def _retile(entries):
  pos = 0
  for e in entries.values():
    n = e["data_offsets"][1] - e["data_offsets"][0]
    e["data_offsets"] = [pos, pos + n]
    pos += n
  return pos


def test_file_shrinking_while_loading_is_an_error_not_garbage(tmp_path):
  d = _dictionary("sae", 8, 16, np.float32, 3)
  dl.save(d, tmp_path)
  p = tmp_path / "params.safetensors"
  p.write_bytes(p.read_bytes()[:-100])
  with pytest.raises(io.DictionaryFileError, match="truncated or corrupt"):
    dl.load(tmp_path)


# ------------------------------------------------------------------------ mmap


def test_mmap_maps_and_reads_nothing(tmp_path):
  d = _dictionary("affine", 6, 24, ml_dtypes.bfloat16, 4)
  folder = dl.save(d, tmp_path)
  stats = io.ReadStats()
  m = dl.load(folder, mmap=True, check_finite=False, read_stats=stats)
  assert stats.total_read == 0
  for name in FIELDS:
    assert isinstance(getattr(m, name), np.memmap), name
    assert not getattr(m, name).flags.writeable
  _assert_bit_equal(m, _old_load(folder))
  # check_finite scans the file once, in chunks, and still returns maps.
  stats = io.ReadStats()
  m = dl.load(folder, mmap=True, read_stats=stats)
  assert isinstance(m.w_enc, np.memmap) and stats.total_read > 0
  np.testing.assert_array_equal(np.asarray(dl.encode(m, jnp.ones((2, 6)))),
                                np.asarray(dl.encode(dl.load(folder), jnp.ones((2, 6)))))
  with pytest.raises(ValueError, match="stored dtype bfloat16"):
    dl.load(folder, mmap=True, dtype=jnp.float32)
  dl.load(folder, mmap=True, dtype=jnp.bfloat16)  # The stored dtype is fine.
  with pytest.raises(ValueError, match="cannot also"):
    dl.load(folder, mmap=True, sharding=_mesh(2, "Mesh"))


def _gs1(tmp_path, compressed, fortran=False):
  folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_20" / "width_16k" / "average_l0_71"
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  w_enc = rng.normal(size=(8, 32)).astype(np.float32)
  arrays = dict(W_enc=np.asfortranarray(w_enc) if fortran else w_enc,
                W_dec=rng.normal(size=(32, 8)).astype(np.float32),
                b_enc=rng.normal(size=32).astype(np.float32),
                b_dec=np.zeros(8, np.float32), threshold=np.full(32, 0.1, np.float32))
  (np.savez_compressed if compressed else np.savez)(folder / "params.npz", **arrays)
  return folder, arrays


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("fortran", [False, True])
def test_gemma_scope_1_npz_dtype_sharding_and_mmap(tmp_path, compressed, fortran):
  folder, arrays = _gs1(tmp_path, compressed, fortran)
  mesh = _mesh(4, "make_mesh")
  d = dl.load(folder, dtype=jnp.bfloat16, sharding=mesh)
  for name, key in (("w_enc", "W_enc"), ("w_dec", "W_dec"), ("b_enc", "b_enc")):
    expect = np.asarray(jnp.asarray(arrays[key]).astype(jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(getattr(d, name)), expect, err_msg=name)
  assert d.w_enc.sharding == NamedSharding(mesh, P(None, "width"))
  assert (d.meta.site, d.meta.layer, d.meta.l0) == ("resid_post", 20, 71)
  if compressed:
    with pytest.raises(io.DictionaryFileError, match=r"member 'W_enc.npy' is compressed "
                                                     r"\(deflate\).*np.savez"):
      dl.load(folder, mmap=True)
  else:
    m = dl.load(folder, mmap=True)
    assert isinstance(m.w_enc, np.memmap)
    np.testing.assert_array_equal(m.w_enc, arrays["W_enc"])
    np.testing.assert_array_equal(m.w_dec, arrays["W_dec"])


def test_npz_member_whose_header_lies_is_refused(tmp_path):
  folder, arrays = _gs1(tmp_path, compressed=False)
  with zipfile.ZipFile(folder / "params.npz", "w") as z:  # Rewrite with a shortened member.
    for k, v in arrays.items():
      with z.open(f"{k}.npy", "w") as f:
        np.lib.format.write_array(f, v)
    with z.open("extra.npy", "w") as f:
      np.lib.format.write_array(f, np.zeros(4, np.float32))
  _fails_before_allocating(folder / "params.npz", r"unexpected tensors \['extra'\]")
  raw = (folder / "params.npz").read_bytes()
  (folder / "params.npz").write_bytes(raw[:len(raw) // 2])
  _fails_before_allocating(folder / "params.npz", "truncated or corrupt")


# ------------------------------------------------------------------ peak memory


# Peak RSS from /proc/self/status VmHWM, reset after the imports through clear_refs:
# getrusage's ru_maxrss survives fork + exec on Linux, so a child would report the pytest
# parent's peak.
PEAK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import jax.numpy as jnp
    import dictlearn as dl
    def status(key):
      with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
    dl.load(sys.argv[2], dtype=jnp.bfloat16)  # Warm up jax's runtime on a tiny file.
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # Resets VmHWM to the current RSS.
    before = status("VmRSS")
    d = dl.load(sys.argv[1], dtype=jnp.bfloat16)
    held = sum(getattr(d, n).nbytes for n in ("w_enc", "b_enc", "threshold", "w_dec", "b_dec"))
    print(json.dumps({"growth": status("VmHWM") - before, "held": held}))
""")



@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_of_a_converting_load_is_near_the_converted_size(tmp_path):
  d_in, width = 512, 49_152  # ~200 MB in float32, ~100 MB as bfloat16.
  rng = np.random.default_rng(0)
  from safetensors.numpy import save_file
  big = tmp_path / "big"
  big.mkdir()
  save_file(dict(w_enc=rng.standard_normal((d_in, width), np.float32),
                 b_enc=np.zeros(width, np.float32), threshold=np.zeros(width, np.float32),
                 w_dec=rng.standard_normal((width, d_in), np.float32),
                 b_dec=np.zeros(d_in, np.float32)), str(big / "params.safetensors"))
  small = dl.save(_dictionary("sae", 4, 8, np.float32, 0), tmp_path / "small")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(big), str(small)],
                       capture_output=True, text=True, env=env, check=True)
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r["held"] == (2 * d_in * width + 2 * width + d_in) * 2
  assert r["growth"] < 2 * r["held"], r  # The old path grew by ~5x (file twice + result).
