"""One process of tests/core/test_distributed.py's many-process run (framework-free).

``python distributed_worker.py PORT NUM_PROCESSES PROCESS_ID WORKDIR`` joins the run, then
every process, in one launch (processes start slowly):

1. ``fit`` on :func:`data` over a data mesh of every process's devices, checkpointing
   every 20 steps into WORKDIR/ck -> WORKDIR/fit.npz;
2. the same with the width split over the processes (mesh (1, all devices)) ->
   WORKDIR/fit_width.npz;
3. the run killed after step 20 (the step-40 checkpoint removed) and resumed ->
   WORKDIR/resumed.npz;
4. ``fit`` on a replayable stream of :func:`chunks` (every process reads it whole and
   keeps its rows) -> WORKDIR/fit_stream.npz;
5. a ``CorpusEval`` fed this process's share of :func:`eval_batches` and reduced over the
   processes -> WORKDIR/eval.json.

Process 0 writes the files. The test imports the constants below for its one-process
references.
"""

import json
import os
import shutil
import sys

import numpy as np

# Those of tests/core/test_train.py's tiny runs, at the sizes; resampling every
# 5 steps puts the resampling's PRNG key and row draw on the global mesh too.
FIT = dict(kind="sae", width=64, target_l0=2, steps=40, batch_size=64, log_every=5,
           learning_rate=1e-2, resample_every=5, progress=False)
N_ROWS, D = 4096, 16
EVAL_BATCHES, EVAL_WIDTH = 6, 32


def data(seed: int = 1) -> np.ndarray:
  """x (N_ROWS, D) float32: sums of 2 of 64 random unit directions, magnitudes U(1, 2)."""
  rng = np.random.default_rng(seed)
  dirs = rng.standard_normal((64, D))
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  idx = rng.integers(0, 64, size=(N_ROWS, 2))
  mag = rng.uniform(1.0, 2.0, size=(N_ROWS, 2))
  return np.einsum("nk,nkd->nd", mag, dirs[idx]).astype(np.float32)


def chunks():
  """A replayable stream: :func:`data` in uneven chunks."""
  x = data()
  return (x[i:i + 300] for i in range(0, len(x), 300))


STREAM = dict(FIT, shuffle_buffer=1024)


def eval_batches():
  """EVAL_BATCHES batches of (clean logits, patched logits, tokens, positions, target, y)
  with padding and BOS, as an adapter would hand them to CorpusEval."""
  rng = np.random.default_rng(5)
  out = []
  for b in range(EVAL_BATCHES):
    tokens = rng.integers(0, 11, size=(2, 7)).astype(np.int32)
    positions = np.tile(np.arange(7, dtype=np.int32), (2, 1))
    positions[1, 7 - b % 3:] = -1  # some padding
    clean = rng.standard_normal((2, 7, 11)).astype(np.float32)
    patched = clean + 0.3 * rng.standard_normal((2, 7, 11)).astype(np.float32)
    target = rng.standard_normal((2, 7, D)).astype(np.float32)
    y = target + 0.2 * rng.standard_normal((2, 7, D)).astype(np.float32)
    out.append((clean, patched, tokens, positions, target, y))
  return out


def feed(ev, dictionary, batches) -> None:
  """Adds ``batches`` to ``ev`` (one dictionary "sae" writing site "s")."""
  import dictlearn as dl
  for clean, patched, tokens, positions, target, y in batches:
    codes = dl.encode_sparse(dictionary, target, k=8)
    ev.add_ablation("s", clean, 0.5 * patched, tokens, positions)
    ev.add_dictionary("sae", clean, patched, tokens, positions, target, y, codes)


def eval_dictionary():
  import jax
  import dictlearn as dl
  return dl.random_dictionary(jax.random.key(0), D, EVAL_WIDTH, threshold=0.1)


def save_fit(path, result) -> None:
  import jax
  d, history = result
  leaves = {f"leaf{i}": np.asarray(a) for i, a in enumerate(jax.tree_util.tree_leaves(d))}
  np.savez(path, **leaves, **{f"history_{k}": v for k, v in history.items()})


def main(port: str, num_processes: str, process_id: str, workdir: str) -> None:
  from dictlearn import distributed as dist
  dist.initialize(f"localhost:{port}", int(num_processes), int(process_id))
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
  from dictlearn import evals
  from dictlearn.train import fit

  x = data()
  ck = os.path.join(workdir, "ck")
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  result = fit(x, mesh=mesh, checkpoint_dir=ck, checkpoint_every=20, **FIT)
  if dist.is_primary():
    save_fit(os.path.join(workdir, "fit.npz"), result)

  wide = jax.make_mesh((1, jax.device_count()), ("data", "width"))
  result = fit(x, mesh=wide, width_axis="width", **FIT)
  if dist.is_primary():
    save_fit(os.path.join(workdir, "fit_width.npz"), result)

  dist.barrier("kill after step 20")
  if dist.is_primary():
    shutil.rmtree(os.path.join(ck, "step_00000040"))
  dist.barrier("step 40 removed")
  result = fit(x, mesh=mesh, checkpoint_dir=ck, checkpoint_every=20, **FIT)
  if dist.is_primary():
    save_fit(os.path.join(workdir, "resumed.npz"), result)

  result = fit(chunks, mesh=mesh, **STREAM)
  if dist.is_primary():
    save_fit(os.path.join(workdir, "fit_stream.npz"), result)

  ev = evals.CorpusEval({"sae": EVAL_WIDTH}, {"sae": "s"})
  mine = eval_batches()[jax.process_index()::jax.process_count()]
  feed(ev, eval_dictionary(), mine)
  dist.reduce_corpus_eval(ev)
  if dist.is_primary():
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(ev.results(), f)
  dist.barrier("done")


if __name__ == "__main__":
  main(*sys.argv[1:5])
