"""Dashboard collection on the real Gemma 3 270M with the demo SAE (2048 latents, layer 9
resid_post), in one process.

Prints a table: tokens/s of the bare model forward over the corpus's batches, of the
forward capturing the SAE's input, of the collector alone on those inputs, and of
``collect`` (forward, capture, then the compiled encode + top-k/sample merge; corpus
tokenization included), each for 200 latents and for all 2048, with the ratio to the bare
forward; then ``write`` (files, pages, the logit lens through the 262k-token
unembedding). Every configuration runs once on one batch first, so compile time is left
out.

  python benchmarks/bench_dashboards.py [--tokens 20000] [--seq-len 128] [--batch-size 4]
  python benchmarks/bench_dashboards.py --tokens 200000 --bare-tokens 20000 --full-only
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile

import jax
import numpy as np

import dictlearn as dl
from dictlearn import dashboards as D
from dictlearn import evals
from dictlearn_gemma import corpus as C
from dictlearn_penzai import hooks
from dictlearn_penzai.dashboards import collect, write
from dictlearn_penzai.loading import load_gemma3
from dictlearn_penzai.train_cli import default_model

from corpus_timing import bare_forward_seconds, corpus_batches, timed

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "adapters",
                    "dictlearn_penzai", "demo")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--tokens", type=int, default=20_000)
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--batch-size", type=int, default=4)
  ap.add_argument("--bare-tokens", type=int, default=None,
                  help="time the bare forward (and the capture) on the first N tokens only "
                       "(default: all --tokens; its tokens/s does not change along the corpus)")
  ap.add_argument("--full-only", action="store_true",
                  help="only collect all latents (skip the 200-latent and collector-alone rows)")
  args = ap.parse_args(argv)
  model, tok = load_gemma3(default_model())
  sae = dl.load(os.path.join(DEMO, "sae"))
  corpus_name, docs = C.default_corpus()
  kw = dict(seq_len=args.seq_len, batch_size=args.batch_size, progress=False)
  one_batch = args.seq_len * args.batch_size // 2
  configs = {"200 latents": np.arange(200), f"all {sae.width} latents": np.arange(sae.width)}
  if args.full_only:
    configs.pop("200 latents")
  for latents in configs.values():  # compile each collector shape once
    collect(model, tok, docs, sae, tokens=one_batch, latents=latents, **kw)

  batches, n_tok = corpus_batches(tok, docs, args.seq_len, args.batch_size, args.tokens)
  if args.bare_tokens:
    batches, n_bare = corpus_batches(tok, docs, args.seq_len, args.batch_size, args.bare_tokens)
  else:
    n_bare = n_tok
  block = jax.block_until_ready
  t_bare = bare_forward_seconds(model, batches)
  site = dl.sites.site_of(sae)

  def captured():
    out = []
    for b in batches:
      pos = np.asarray(hooks.positions_from_padding(hooks.as_tokens(b), 0).unwrap("batch",
                                                                                 "seq"))
      x = hooks.run_with_cache(model, b, [site])[1].array(site)
      out.append((x, b, evals.token_mask(pos), pos >= 0))
    return block(out)
  inputs, t_capture = timed(captured) if not args.full_only else (None, None)

  def updates(latents):
    c = D.DashboardCollector(latents, dictionary=sae)
    for x, b, m, v in inputs:
      c.add_inputs(x, b, m, valid=v)
    return c.results()

  times, t_update = {}, {}
  for name, latents in configs.items():
    if inputs is not None:
      _, t_update[name] = timed(lambda: updates(latents))
    results, times[name] = timed(
        lambda: collect(model, tok, docs, sae, tokens=args.tokens, latents=latents, **kw))
  t_bare_again = bare_forward_seconds(model, batches)  # the first pass of the run is often slower: both shown
  with tempfile.TemporaryDirectory() as out:
    paths, t_write = timed(lambda: write(results, out, tok, model))

  print(f"# bench_dashboards: Gemma 3 270M (CPU, {os.cpu_count()} cores, {platform.machine()}, "
        f"jax {jax.__version__}), demo SAE ({sae.width} latents, {site}), corpus "
        f"{corpus_name}, {n_tok} tokens, seq_len {args.seq_len}, batch {args.batch_size}; "
        f"bare forward and capture over the first {n_bare}")
  print("| what | seconds | tokens/s | ratio to bare forward (per token) |")
  print("|---|---:|---:|---:|")
  rate = lambda n, t: n / t  # noqa: E731
  t_bare, t_first = min(t_bare, t_bare_again), t_bare
  bare = rate(n_bare, t_bare)
  print(f"| bare forward (the faster of 2 runs) | {t_bare:.1f} | {bare:.0f} | 1.00 |")
  print(f"| bare forward, first run | {t_first:.1f} | {rate(n_bare, t_first):.0f} | "
        f"{bare / rate(n_bare, t_first):.2f} |")
  if t_capture is not None:
    print(f"| forward capturing {site} | {t_capture:.1f} | {rate(n_bare, t_capture):.0f} | "
          f"{bare / rate(n_bare, t_capture):.2f} |")
  for name in configs:
    print(f"| collect, {name} | {times[name]:.1f} | {rate(n_tok, times[name]):.0f} | "
          f"{bare / rate(n_tok, times[name]):.2f} |")
    if name in t_update:
      print(f"| collector alone (updates + results), {name} | {t_update[name]:.2f} | "
            f"{rate(n_bare, t_update[name]):.0f} | {bare / rate(n_bare, t_update[name]):.3f} |")
  print(f"| write {len(results.features)} latents (files, pages, logit lens) | {t_write:.1f} "
        f"| | |")
  assert len(paths) == 2 * sae.width + 1


if __name__ == "__main__":
  main()
