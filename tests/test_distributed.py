"""Many processes on the tiny random Gemma: a two-process ``harvest`` writes the shard
folders one process writes (same rows, same order), and a two-process ``evaluate`` gives
every process the one-process metrics.

Two processes (tests/distributed_worker_penzai.py, one CPU device each) run everything in
one launch; this process computes the one-process references meanwhile.
"""

import json
from pathlib import Path

import numpy as np

import distributed_worker_penzai as W
from dictlearn import activation_data as ad
from distributed_worker_launch import assert_nested_close, launch, wait

WORKER = Path(__file__).parent / "distributed_worker_penzai.py"


def test_two_process_harvest_and_evaluate_equal_one(tmp_path):
  two, one = tmp_path / "two", tmp_path / "one"
  two.mkdir()
  one.mkdir()
  procs = launch(WORKER, two)
  try:
    W.run(W.model(), one, "single")
  finally:
    wait(procs)

  for s in W.sites():
    name = f"{s.kind}_{s.layer}"
    ref, got = ad.ShardFolder(one / "acts" / name), ad.ShardFolder(two / "acts" / name)
    assert got.meta["rows"] == ref.meta["rows"] == W.MAX_TOKENS
    assert len(got.meta["shards"]) == 2  # one part per process
    assert {k: v for k, v in got.meta.items() if k != "shards"} == {
        k: v for k, v in ref.meta.items() if k != "shards"}
    np.testing.assert_allclose(got[:], ref[:], rtol=1e-6, atol=1e-6)
    # In memory each process returns its own rows; in process order, one process's rows.
    parts = [np.load(two / f"{name}_{i}.npy") for i in range(2)]
    assert all(len(p) for p in parts)
    np.testing.assert_allclose(np.concatenate(parts), np.load(one / f"{name}_single.npy"),
                               rtol=1e-6, atol=1e-6)
  ref_eval = json.loads((one / "eval_single.json").read_text())
  for i in range(2):
    assert_nested_close(ref_eval, json.loads((two / f"eval_{i}.json").read_text()))
