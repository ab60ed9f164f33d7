"""``dictlearn dashboard``: what each latent of a dictionary means, as pages and feature files.

Example (the first 200 latents of the demo SAE over 200k tokens of the default corpus)::

  dictlearn dashboard --dictionary demo/sae --latents 0:200 --tokens 200000 --out dash/

One streamed pass over the corpus (``dictlearn_penzai.dashboards.collect``) keeps, per
latent, its top-activating contexts, examples from quantiles of its activations, its
density, a histogram and act max/min; the logit lens of its decoder row comes from the
model's unembedding. Writes ``<out>/index.html`` (the latents by density, with a search
box) and, per latent, ``<out>/features/<scan>/<feature>.json`` in the feature schema of
circuit-tracer's frontend with the page ``<feature>.html`` beside it; ``<feature>`` is the
``feature`` field of the latent's nodes in graphs from ``dictlearn circuit`` (the Cantor
pairing of layer and latent) and ``<scan>`` their ``metadata["scan"]`` (``--scan``; empty
for graphs from ``dictlearn circuit``). Pages open offline. Model and corpus defaults are
those of ``dictlearn eval``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="dictlearn dashboard", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--dictionary", required=True,
                  help="a dictionary folder (Gemma Scope 2 layout, dictlearn.load)")
  ap.add_argument("--corpus", help="a folder of text files (one document each), a file, or "
                  "'pydoc' or 'stdlib' (default: Debian's licence texts and Python's "
                  "standard library, interleaved)")
  ap.add_argument("--model", help="a Gemma 3 or Gemma 2: GGUF file, HF folder or Gemma checkpoint (default: the 270M)")
  ap.add_argument("--tokens", type=int, default=200_000, help="non-padding tokens to read")
  ap.add_argument("--latents", help="which latents: 'start:stop', 'i', 'i,j,k' or 'all' "
                  "(default: the first 200)")
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--batch-size", type=int, default=4)
  ap.add_argument("--k", type=int, default=20, help="top contexts per latent")
  ap.add_argument("--quantiles", type=int, default=5, help="quantile bins per latent")
  ap.add_argument("--examples-per-quantile", type=int, default=5)
  ap.add_argument("--scan", default="", help="the graphs' metadata scan these files serve")
  ap.add_argument("--out", default="dashboards", help="output folder")
  ap.add_argument("--no-progress", action="store_true")
  return ap


def _fail(msg: str) -> int:
  print(f"dictlearn dashboard: {msg}", file=sys.stderr)
  return 2


def main(argv=None, *, loaded=None) -> int:
  """Runs the command; ``loaded``: a ``(model, tokenizer)`` to use instead of ``--model``
  (a notebook's model, or the tests' tiny one)."""
  args = parser().parse_args(argv)
  import dictlearn as dl
  from dictlearn import dashboards as D
  from dictlearn_gemma import corpus as C
  from dictlearn_penzai import dashboards, hooks
  from dictlearn_penzai.train_cli import default_model

  try:
    d = dl.load(args.dictionary)
  except (FileNotFoundError, ValueError) as e:
    return _fail(f"cannot load the dictionary {args.dictionary!r}: {e}")
  if not isinstance(d, (dl.JumpReLUSAE, dl.Transcoder)):
    return _fail(f"{args.dictionary} is a {type(d).__name__}; dashboards take one SAE or "
                 "transcoder (for a CLT, save one layer's latents as a transcoder)")
  try:
    latents = D.parse_latents(args.latents or f"0:{min(200, d.width)}", d.width)
    D.feature_file({"feature": 0}, args.scan)
  except ValueError as e:
    return _fail(f"--latents/--scan: {e}")
  if min(args.k, args.quantiles, args.examples_per_quantile, args.seq_len - 1,
         args.batch_size, args.tokens - 1) < 1:
    return _fail("--k, --quantiles, --examples-per-quantile and --batch-size must be >= 1, "
                 "--seq-len and --tokens >= 2")
  try:
    corpus_name, corpus = C.from_argument(args.corpus)
  except FileNotFoundError as e:
    return _fail(str(e))
  if loaded is None:
    if args.model and not args.model.startswith("kaggle:") and not Path(args.model).exists():
      return _fail(f"no model at {args.model}")
    from dictlearn_penzai.loading import load_gemma
    loaded = load_gemma(args.model or default_model())
  model, tok = loaded
  try:
    hooks.read_write_sites(model, d)
  except ValueError as e:
    return _fail(f"{args.dictionary}: {e}")
  results = dashboards.collect(
      model, tok, corpus, d, tokens=args.tokens, seq_len=args.seq_len,
      batch_size=args.batch_size, latents=latents, k=args.k, n_quantiles=args.quantiles,
      examples_per_quantile=args.examples_per_quantile, progress=not args.no_progress)
  paths = dashboards.write(results, args.out, tok, model, scan=args.scan)
  dead = sum(f.fired == 0 for f in results.features)
  print(f"{len(results.features)} latents over {results.tokens} tokens of {corpus_name} "
        f"({dead} never fired); wrote {paths[-1]} and a feature file and page per latent "
        f"in {paths[0].parent}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
