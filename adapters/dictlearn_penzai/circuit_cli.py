"""``dictlearn circuit``: the attribution graph of a prompt, as an interactive page and a graph file.

Example::

  dictlearn circuit --prompt "The capital of France is" --transcoders tc/ --out graph.html

``--transcoders`` is a cross-layer transcoder folder (``params_layer_{i}.safetensors``) or a
folder of per-layer transcoder folders (Gemma Scope 2 layout, each config naming its layer,
e.g. ``tc/layer_3/``); layers without one are all error. Without it, small affine
transcoders for every layer are trained on the default corpus on first use (a few minutes
on a CPU, with progress bars) and cached (``dictlearn_penzai.replacement``). Writes the pruned graph as a
self-contained HTML page (``--out``) and in the circuit-tracer / Neuronpedia JSON schema
(``--json``, default beside the page), plus the full graph as ``.npz`` with ``--npz``.

Feature pages: the graph's ``metadata.scan`` names the transcoder set (``--scan``; default
the ``--transcoders`` folder's name, or ``<model>-replacement``). Give the same name to
``dictlearn dashboard --scan`` for each layer's transcoder, and pass the folders it
wrote as ``--dashboards``: each feature node whose page exists links to it
(click a node in the page, or circuit-tracer's frontend reading ``features/<scan>/``)::

  dictlearn dashboard --dictionary tc/layer_3 --scan tc --corpus C --out dash/layer_3
  dictlearn circuit --prompt "..." --transcoders tc/ --dashboards dash/layer_* --out graph.html
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax.numpy as jnp

import dictlearn as dl
from dictlearn import dashboards, graph_view, graphs
from dictlearn.io import DictionaryFileError
from dictlearn_penzai import circuits
from dictlearn_penzai.dashboards import lens_logits
from dictlearn_penzai.train_cli import default_model


def parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="dictlearn circuit", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--prompt", required=True)
  ap.add_argument("--transcoders",
                  help="a CLT folder, or a folder of per-layer transcoder folders (default: "
                       "train small ones on first use and cache them)")
  ap.add_argument("--out", required=True, help="the HTML page to write")
  ap.add_argument("--json", help="the graph file (default: --out with .json)")
  ap.add_argument("--npz", help="also save the full, unpruned graph here")
  ap.add_argument("--scan", help="the transcoder set's name in the graph file (default: the "
                                 "--transcoders folder's name, or <model>-replacement)")
  ap.add_argument("--dashboards", nargs="+", default=[],
                  help="folders `dictlearn dashboard --scan <scan>` wrote (e.g. one a layer): "
                       "link each feature node to its page there")
  ap.add_argument("--model", help="a Gemma 3 or Gemma 2: GGUF file, HF folder or Gemma "
                                  "checkpoint (default: the 270M)")
  ap.add_argument("--max-n-logits", type=int, default=10)
  ap.add_argument("--desired-logit-prob", type=float, default=0.95)
  ap.add_argument("--max-feature-nodes", type=int, default=None)
  ap.add_argument("--batch-size", type=int, default=64)
  ap.add_argument("--node-threshold", type=float, default=0.8)
  ap.add_argument("--edge-threshold", type=float, default=0.98)
  return ap


def load_transcoders(folder: str | Path):
  """A CrossLayerTranscoder, or {layer: Transcoder} from a folder of transcoder folders."""
  folder = Path(folder)
  if not folder.is_dir():
    raise SystemExit(f"--transcoders: {folder} is not a folder")
  if (folder / "params_layer_0.safetensors").exists():
    return dl.load(folder)
  out = {}
  for sub in sorted(p for p in folder.iterdir() if (p / "params.safetensors").exists()):
    t = dl.load(sub)
    if not isinstance(t, dl.Transcoder) or t.meta.layer is None:
      raise SystemExit(f"--transcoders: {sub} is not a transcoder whose config names its layer")
    if t.meta.layer in out:
      raise SystemExit(f"--transcoders: two transcoders for layer {t.meta.layer} in {folder}")
    out[t.meta.layer] = t
  if not out:
    raise SystemExit(f"--transcoders: {folder} holds no CLT (params_layer_0.safetensors) and "
                     "no transcoder folders (params.safetensors + config.json)")
  return out


def add_logit_lens(data: dict, transcoders, unembedding, tokenizer, k: int = 5):
  """Adds each feature node's logit-lens tokens (its decoder row into its own layer);
  ``unembedding`` as ``dictlearn.dashboards.logit_lens`` takes it: W_U (d, vocab), or rows
  (n, d) -> logits (n, vocab) such as ``dictlearn_penzai.dashboards.lens_logits(model)``."""
  nodes = [n for n in data["nodes"] if n["feature_type"] == graphs.FEATURE]
  if not nodes:
    return
  rows = []
  for node in nodes:
    layer, latent, _ = (int(v) for v in node["node_id"].split("_"))
    if isinstance(transcoders, dl.CrossLayerTranscoder):
      rows.append(transcoders.w_dec[layer, latent, layer])
    else:
      rows.append(transcoders[layer].w_dec[latent])
  top, _, bottom, _ = dashboards.logit_lens(jnp.stack(rows), unembedding, k)
  word = lambda i: tokenizer.decode([int(i)])  # noqa: E731
  for node, t, b in zip(nodes, top, bottom):
    node["logit_lens"] = {"top": [word(i) for i in t], "bottom": [word(i) for i in b]}


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  from dictlearn import dashboards
  from dictlearn_penzai.loading import load_gemma

  model_name = Path(args.model).stem if args.model else "gemma-3-270m"
  scan = args.scan or (Path(args.transcoders).resolve().name if args.transcoders
                       else f"{model_name}-replacement")
  try:
    dashboards.feature_file({"feature": 0}, scan)
  except ValueError as e:
    raise SystemExit(f"--scan: {e}") from e
  for folder in args.dashboards:
    if not Path(folder, "features").is_dir():
      raise SystemExit(f"--dashboards: {folder} has no features/ folder; write it with "
                       f"`dictlearn dashboard --scan {scan} --out {folder}`")

  try:
    transcoders = load_transcoders(args.transcoders) if args.transcoders else None
  except DictionaryFileError as e:
    raise SystemExit(f"--transcoders: {e}") from e
  model, tokenizer = load_gemma(args.model or default_model(), dtype=jnp.float32)
  if transcoders is None:
    from dictlearn_gemma.corpus import default_corpus
    from dictlearn_penzai.replacement import default_transcoders
    transcoders = default_transcoders(model, tokenizer, default_corpus()[1],
                                      model_name=model_name)
  ids = list(tokenizer.encode(args.prompt))  # BOS first.
  lin = circuits.linearizable(model)
  graph = circuits.attribute(
      lin, ids, transcoders, max_n_logits=args.max_n_logits,
      desired_logit_prob=args.desired_logit_prob, max_feature_nodes=args.max_feature_nodes,
      batch_size=args.batch_size, input_string=args.prompt,
      metadata={"transcoders": str(args.transcoders or "dictlearn_penzai.replacement"),
                "scan": scan})
  if args.npz:
    graphs.save(graph, args.npz)
  data = graphs.to_json(graph, slug=Path(args.out).stem,
                        token_strings=lambda i: tokenizer.decode([int(i)]),
                        node_threshold=args.node_threshold, edge_threshold=args.edge_threshold)
  add_logit_lens(data, transcoders, lens_logits(model), tokenizer)
  out = Path(args.out)
  linked = sum(dashboards.link_graph(data, folder, relative_to=out.resolve().parent)
               for folder in args.dashboards)
  json_path = Path(args.json) if args.json else out.with_suffix(".json")
  json_path.write_text(json.dumps(data))
  graph_view.write_graph_html(data, out)
  replacement, completeness = graphs.scores(graph)
  print(f"{len(graph.selected_features)} features, {len(graph.logit_tokens)} logits; "
        f"replacement score {replacement:.3f}, completeness {completeness:.3f}")
  if args.dashboards:
    n_features = sum(n["feature_type"] == graphs.FEATURE for n in data["nodes"])
    print(f"{linked} of {n_features} feature nodes link to pages in "
          f"{', '.join(args.dashboards)}")
  print(f"wrote {out} and {json_path}")
  return 0
