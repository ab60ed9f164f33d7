"""Training throughput of ``dictlearn.train`` on this machine: tokens per second.

Two measurements, side by side in one process:

* step: the jitted training step alone (forward, pseudo-derivative backward, Adam, decoder
  renormalisation) on a batch already on the device, median of ``--runs`` timed steps
  after a warm-up; the table also gives the achieved GFLOP/s, counting the two matmuls
  forward and their four backward as 6 * batch * width * (d_in + d_out) FLOPs;
* pipeline: what ``fit`` does on the host for each step (the seekable shuffle's indices, a
  gather from an in-memory array, the transfer to the device), and its ratio to the step.
  ``fit`` runs the pipeline in a background thread, overlapping the device step, so a
  ratio above 1 means the device waits for data.

d_in defaults to 640, the residual width of Gemma 3 270M. Nothing here is asserted.

``--recovery`` instead times ground-truth recovery at a chosen size (default: 2048 unit
directions in 128 dimensions, 4 active per row, magnitudes U(1, 2), width 4096): the
fraction of true directions matched by a decoder row with cosine > 0.9, the L0 against
the target, FVU, and the wall time of ``fit``.

  python benchmarks/bench_train.py [--d-in 640] [--widths 2048 8192] [--batches 256 1024 4096]
                                   [--runs 5] [--compute-dtype float32] [--json out.json]
  python benchmarks/bench_train.py --recovery [--n-feat 2048] [--d 128] [--k 4]
                                   [--width 4096] [--steps 2000] [--batch 1024]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np


def time_step(d_in, width, batch, runs, seed=0, compute_dtype="float32"):
  from dictlearn.train import compiled_step, initial_state, make_optimizer

  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, d_in)).astype(np.float32)
  cfg = _config(d_in, width, batch, steps=10_000, compute_dtype=compute_dtype)
  state = initial_state(cfg, make_optimizer(cfg))
  dev = jax.devices()[0]
  state = jax.device_put(state, dev)
  xd = jax.device_put(x, dev)
  scales = jax.device_put(np.ones(2, np.float32), dev)
  step = compiled_step(cfg)
  for _ in range(2):  # compile, then one more so caches are warm
    state = step(state, xd, xd, scales)
  jax.block_until_ready(state)
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    state = step(state, xd, xd, scales)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def time_pipeline(d_in, batch, runs, seed=0):
  """Host side of a step in ``fit``: seekable-shuffle indices, gather, transfer."""
  from dictlearn.activation_data import ArraySource, random_access_batches

  rng = np.random.default_rng(seed)
  x = rng.standard_normal((max(16 * batch, 65536), d_in)).astype(np.float32)
  it = random_access_batches(ArraySource(x), batch, seed)
  dev = jax.devices()[0]
  jax.block_until_ready(jax.device_put(next(it)[0], dev))
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    jax.block_until_ready(jax.device_put(next(it)[0], dev))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _config(d_in, width, batch, steps, compute_dtype="float32"):
  from dictlearn.train import TrainConfig

  return TrainConfig(width=width, steps=steps, batch_size=batch, learning_rate=1e-3,
                     target_l0=32.0, compute_dtype=compute_dtype, d_in=d_in).resolve()


def recovery(n_feat, d, k, width, steps, batch, lr, seed=0):
  import dictlearn
  from dictlearn.train import fit

  rng = np.random.default_rng(seed)
  D = rng.standard_normal((n_feat, d))
  D /= np.linalg.norm(D, axis=1, keepdims=True)
  n = max(200_000, 2 * batch)
  idx = rng.integers(0, n_feat, size=(n, k))
  a = rng.uniform(1.0, 2.0, size=(n, k))
  x = np.einsum("nk,nkd->nd", a, D[idx]).astype(np.float32)
  t = time.perf_counter()
  dct, h = fit(x, kind="sae", width=width, target_l0=k, steps=steps, batch_size=batch,
               learning_rate=lr, progress=False, seed=seed)
  jax.block_until_ready(dct.w_dec)
  wall = time.perf_counter() - t
  w = np.asarray(dct.w_dec, np.float64)
  w /= np.linalg.norm(w, axis=1, keepdims=True)
  frac = float(np.mean((D @ w.T).max(axis=1) > 0.9))
  held = x[:16384]
  l0 = float(dictlearn.metrics.l0(dictlearn.encode(dct, held)))
  fvu = float(dictlearn.metrics.fvu(held, dictlearn.forward(dct, held)))
  print(f"recovery: {n_feat} directions in {d} dims, k={k}, width={width}, {steps} steps x "
        f"{batch}: recovered {frac:.3f}, L0 {l0:.2f} (target {k}), FVU {fvu:.3f}, "
        f"fit {wall:.1f} s on {jax.devices()[0].platform}")
  return {"recovered": frac, "l0": l0, "target_l0": k, "fvu": fvu, "fit_s": wall}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--recovery", action="store_true")
  parser.add_argument("--n-feat", type=int, default=2048)
  parser.add_argument("--d", type=int, default=128)
  parser.add_argument("--k", type=int, default=4)
  parser.add_argument("--width", type=int, default=4096)
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--batch", type=int, default=1024)
  parser.add_argument("--lr", type=float, default=3e-4)
  parser.add_argument("--d-in", type=int, default=640)
  parser.add_argument("--widths", type=int, nargs="+", default=[2048, 8192])
  parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096])
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--compute-dtype", default="float32",
                      help="matmul operand dtype of the step: float32 or bfloat16")
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args()
  if args.recovery:
    r = recovery(args.n_feat, args.d, args.k, args.width, args.steps, args.batch, args.lr)
    if args.json:
      with open(args.json, "w") as fh:
        json.dump(r, fh, indent=1)
    return

  print(f"devices: {jax.devices()}  d_in={args.d_in}  matmul operands {args.compute_dtype}")
  head = (f"{'width':>7} {'batch':>6} {'step ms':>9} {'tokens/s':>10} {'GFLOP/s':>8} "
          f"{'pipeline ms':>12} {'pipeline/step':>14}")
  print(head)
  results = []
  pipes = {}
  for width in args.widths:
    for batch in args.batches:
      s = time_step(args.d_in, width, batch, args.runs, compute_dtype=args.compute_dtype)
      p = pipes.get(batch)
      if p is None:
        p = pipes[batch] = time_pipeline(args.d_in, batch, args.runs)
      flops = 6 * batch * width * (2 * args.d_in)  # fwd + bwd, d_out = d_in
      r = {"d_in": args.d_in, "width": width, "batch": batch, "step_s": s,
           "tokens_per_s": batch / s, "gflops": flops / s / 1e9, "pipeline_s": p,
           "pipeline_over_step": p / s}
      results.append(r)
      print(f"{width:>7} {batch:>6} {1e3 * s:>9.1f} {r['tokens_per_s']:>10.0f} "
            f"{r['gflops']:>8.1f} {1e3 * p:>12.1f} {p / s:>14.2f}", flush=True)
  if args.json:
    with open(args.json, "w") as fh:
      json.dump({"devices": str(jax.devices()), "results": results}, fh, indent=1)


if __name__ == "__main__":
  main()
