"""Many processes (jax.distributed on localhost, CPU, gloo): training and eval sums equal
one process, checkpoints resume across process counts; the helpers one process at a time.

One launch of two processes (tests/distributed_worker.py, one CPU device each) runs every
many-process check, since each process takes seconds to start; this process computes the
one-process references on a mesh of the same shape (2 of its 8 forced devices) meanwhile.
"""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import distributed_worker as W
from distributed_worker_launch import assert_nested_close, launch, wait
from dictlearn import activation_data as ad
from dictlearn import distributed as dist
from dictlearn import evals
from dictlearn.sharding import auto_axes
from dictlearn.train import fit

WORKER = Path(__file__).resolve().parents[1] / "distributed_worker.py"


def load_fit(path):
  z = np.load(path)
  leaves = [z[k] for k in sorted((k for k in z.files if k.startswith("leaf")),
                                 key=lambda k: int(k[4:]))]
  return leaves, {k[8:]: z[k] for k in z.files if k.startswith("history_")}


def max_rel_diff(ref, got):
  """max |a - b| / max |a| over each pair of leaves."""
  return max(float(np.max(np.abs(np.asarray(a) - b)) / max(np.max(np.abs(a)), 1e-30))
             for a, b in zip(ref, got))


def close(ref_result, got, tag):
  d, h = ref_result
  leaves, hist = got
  ref = [np.asarray(a) for a in jax.tree_util.tree_leaves(d)]
  assert len(ref) == len(leaves)
  diff = max_rel_diff(ref, leaves)
  print(f"{tag}: max relative difference {diff:.2e}")
  assert diff <= 1e-4, f"{tag}: {diff}"
  np.testing.assert_allclose(h["loss"], hist["loss"], rtol=1e-4)
  np.testing.assert_array_equal(h["step"], hist["step"])


def test_two_processes_equal_one(tmp_path):
  procs = launch(WORKER, tmp_path)
  try:
    x = W.data()
    two = jax.devices()[:2]
    ref = fit(x, mesh=jax.make_mesh((2,), ("data",), devices=two), **W.FIT)
    ref_wide = fit(x, mesh=jax.make_mesh((1, 2), ("data", "width"), devices=two),
                   width_axis="width", **W.FIT)
    ref_stream = fit(W.chunks, mesh=jax.make_mesh((2,), ("data",), devices=two), **W.STREAM)
    ev = evals.CorpusEval({"sae": W.EVAL_WIDTH}, {"sae": "s"})
    W.feed(ev, W.eval_dictionary(), W.eval_batches())
    ref_eval = json.loads(json.dumps(ev.results()))
  finally:
    wait(procs)

  close(ref, load_fit(tmp_path / "fit.npz"), "data-parallel")
  close(ref_wide, load_fit(tmp_path / "fit_width.npz"), "width over processes")
  close(ref_stream, load_fit(tmp_path / "fit_stream.npz"), "a stream")
  # Killed after step 20 and resumed by two processes: the uninterrupted two-process run.
  two_proc = load_fit(tmp_path / "fit.npz")
  resumed = load_fit(tmp_path / "resumed.npz")
  for a, b in zip(two_proc[0], resumed[0]):
    np.testing.assert_array_equal(a, b)
  # One process resumes the two processes' step-20 checkpoint.
  ck = tmp_path / "ck1"
  shutil.copytree(tmp_path / "ck", ck)
  shutil.rmtree(ck / "step_00000040")
  d, h = fit(x, mesh=jax.make_mesh((2,), ("data",), devices=two), checkpoint_dir=ck,
             checkpoint_every=20, **W.FIT)
  close(ref, ([np.asarray(a) for a in jax.tree_util.tree_leaves(d)], h),
        "one process resuming two")
  # Eval sums reduced over the processes: the one-process result.
  got = json.loads((tmp_path / "eval.json").read_text())
  assert_nested_close(ref_eval, got)


# ------------------------------------------------------------- one-process helpers


def test_process_block_covers_the_range_in_order():
  for n, count, align in [(10, 3, 1), (17, 2, 4), (3, 4, 1), (0, 2, 8), (64, 4, 8)]:
    blocks = [dist.process_block(n, align=align, index=i, count=count)
              for i in range(count)]
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert all(lo % align == 0 for lo, _ in blocks if lo < n)
  assert dist.process_block(10) == (0, 10)  # one process here


def test_one_process_helpers_are_plain():
  assert dist.initialize() == 1 and dist.process_count() == 1 and dist.is_primary()
  assert dist.initialize(num_processes=1) == 1
  with pytest.raises(ValueError, match="all of"):
    dist.initialize("localhost:1234")
  a = np.arange(6.0).reshape(2, 3)
  np.testing.assert_array_equal(dist.allgather(a), a[None])
  assert dist.allreduce_sum({"s": 1.5, "n": 3}) == {"s": 1.5, "n": 3}
  mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
  sh = NamedSharding(auto_axes(mesh), P("data", None))
  rows = dist.local_rows(sh, (8, 3))
  np.testing.assert_array_equal(rows, np.arange(8))
  x = np.arange(24.0).reshape(8, 3)
  g = dist.global_batch(x, rows, sh, 8)
  assert g.sharding == sh
  np.testing.assert_array_equal(np.asarray(g), x)


def test_parts_merge_into_one_folder_in_order(tmp_path):
  rows = np.arange(40, dtype=np.float32).reshape(10, 4)
  cuts = [(0, 3), (3, 3), (3, 10)]  # part 1 is empty: it writes nothing
  for i, (lo, hi) in enumerate(cuts):
    if hi > lo:
      with ad.ShardWriter(tmp_path, d=4, site="resid_post", layer=1, shard_rows=4,
                          part=i) as w:
        w.append(rows[lo:hi])
  assert not (tmp_path / "meta.json").exists()  # no reader sees the parts before the merge
  meta = ad.merge_parts(tmp_path, [0, 2])
  assert meta["rows"] == 10
  folder = ad.ShardFolder(tmp_path)
  np.testing.assert_array_equal(folder[:], rows)
  assert sorted(p.name for p in tmp_path.glob("meta*")) == ["meta.json"]
  with pytest.raises(FileExistsError):
    ad.ShardWriter(tmp_path, d=4, part=3)
  with pytest.raises(FileNotFoundError, match="part 5"):
    ad.merge_parts(tmp_path, [5])
