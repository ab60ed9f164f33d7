"""A self-contained HTML viewer for attribution graphs (the circuit-tracer / Neuronpedia schema).

``graph_html(graph)`` turns a graph file dict (``metadata``, ``nodes``, ``links``, as
``graphs.to_json`` and circuit-tracer's ``create_graph_files`` write it) into one page with
inline CSS and JS that opens offline. Nodes sit in rows by layer (embeddings at the bottom,
logits on top) and columns by prompt position; edges are coloured by sign (blue +, red -)
and sized by |weight|. Hovering a node shows its token, latent, layer, activation,
influence and logit-lens tokens (optional node key ``logit_lens: {"top": [...], "bottom":
[...]}``); clicking one lists its strongest inputs and outputs and highlights their edges;
``#node=<node_id>`` in the URL selects a node on load, Escape clears the selection.

All graph text stays text: the data travels as JSON in ``<script type="application/json">``
with ``<``, ``>``, ``&`` and every non-ASCII character (U+2028/2029 included) escaped, and
the script builds the DOM with ``textContent`` / ``createElementNS`` only.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from urllib.parse import urlsplit

from dictlearn import report

KINDS = {"mlp reconstruction error": "error", "embedding": "embedding", "logit": "logit"}
_NODE_KEYS = ("node_id", "layer", "ctx_idx", "feature_type")
_COL_MIN, _GAP, _ROW_H, _LEFT, _TOP = 90, 16, 56, 70, 24


def _need(d, key: str, where: str):
  if not isinstance(d, dict):
    raise ValueError(f"{where} is not an object")
  if key not in d:
    raise ValueError(f'{where} has no "{key}"')
  return d[key]


def _number(v, where: str):
  if v is None:
    return None
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    raise ValueError(f"{where} is {v!r}, not a finite number")
  return float(v)


def _layer_key(layer: str):
  return (0, int(layer), "") if re.fullmatch(r"-?\d+", layer) else (1, 0, layer)


def _node(n: dict, where: str, tokens: list) -> dict:
  nid, layer, pos, ftype = (_need(n, k, where) for k in _NODE_KEYS)
  if not isinstance(nid, str):
    raise ValueError(f"{where}: node_id {nid!r} is not a string")
  if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos < len(tokens):
    raise ValueError(f"{where}: ctx_idx {pos!r} is not a position of the "
                     f"{len(tokens)} prompt tokens")
  kind = KINDS.get(ftype, "feature")
  m = re.fullmatch(r"[^_]+_(-?\d+)_\d+", nid)  # circuit-tracer ids: {layer}_{latent}_{pos}
  out = {"id": nid, "kind": kind, "layer": str(layer), "pos": pos,
         "latent": int(m[1]) if m else n.get("feature"), "clerp": str(n.get("clerp") or ""),
         "target": bool(n.get("is_target_logit"))}
  for key, name in (("activation", "activation"), ("influence", "influence"),
                    ("token_prob", "prob")):
    out[name] = _number(n.get(key), f"{where}.{key}")
  lens = n.get("logit_lens")
  if lens is not None:
    if not (isinstance(lens, dict) and all(isinstance(lens.get(k, []), list) and all(
        isinstance(s, str) for s in lens.get(k, [])) for k in ("top", "bottom"))):
      raise ValueError(f'{where}.logit_lens must be {{"top": [str], "bottom": [str]}}')
    out["lens"] = {"top": lens.get("top", []), "bottom": lens.get("bottom", [])}
  url = n.get("dashboard_url")
  if url is not None:
    if not isinstance(url, str) or re.search(r"[\x00-\x20\x7f]", url) or urlsplit(
        url).scheme.lower() not in ("", "http", "https"):
      raise ValueError(f"{where}.dashboard_url {url!r} is not an http(s) or relative URL")
    out["url"] = url
  token = tokens[pos]
  out["label"] = out["clerp"] or {
      "feature": f"L{layer} #{out['latent']}", "error": f"error L{layer} @{pos}",
      "embedding": f"token {token!r}", "logit": f"logit {n.get('feature')}"}[kind]
  return out


def _view(graph: dict) -> dict:
  """Validates ``graph`` and lays it out: the data the page's script draws."""
  meta = _need(graph, "metadata", "graph")
  raw_nodes, raw_links = _need(graph, "nodes", "graph"), _need(graph, "links", "graph")
  tokens = _need(meta, "prompt_tokens", 'graph["metadata"]')
  if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
    raise ValueError('graph["metadata"]["prompt_tokens"] must be a list of strings')
  if not isinstance(raw_nodes, list) or not isinstance(raw_links, list):
    raise ValueError('graph["nodes"] and graph["links"] must be lists')
  nodes, index = [], {}
  for i, n in enumerate(raw_nodes):
    node = _node(n, f'graph["nodes"][{i}]', tokens)
    if node["id"] in index:
      raise ValueError(f'graph["nodes"][{i}]: node_id {node["id"]!r} appears twice')
    index[node["id"]] = len(nodes)
    nodes.append(node)
  links = []
  for i, link in enumerate(raw_links):
    where = f'graph["links"][{i}]'
    ends = [_need(link, k, where) for k in ("source", "target")]
    for end, value in zip(("source", "target"), ends):
      if not isinstance(value, str) or value not in index:
        raise ValueError(f"{where}: {end} {value!r} is not a node of the graph")
    weight = _number(_need(link, "weight", where), f"{where}.weight")
    if weight is None:
      raise ValueError(f"{where}.weight is null")
    links.append([index[ends[0]], index[ends[1]], weight])

  middle = sorted({n["layer"] for n in nodes if n["kind"] in ("feature", "error")}, key=_layer_key)
  rows = ["emb"] + [f"L{layer}" for layer in middle] + ["logit"]
  cells: dict = {}
  for j, n in enumerate(nodes):
    r = ({"embedding": 0, "logit": len(rows) - 1}[n["kind"]] if n["kind"] in ("embedding", "logit")
         else 1 + middle.index(n["layer"]))
    cells.setdefault((r, n["pos"]), []).append(j)
  widths = [_COL_MIN] * len(tokens)
  for (_, p), members in cells.items():
    widths[p] = max(widths[p], _GAP * (len(members) + 1))
  starts = [_LEFT + sum(widths[:p]) for p in range(len(tokens))]
  row_y = [_TOP + (len(rows) - 1 - r) * _ROW_H for r in range(len(rows))]
  for (r, p), members in cells.items():
    for k, j in enumerate(members):
      nodes[j]["x"] = round(starts[p] + widths[p] * (k + 1) / (len(members) + 1), 1)
      nodes[j]["y"] = row_y[r]
  return {"prompt": str(meta.get("prompt", "")), "tokens": tokens,
          "rows": rows, "rowY": row_y, "cols": [s + w / 2 for s, w in zip(starts, widths)],
          "left": _LEFT, "width": _LEFT + sum(widths) + 20, "height": row_y[0] + 40,
          "nodes": nodes, "links": links}


def _script_json(data) -> str:
  """JSON safe inside <script>: no ``<``, ``>``, ``&``; ensure_ascii escapes U+2028/2029."""
  text = json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
  return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


_CSS = """<style>
body { max-width: none; margin: 1em 2em; }
#wrap { display: flex; gap: 1em; align-items: flex-start; }
#graph { flex: 1; overflow: auto; max-height: 82vh; border: 1px solid #ddd; }
#panel { flex: none; width: 360px; max-height: 82vh; overflow: auto; font-size: 90%; }
.grid { stroke: #eee; } .rowlab { text-anchor: end; font-size: 11px; fill: #666; }
.tok { text-anchor: middle; font-size: 11px; }
.edge { stroke-opacity: .35; } .edge.pos { stroke: #2563eb; } .edge.neg { stroke: #dc2626; }
svg.focus .edge { stroke-opacity: .05; } svg.focus .edge.hl { stroke-opacity: .9; }
.node { stroke: #333; cursor: pointer; } .node.feature { fill: #fbbf24; }
.node.error { fill: #9ca3af; } .node.embedding { fill: #86efac; } .node.logit { fill: #c4b5fd; }
.node.target { stroke-width: 2.5; } .node.selected { stroke: #000; stroke-width: 3.5; }
#tip { position: absolute; background: #fff; border: 1px solid #999; padding: 4px 6px;
  font-size: 12px; pointer-events: none; max-width: 340px; box-shadow: 2px 2px 6px #0002; }
ol.edges { padding-left: 1.8em; } ol.edges li { cursor: pointer; }
ol.edges .w { float: right; margin-left: .5em; font-family: monospace; }
li.pos .w { color: #2563eb; } li.neg .w { color: #dc2626; }
</style>"""

_JS = r"""<script>
(function () {
  "use strict";
  var G = JSON.parse(document.getElementById("graph-data").textContent);
  var NS = "http://www.w3.org/2000/svg", LIMIT = 30, current = -1;
  var panel = document.getElementById("panel"), tip = document.getElementById("tip");
  function svgEl(tag, attrs, text, parent) {
    var e = document.createElementNS(NS, tag);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text != null) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }
  function el(tag, text, parent, cls) {
    var e = document.createElement(tag);
    if (text != null) e.textContent = text;
    if (cls) e.className = cls;
    if (parent) parent.appendChild(e);
    return e;
  }
  function fmt(v) { return v == null ? "-" : Number(v).toPrecision(3); }
  function signed(w) { return (w >= 0 ? "+" : "") + Number(w).toPrecision(3); }
  function quote(s) { return "\u201c" + s + "\u201d"; }
  document.getElementById("prompt").textContent = G.prompt;
  var svg = svgEl("svg", {id: "canvas", width: G.width, height: G.height}, null,
                  document.getElementById("graph"));
  G.rows.forEach(function (label, r) {
    svgEl("line", {"class": "grid", x1: G.left, x2: G.width, y1: G.rowY[r], y2: G.rowY[r]}, null, svg);
    svgEl("text", {"class": "rowlab", x: G.left - 8, y: G.rowY[r] + 4}, label, svg);
  });
  G.cols.forEach(function (x, p) {
    var t = G.tokens[p], label = t.length > 11 ? t.slice(0, 10) + "\u2026" : t;
    var e = svgEl("text", {"class": "tok", x: x, y: G.height - 8}, label, svg);
    svgEl("title", {}, p + ": " + t, e);
  });
  var maxW = G.links.reduce(function (m, l) { return Math.max(m, Math.abs(l[2])); }, 1e-12);
  var ins = G.nodes.map(function () { return []; }), outs = G.nodes.map(function () { return []; });
  var edgeLayer = svgEl("g", {}, null, svg), nodeLayer = svgEl("g", {}, null, svg);
  var edges = G.links.map(function (l, k) {
    var s = G.nodes[l[0]], t = G.nodes[l[1]];
    outs[l[0]].push(k); ins[l[1]].push(k);
    return svgEl("line", {"class": "edge " + (l[2] >= 0 ? "pos" : "neg"), x1: s.x, y1: s.y,
                          x2: t.x, y2: t.y, "stroke-width": (0.4 + 3.6 * Math.abs(l[2]) / maxW).toFixed(2)},
                 null, edgeLayer);
  });
  function details(n) {
    var out = ["token at position " + n.pos + ": " + quote(G.tokens[n.pos])];
    if (n.kind === "feature") out.push("latent " + n.latent + " at layer " + n.layer);
    if (n.kind === "error") out.push("MLP reconstruction error at layer " + n.layer);
    if (n.kind === "logit") out.push("logit " + n.latent + ", p = " + fmt(n.prob));
    if (n.activation != null) out.push("activation " + fmt(n.activation));
    if (n.influence != null) out.push("influence " + fmt(n.influence));
    if (n.lens) {
      out.push("logit lens top: " + n.lens.top.map(quote).join(" "));
      out.push("logit lens bottom: " + n.lens.bottom.map(quote).join(" "));
    }
    return out;
  }
  var shapes = G.nodes.map(function (n, i) {
    var e = n.kind === "feature" ? svgEl("circle", {cx: n.x, cy: n.y, r: 5.5})
      : n.kind === "error" ? svgEl("rect", {x: n.x - 4.5, y: n.y - 4.5, width: 9, height: 9,
                                            transform: "rotate(45 " + n.x + " " + n.y + ")"})
      : svgEl("rect", {x: n.x - 7, y: n.y - 5, width: 14, height: 10, rx: 2});
    e.setAttribute("class", "node " + n.kind + (n.target ? " target" : ""));
    e.setAttribute("data-node-id", n.id);
    e.setAttribute("tabindex", "0");
    e.addEventListener("mouseenter", function (ev) {
      tip.replaceChildren();
      el("b", n.label, tip);
      details(n).forEach(function (line) { el("div", line, tip); });
      tip.style.left = (ev.pageX + 14) + "px";
      tip.style.top = (ev.pageY + 14) + "px";
      tip.hidden = false;
    });
    e.addEventListener("mouseleave", function () { tip.hidden = true; });
    e.addEventListener("click", function () { select(i); });
    e.addEventListener("keydown", function (ev) { if (ev.key === "Enter") select(i); });
    nodeLayer.appendChild(e);
    return e;
  });
  function list(name, ks, end) {
    el("h3", name + " (" + ks.length + ")", panel);
    var ol = el("ol", null, panel, "edges");
    ks.slice().sort(function (a, b) { return Math.abs(G.links[b][2]) - Math.abs(G.links[a][2]); })
      .slice(0, LIMIT).forEach(function (k) {
        var l = G.links[k], j = l[end], li = el("li", null, ol, l[2] >= 0 ? "pos" : "neg");
        li.setAttribute("data-node-id", G.nodes[j].id);
        el("span", signed(l[2]), li, "w");
        el("span", G.nodes[j].label, li, "lab");
        li.addEventListener("click", function () { select(j); });
      });
  }
  function select(i, missing) {
    current = i;
    shapes.forEach(function (e, j) { e.classList.toggle("selected", j === i); });
    var on = {};
    if (i >= 0) ins[i].concat(outs[i]).forEach(function (k) { on[k] = true; });
    edges.forEach(function (e, k) { e.classList.toggle("hl", !!on[k]); });
    svg.classList.toggle("focus", i >= 0);
    panel.replaceChildren();
    if (i < 0) {
      el("p", missing != null ? "No node " + quote(missing) + " in this graph."
                              : "Click a node to list its inputs and outputs.", panel, "note");
      return;
    }
    var n = G.nodes[i];
    el("h2", n.label, panel);
    el("div", "node " + n.id, panel, "note");
    details(n).forEach(function (line) { el("div", line, panel, "note"); });
    if (n.url) {
      var a = el("a", "feature page", el("div", null, panel));
      a.setAttribute("href", n.url); a.setAttribute("target", "_blank"); a.setAttribute("rel", "noopener");
    }
    list("Inputs", ins[i], 0);
    list("Outputs", outs[i], 1);
    var hash = "#node=" + encodeURIComponent(n.id);
    if (location.hash !== hash) history.replaceState(null, "", hash);
  }
  function fromHash() {
    var m = /^#node=(.+)$/.exec(location.hash), id;
    if (!m) return;
    try { id = decodeURIComponent(m[1]); } catch (e) { id = m[1]; }
    var i = G.nodes.findIndex(function (n) { return n.id === id; });
    if (i !== current || i < 0) select(i, id);
  }
  window.addEventListener("hashchange", fromHash);
  document.addEventListener("keydown", function (ev) {
    if (ev.key === "Escape" && current >= 0) {
      select(-1);
      history.replaceState(null, "", location.pathname + location.search);
    }
  });
  select(-1);
  fromHash();
})();
</script>"""


def graph_html(graph: dict, *, title: str | None = None) -> str:
  """A complete self-contained HTML page viewing ``graph`` (a graph file dict).

  ``title`` defaults to the graph's ``metadata.slug``. Raises ValueError naming the key,
  node or link when ``graph`` is malformed (a missing key, a link to an unknown node, a
  position outside the prompt, a non-finite weight, a non-http(s) ``dashboard_url``).
  """
  if not isinstance(graph, dict):
    raise ValueError(f"graph is a {type(graph).__name__}, not a graph file dict")
  data = _script_json(_view(graph))
  if title is None:
    title = str(graph["metadata"].get("slug") or "attribution graph")
  body = (f'{_CSS}\n<p class="note" id="prompt"></p>\n<div id="wrap"><div id="graph"></div>'
          f'<aside id="panel"></aside></div>\n<div id="tip" hidden></div>\n'
          f'<script type="application/json" id="graph-data">{data}</script>\n{_JS}')
  return report.page(title, body)


def write_graph_html(graph: dict, path) -> Path:
  """Writes ``graph_html(graph)`` to ``path`` (UTF-8) and returns the path."""
  path = Path(path)
  path.write_text(graph_html(graph), encoding="utf-8")
  return path
