"""``dictlearn eval``: score dictionaries over a corpus (SAEBench core metrics), JSON + HTML.

Example (the two demo dictionaries on the default corpus)::

  dictlearn eval --dictionary demo/sae demo/transcoder --tokens 20000 --out results/

One streamed pass evaluates every dictionary (``dictlearn_penzai.evaluate``); each gets
``<out>/<name>.json`` (SAEBench core's ``eval_result_metrics`` layout, plus the config),
and ``<out>/summary.html`` plots L0 against FVU and against the CE loss score, one point
per dictionary (self-contained: plotly inline, no network). The default corpus is
English prose and code, one document of each in turn: the licence texts Debian ships in
/usr/share/common-licenses (else Python's pydoc topics) and Python's standard library
(``dictlearn_gemma.corpus.default_corpus``).

Many processes: the same command in each, with ``--coordinator HOST:PORT --num-processes N
--process-id I`` or, on a TPU pod slice or under SLURM, none of them (JAX detects the
cluster); each evaluates its share of the batches, and process 0 writes ``--out``.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import re
import sys
from pathlib import Path

from dictlearn import distributed as dist
from dictlearn import report


def parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="dictlearn eval", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--dictionary", nargs="+", required=True,
                  help="dictionary folders (Gemma Scope 2 layout, dictlearn.load)")
  ap.add_argument("--corpus", help="a folder of text files (one document each), a file, or "
                  "'pydoc' or 'stdlib' (default: Debian's licence texts and Python's "
                  "standard library, interleaved)")
  ap.add_argument("--model", help="a Gemma 3 or Gemma 2: GGUF file, HF folder or Gemma checkpoint (default: the 270M)")
  ap.add_argument("--tokens", type=int, default=20_000, help="non-padding tokens to evaluate")
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--batch-size", type=int, default=4)
  ap.add_argument("--dense-threshold", type=float, default=0.1)
  ap.add_argument("--out", default="results", help="output folder")
  ap.add_argument("--no-progress", action="store_true")
  dist.add_cli_flags(ap)
  return ap


def _file_name(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "dictionary"


def _get(m: dict, group: str, key: str):
  v = m.get(group, {}).get(key)
  return float("nan") if v is None else v


def summary_html(results: dict[str, dict], *, corpus: str, model: str, tokens: int | None,
                 seq_len: int) -> str:
  """The summary page: a table and two plotly scatters (L0 vs FVU, L0 vs CE loss score)."""
  import plotly.graph_objects as go
  from plotly.subplots import make_subplots

  names = list(results)
  l0 = [_get(results[n], "sparsity", "l0") for n in names]
  fvu = [_get(results[n], "misc_metrics", "fvu") for n in names]
  ce = [_get(results[n], "model_performance_preservation", "ce_loss_score") for n in names]
  # Plotly reads a few HTML tags in hover text: give it the names escaped, as text.
  safe = [html.escape(n) for n in names]
  fig = make_subplots(rows=1, cols=2, subplot_titles=("L0 vs FVU", "L0 vs CE loss score"))
  for col, ys, label in ((1, fvu, "FVU"), (2, ce, "CE loss score")):
    fig.add_trace(go.Scatter(
        x=l0, y=ys, mode="markers", text=safe, showlegend=False, marker=dict(size=10),
        hovertemplate="%{text}<br>L0 %{x:.1f}<br>" + label + " %{y:.4f}<extra></extra>"),
        row=1, col=col)
    fig.update_xaxes(title_text="L0", row=1, col=col)
    fig.update_yaxes(title_text=label, row=1, col=col)
  fig.update_layout(height=450, margin=dict(t=40))
  plot = fig.to_html(full_html=False, include_plotlyjs=True, div_id="evals-plot")
  fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
  rows = "".join(
      f"<tr><td>{html.escape(n)}</td><td>{fmt(m['sparsity']['l0'])}</td>"
      f"<td>{fmt(m['misc_metrics']['fvu'])}</td>"
      f"<td>{fmt(m['model_performance_preservation']['ce_loss_score'])}</td>"
      f"<td>{fmt(m['model_behavior_preservation']['kl_div_score'])}</td>"
      f"<td>{fmt(m['misc_metrics']['delta_loss'])}</td>"
      f"<td>{fmt(m['misc_metrics']['dead_fraction'])}</td></tr>"
      for n, m in results.items())
  return report.page("dictlearn eval", f"""<p id="eval-config">model <code>{html.escape(str(model))}</code>, corpus
<code>{html.escape(str(corpus))}</code>, {html.escape(str(tokens))} tokens,
sequences of {int(seq_len)}</p>
<table id="eval-table"><tr><th>dictionary</th><th>L0</th><th>FVU</th><th>CE loss score</th>
<th>KL div score</th><th>delta loss</th><th>dead</th></tr>{rows}</table>
{plot}""")


def write_results(results: dict[str, dict], out, *, corpus: str, model: str,
                  tokens: int | None, seq_len: int, info: dict | None = None) -> list[Path]:
  """``<out>/<name>.json`` per dictionary and ``<out>/summary.html``; returns the paths."""
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  paths, used = [], set()
  for name, m in results.items():
    stem = _file_name(name)
    while stem in used or stem == "summary":
      stem += "_"
    used.add(stem)
    doc = {"eval_type_id": "core", "dictionary": name, **(info or {}).get(name, {}),
           "eval_config": {"model": str(model), "corpus": str(corpus), "tokens": tokens,
                           "seq_len": seq_len},
           "eval_result_metrics": m}
    p = out / f"{stem}.json"
    p.write_text(json.dumps(_finite(doc), indent=1, allow_nan=False))
    paths.append(p)
  page = out / "summary.html"
  page.write_text(summary_html(results, corpus=corpus, model=model, tokens=tokens,
                               seq_len=seq_len), encoding="utf-8")
  return [*paths, page]


def _finite(o):
  """``o`` with NaN and infinities as None (strict JSON)."""
  if isinstance(o, dict):
    return {k: _finite(v) for k, v in o.items()}
  if isinstance(o, (list, tuple)):
    return [_finite(v) for v in o]
  if isinstance(o, float) and not math.isfinite(o):
    return None
  return o


def _fail(msg: str) -> int:
  print(f"dictlearn eval: {msg}", file=sys.stderr)
  return 2


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  dist.init_from_args(args)  # Before anything else touches JAX.
  import dictlearn as dl
  from dictlearn_gemma import corpus as C
  from dictlearn_penzai import hooks
  from dictlearn_penzai.evaluate import evaluate, named_dictionaries
  from dictlearn_penzai.train_cli import default_model

  dicts = []
  for ref in args.dictionary:
    try:
      dicts.append(dl.load(ref))
    except (FileNotFoundError, ValueError) as e:
      return _fail(f"cannot load the dictionary {ref!r}: {e}")
  try:
    corpus_name, corpus = C.from_argument(args.corpus)
  except FileNotFoundError as e:
    return _fail(str(e))
  model_path = args.model or default_model()
  if args.model and not args.model.startswith("kaggle:") and not Path(args.model).exists():
    return _fail(f"no model at {args.model}")
  from dictlearn_penzai.loading import load_gemma
  model, tok = load_gemma(model_path)
  named = named_dictionaries(dicts)
  info = {}
  for (name, d), ref in zip(named.items(), args.dictionary):
    try:
      src, dst = hooks.read_write_sites(model, d)
    except ValueError as e:
      return _fail(f"{ref}: {e}")
    info[name] = {"source": ref, "site_in": str(src), "site_out": str(dst),
                  "width": d.width, "kind": type(d).__name__}
  results = evaluate(model, tok, corpus, named, tokens=args.tokens, seq_len=args.seq_len,
                     batch_size=args.batch_size, progress=not args.no_progress,
                     dense_threshold=args.dense_threshold)
  if not dist.is_primary():
    return 0  # Every process has the results; process 0 writes them.
  paths = write_results(results, args.out, corpus=corpus_name, model=model_path,
                        tokens=args.tokens, seq_len=args.seq_len, info=info)
  for name, m in results.items():
    print(f"{name}: L0 {m['sparsity']['l0']:.1f}  FVU {m['misc_metrics']['fvu']:.4f}  "
          f"CE score {m['model_performance_preservation']['ce_loss_score']}  "
          f"KL score {m['model_behavior_preservation']['kl_div_score']}")
  print("wrote " + ", ".join(map(str, paths)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
