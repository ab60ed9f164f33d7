"""Corpus evals on the real Gemma 3 270M with the two demo dictionaries, in one process.

Prints a table: tokens/s of one ``evaluate`` pass (both dictionaries, each alone), the
ratio of evaluating both against one, the bare model forward's tokens/s, and the
dictionary part (``encode_decode`` on the captured input, per batch) relative to one
bare forward; then the demo dictionaries' metrics. Every configuration is run once on one
batch first, so compile time is left out.

  python benchmarks/bench_evals.py [--tokens 5000] [--seq-len 128] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import os
import platform

import jax
import numpy as np

import dictlearn as dl
from dictlearn_gemma import corpus as C
from dictlearn_penzai import hooks
from dictlearn_penzai.evaluate import evaluate
from dictlearn_penzai.loading import load_gemma3
from dictlearn_penzai.train_cli import default_model

from corpus_timing import bare_forward_seconds, corpus_batches, timed

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "adapters",
                    "dictlearn_penzai", "demo")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--tokens", type=int, default=5000)
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--batch-size", type=int, default=4)
  args = ap.parse_args(argv)
  model, tok = load_gemma3(default_model())
  sae = dl.load(os.path.join(DEMO, "sae"))
  tc = dl.load(os.path.join(DEMO, "transcoder"))
  corpus_name, docs = C.default_corpus()
  kw = dict(seq_len=args.seq_len, batch_size=args.batch_size, progress=False)
  one_batch = args.seq_len * args.batch_size // 2
  configs = {"sae": {"sae": sae}, "transcoder": {"transcoder": tc},
             "both": {"sae": sae, "transcoder": tc}}
  for dicts in configs.values():  # compile every model structure once
    evaluate(model, tok, docs, dicts, tokens=one_batch, **kw)

  batches, n_tok = corpus_batches(tok, docs, args.seq_len, args.batch_size, args.tokens)
  t_bare = bare_forward_seconds(model, batches)
  sites = [dl.sites.site_of(sae), dl.sites.site_of(tc, "in")]
  caches = [hooks.run_with_cache(model, b, sites)[1] for b in batches]
  block = jax.block_until_ready
  t_dict = {}
  for name, d, s in (("sae", sae, sites[0]), ("transcoder", tc, sites[1])):
    block(dl.encode_decode(d, caches[0].array(s)))
    _, t_dict[name] = timed(lambda: [block(dl.encode_decode(d, c.array(s))) for c in caches])

  times, results = {}, {}
  for name, dicts in configs.items():
    results[name], times[name] = timed(
        lambda: evaluate(model, tok, docs, dicts, tokens=args.tokens, **kw))

  print(f"# bench_evals: Gemma 3 270M (CPU, {os.cpu_count()} cores, {platform.machine()}, "
        f"jax {jax.__version__}), corpus {corpus_name}, {n_tok} tokens, seq_len "
        f"{args.seq_len}, batch {args.batch_size}")
  print("| what | seconds | tokens/s | ratio |")
  print("|---|---:|---:|---:|")
  print(f"| bare forward (1 run) | {t_bare:.1f} | {n_tok / t_bare:.0f} | 1.00 |")
  for name in ("sae", "transcoder", "both"):
    print(f"| evaluate {name} | {times[name]:.1f} | {n_tok / times[name]:.0f} | "
          f"{times[name] / t_bare:.2f} x bare |")
  one = (times["sae"] + times["transcoder"]) / 2
  print(f"| both / mean of one | | | {times['both'] / one:.2f} |")
  for name, t in t_dict.items():
    print(f"| {name} encode_decode | {t:.2f} | {n_tok / t:.0f} | {t / t_bare:.3f} x bare |")
  print()
  print("| dictionary | L0 | FVU | CE loss score | KL div score | delta loss | dead |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for name, m in results["both"].items():
    print(f"| {name} | {m['sparsity']['l0']:.1f} | {m['misc_metrics']['fvu']:.4f} | "
          f"{m['model_performance_preservation']['ce_loss_score']:.4f} | "
          f"{m['model_behavior_preservation']['kl_div_score']:.4f} | "
          f"{m['misc_metrics']['delta_loss']:+.4f} | {m['misc_metrics']['dead_fraction']:.3f} |")
  for name in ("sae", "transcoder"):
    a, b = results[name][name], results["both"][name]
    assert np.isclose(a["misc_metrics"]["fvu"], b["misc_metrics"]["fvu"], rtol=1e-6)


if __name__ == "__main__":
  main()
