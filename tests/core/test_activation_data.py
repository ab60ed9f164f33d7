"""dictlearn.activation_data: the seekable permutation, bf16 bits, shard folders, streams.

Properties (hypothesis) rather than fixed cases: the permutation is a bijection for any n
and seekable from any step, shard folders round-trip under any chunking and dtype, and a
stream's shuffle buffer yields every row exactly once.
"""

import json
import os
import tempfile

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dictlearn import activation_data as ad

SETTINGS = settings(max_examples=40, deadline=None)


@SETTINGS
@given(n=st.integers(1, 5000), seed=st.integers(0, 2**32 - 1), epoch=st.integers(0, 100))
def test_permutation_is_a_bijection(n, seed, epoch):
  p = ad.permute_indices(np.arange(n), n, seed=seed, epoch=epoch)
  assert p.dtype == np.int64 and p.shape == (n,)
  np.testing.assert_array_equal(np.sort(p), np.arange(n))


@SETTINGS
@given(n=st.integers(1, 3000), batch=st.integers(1, 257), seed=st.integers(0, 2**32 - 1),
       start=st.integers(0, 50), data=st.data())
def test_batches_are_seekable_and_read_each_row_once_per_epoch(n, batch, seed, start, data):
  # Any step's batch is a pure function of (seed, step): computed directly, it equals the
  # one reached by walking from step 0, and the steps of an epoch cover every row once.
  t = data.draw(st.integers(start, start + 20))
  np.testing.assert_array_equal(ad.batch_indices(seed, t, batch, n),
                                ad.batch_indices(seed, t, batch, n))
  steps = -(-n // batch) + 1
  walked = np.concatenate([ad.batch_indices(seed, s, batch, n) for s in range(steps)])
  for s in (0, steps - 1):
    np.testing.assert_array_equal(walked[s * batch:(s + 1) * batch],
                                  ad.batch_indices(seed, s, batch, n))
  np.testing.assert_array_equal(np.sort(walked[:n]), np.arange(n))
  assert walked.min() >= 0 and walked.max() < n


def test_permutation_depends_on_the_seed_and_is_not_the_identity():
  b, n = 64, 1000
  assert not np.array_equal(ad.batch_indices(3, 0, b, n), ad.batch_indices(4, 0, b, n))
  assert not np.array_equal(ad.batch_indices(3, 0, b, n), np.arange(b))
  with pytest.raises(ValueError):
    ad.permute_indices(np.arange(3), 0, seed=0, epoch=0)


@SETTINGS
@given(st.lists(st.floats(allow_nan=False, width=32), min_size=1, max_size=64))
def test_bf16_bits_round_trip(values):
  x = np.asarray(values, np.float32)
  back = ad.bf16_bits_to_f32(ad.f32_to_bf16_bits(x))
  ref = np.asarray(jax.numpy.asarray(x, jax.numpy.bfloat16).astype(np.float32))
  np.testing.assert_array_equal(back, ref)


@SETTINGS
@given(rows=st.integers(1, 700), d=st.integers(1, 9), shard_rows=st.integers(1, 400),
       dtype=st.sampled_from(["float32", "bfloat16"]), data=st.data())
def test_shard_folder_round_trip(rows, d, shard_rows, dtype, data):
  cuts = sorted(data.draw(st.lists(st.integers(0, rows), max_size=8)))
  rng = np.random.default_rng(rows * 31 + d)
  x = rng.standard_normal((rows, d)).astype(np.float32)
  with tempfile.TemporaryDirectory() as tmp:
    folder = os.path.join(tmp, ad.ShardWriter.folder_name("resid_post", 4))
    with ad.ShardWriter(folder, d=d, site="resid_post", layer=4, dtype=dtype,
                        shard_rows=shard_rows) as w:
      for a, b in zip([0, *cuts], [*cuts, rows]):  # chunks that ignore the shard edges
        w.append(x[a:b])
    meta = json.loads(open(os.path.join(folder, "meta.json")).read())
    sizes = [s["rows"] for s in meta["shards"]]
    assert meta["rows"] == rows and sum(sizes) == rows
    assert all(s == shard_rows for s in sizes[:-1]) and 0 < sizes[-1] <= shard_rows
    sf = ad.open_shards(tmp, "resid_post", 4)
    assert sf.shape == (rows, d) and sf.site == "resid_post" and sf.layer == 4
    want = x if dtype == "float32" else ad.bf16_bits_to_f32(ad.f32_to_bf16_bits(x))
    idx = np.asarray(data.draw(st.lists(st.integers(0, rows - 1), min_size=1, max_size=20)))
    np.testing.assert_array_equal(sf.gather(idx), want[idx])
    a = data.draw(st.integers(0, rows - 1))
    b = data.draw(st.integers(a, rows))
    np.testing.assert_array_equal(sf[a:b], want[a:b])
    np.testing.assert_array_equal(ad.ArraySource(sf).gather(idx)[0], want[idx])


def test_shard_writer_refuses_an_existing_folder(tmp_path):
  folder = tmp_path / ad.ShardWriter.folder_name("resid_post", 4)
  with ad.ShardWriter(folder, d=2) as w:
    w.append(np.zeros((3, 2), np.float32))
  assert sorted(os.listdir(folder)) == ["meta.json", "shard_00000.npy"]
  with pytest.raises(FileExistsError):
    ad.ShardWriter(folder, d=2)


@SETTINGS
@given(n=st.integers(1, 600), chunk=st.integers(1, 97), batch=st.integers(1, 64),
       buffer=st.integers(1, 300), seed=st.integers(0, 1000))
def test_stream_shuffle_buffer_yields_every_row_once(n, chunk, batch, buffer, seed):
  x = np.arange(n, dtype=np.float32)[:, None].repeat(2, 1)

  def one_pass():
    # A one-shot iterator: the stream ends and the buffer drains, so one pass is exact.
    src = ad.StreamSource(x[i:i + chunk] for i in range(0, n, chunk))
    out = [b[:, 0] for b, _ in src.batches(batch, seed=seed, buffer_rows=buffer)]
    assert all(len(b) == batch for b in out)
    return np.concatenate(out) if out else np.zeros(0, np.float32)

  out = one_pass()
  # Every full batch is yielded, each row at most once; only the final partial batch
  # (fewer than batch_size rows) is left over.
  assert len(np.unique(out)) == len(out) == n // batch * batch
  assert np.all((out >= 0) & (out < n))
  np.testing.assert_array_equal(out, one_pass())  # the same way for a seed


def test_stream_shuffles():
  x = np.arange(1000, dtype=np.float32)[:, None].repeat(2, 1)
  src = ad.StreamSource(x[i:i + 37] for i in range(0, 1000, 37))
  out = np.concatenate([b[:, 0] for b, _ in src.batches(100, seed=0, buffer_rows=300)])
  np.testing.assert_array_equal(np.sort(out), np.arange(1000))
  assert not np.array_equal(out, np.arange(1000))
