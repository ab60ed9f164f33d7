"""Attribution graphs as numpy data: node order, influence, pruning, scores, graph files.

The definitions are circuit-tracer 0.5's (``graph.py``, ``utils/create_graph_files.py``), so
graphs travel to and from circuit-tracer, its frontend and Neuronpedia. A graph has
``n_nodes = n_selected + n_layers * n_pos + n_pos + n_logits`` nodes, in this order:

  [0, n_selected)                      feature nodes: active_features[selected_features]
  n_selected + layer * n_pos + pos     the transcoder error at (layer, pos)
  then n_pos token (embedding) nodes, then the n_logits logit nodes (by probability)

and ``adjacency[target, source]`` is the direct effect of source on target. Numpy only: the
JAX code that computes graphs builds a ``Graph``; viewers read ``to_json``'s dict.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import zipfile
import zlib
from typing import Callable, Mapping, NamedTuple

import numpy as np

FEATURE, ERROR, TOKEN, LOGIT = ("cross layer transcoder", "mlp reconstruction error",
                                "embedding", "logit")  # circuit-tracer's feature_type strings
MAX_NODES = 50_000  # largest graph a file may describe (a dense float32 adjacency of 10 GB)


class GraphFileError(ValueError):
  """A graph file (JSON or .npz) that is malformed, inconsistent or hostile."""


def _check(ok, message: str, error=ValueError) -> None:
  if not ok:
    raise error(message)


def _need(ok, message: str) -> None:
  _check(ok, message, GraphFileError)


def _array(name: str, value, kind: str, shape: tuple) -> np.ndarray:
  """``value`` as int64 (kind "i") or float32 ("f"); shape: (label, size or None) pairs."""
  a = np.asarray(value)
  if a.size == 0 and a.dtype.kind == "f":
    a = a.astype(np.int64 if kind == "i" else np.float32)  # [] comes in as float64
  want = "(" + ", ".join(str(label) for label, _ in shape) + ("," if len(shape) == 1 else "") + ")"
  dtype = "int64" if kind == "i" else "float32"
  if a.dtype.kind not in ("iu" if kind == "i" else "iuf") or a.ndim != len(shape) or any(
      n is not None and n != d for (_, n), d in zip(shape, a.shape)):
    raise ValueError(f"{name}: expected {dtype} of shape {want}, got {a.dtype} {a.shape}")
  return a.astype(np.int64 if kind == "i" else np.float32, copy=False)


@dataclasses.dataclass(frozen=True, eq=False)
class Graph:
  """An attribution graph (node order in the module docstring); arrays are numpy.

  input_tokens (n_pos,) int64; active_features (n_active, 3) int64 rows (layer, position,
  latent), sorted; activation_values (n_active,) float32; selected_features (n_selected,)
  int64, ascending indices into active_features; logit_tokens (n_logits,) int64 and
  logit_probabilities (n_logits,) float32, by descending probability; adjacency (n_nodes,
  n_nodes) float32 [target, source]. metadata: JSON-able (model, transcoders, ...).
  """
  input_tokens: np.ndarray
  active_features: np.ndarray
  activation_values: np.ndarray
  selected_features: np.ndarray
  logit_tokens: np.ndarray
  logit_probabilities: np.ndarray
  adjacency: np.ndarray
  n_layers: int
  input_string: str = ""
  metadata: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    """Coerces the arrays to their dtypes; a ValueError names any field that is off."""
    put = lambda name, kind, *shape: object.__setattr__(
        self, name, _array(name, getattr(self, name), kind, shape))
    _check(isinstance(self.n_layers, (int, np.integer)) and not isinstance(
        self.n_layers, (bool, np.bool_)) and self.n_layers >= 1,
           f"n_layers: expected an int >= 1, got {self.n_layers!r}")
    object.__setattr__(self, "n_layers", int(self.n_layers))
    put("input_tokens", "i", ("n_pos", None))
    put("active_features", "i", ("n_active", None), ("3", 3))
    af, n_pos, n_active = self.active_features, self.n_pos, len(self.active_features)
    put("activation_values", "f", ("n_active", n_active))
    put("selected_features", "i", ("n_selected", None))
    put("logit_tokens", "i", ("n_logits", None))
    put("logit_probabilities", "f", ("n_logits", self.n_logits))
    _check(n_pos >= 1 and self.input_tokens.min() >= 0,
           "input_tokens: expected at least one token id, all >= 0")
    _check(self.n_logits >= 1 and self.logit_tokens.min() >= 0,
           "logit_tokens: expected at least one token id, all >= 0")
    label = f"n_nodes = {self.n_nodes}"
    put("adjacency", "f", (label, self.n_nodes), (label, self.n_nodes))
    _check(np.isfinite(self.logit_probabilities).all() and self.logit_probabilities.min() >= 0,
           "logit_probabilities: expected finite values >= 0")
    _check(not n_active or ((af >= 0).all() and af[:, 0].max() < self.n_layers
                            and af[:, 1].max() < n_pos),
           f"active_features: layers must lie in [0, n_layers = {self.n_layers}), positions in "
           f"[0, n_pos = {n_pos}), latents >= 0")
    step = np.diff(af, axis=0)  # each row must exceed the one before it lexicographically
    first = np.where(step != 0, np.arange(3), 3).min(1)
    _check(not ((first == 3).any() or (step[np.arange(len(step)), first % 3] < 0).any()),
           "active_features: rows must be unique and sorted by (layer, position, latent)")
    _check(np.isfinite(self.activation_values).all(), "activation_values: expected finite values")
    sel = self.selected_features
    _check(not len(sel) or (sel.min() >= 0 and sel.max() < n_active and (np.diff(sel) > 0).all()),
           f"selected_features: expected ascending unique indices in [0, n_active = {n_active})")
    _check(np.isfinite(self.adjacency).all(), "adjacency: expected finite values")
    _check(isinstance(self.input_string, str), "input_string: expected a str")
    try:
      _check(isinstance(self.metadata, dict) and all(isinstance(k, str) for k in self.metadata),
             "not a dict with str keys")
      json.dumps(self.metadata, allow_nan=False)
    except (TypeError, ValueError) as e:
      raise ValueError(f"metadata: expected a JSON-able dict with str keys ({e})") from None

  n_pos = property(lambda self: len(self.input_tokens))
  n_selected = property(lambda self: len(self.selected_features))
  n_logits = property(lambda self: len(self.logit_tokens))
  n_nodes = property(lambda self: self.n_selected + (self.n_layers + 1) * self.n_pos
                     + self.n_logits)

  @property
  def feature_nodes(self) -> np.ndarray:
    """(n_selected, 3) int64: (layer, position, latent) of each feature node."""
    return self.active_features[self.selected_features]

  def error_node(self, layer: int, pos: int) -> int:
    _check(0 <= layer < self.n_layers and 0 <= pos < self.n_pos,
           f"no error node ({layer}, {pos}) in ({self.n_layers}, {self.n_pos})", IndexError)
    return self.n_selected + layer * self.n_pos + pos

  def token_node(self, pos: int) -> int:
    _check(0 <= pos < self.n_pos, f"no token node {pos} in {self.n_pos}", IndexError)
    return self.n_selected + self.n_layers * self.n_pos + pos

  def logit_node(self, i: int) -> int:
    _check(0 <= i < self.n_logits, f"no logit node {i} in {self.n_logits}", IndexError)
    return self.n_nodes - self.n_logits + i

  def node_kinds(self) -> np.ndarray:
    """(n_nodes,) str: "feature", "error", "token" or "logit"."""
    counts = (self.n_selected, self.n_layers * self.n_pos, self.n_pos, self.n_logits)
    return np.repeat(np.array(["feature", "error", "token", "logit"]), counts)

  def logit_weights(self) -> np.ndarray:
    """(n_nodes,) float32: the logit probabilities on the logit nodes, 0 elsewhere."""
    w = np.zeros(self.n_nodes, np.float32)
    w[self.n_nodes - self.n_logits:] = self.logit_probabilities
    return w


def normalize_matrix(matrix: np.ndarray) -> np.ndarray:
  """|matrix| (n, n) with each row divided by its sum (rows summing to 0 stay 0), float32."""
  a = np.abs(np.asarray(matrix, np.float32))
  a /= np.maximum(a.sum(1, keepdims=True), np.float32(1e-10))
  return a


def _influence(b: np.ndarray, w: np.ndarray) -> np.ndarray:
  """w (B + B^2 + ...) (n,) float64 for B = b (n, n) float32 and w (n,)."""
  # circuit-tracer sums the series until a term is exactly 0: B is nilpotent on a causal
  # graph (no cycles), so the sum is exact after (longest path) terms and costs a few
  # vector-matrix products. A graph with cycles never gets there: solve (I - B)^T x = (wB)^T.
  term = w.astype(np.float32) @ b
  total = term.astype(np.float64)
  for _ in range(min(len(w), 1000)):
    if not term.any():
      return total
    term = term @ b
    total += term
  b64 = b.astype(np.float64)
  if np.abs(np.linalg.eigvals(b64)).max() > 1 - 1e-9:  # the series diverges
    raise ValueError("adjacency: influence diverges (a cycle that nothing leaves)")
  return np.linalg.solve(np.eye(len(w)) - b64.T, b64.T @ w.astype(np.float64))


def _weights(graph_or_adjacency, logit_weights) -> tuple[np.ndarray, np.ndarray]:
  g = graph_or_adjacency
  is_graph = isinstance(g, Graph)
  _check(is_graph or logit_weights is not None, "logit_weights: required with an adjacency")
  adj = g.adjacency if is_graph else np.asarray(g, np.float32)
  w = np.asarray(g.logit_weights() if logit_weights is None else logit_weights, np.float32)
  _check(w.ndim == 1 and adj.shape == (len(w), len(w)),
         f"adjacency {adj.shape}, logit_weights {w.shape}: expected (n, n) and (n,)")
  return adj, w


def node_influence(graph_or_adjacency, logit_weights=None) -> np.ndarray:
  """(n_nodes,) float64: each node's influence w (B + B^2 + ...) on the weighted logits.

  B = normalize_matrix(adjacency); logit_weights (n_nodes,) default the graph's.
  """
  adj, w = _weights(graph_or_adjacency, logit_weights)
  return _influence(normalize_matrix(adj), w)


def edge_influence(graph_or_adjacency, logit_weights=None) -> np.ndarray:
  """(n_nodes, n_nodes) float32 [target, source]: B times the target's influence plus weight."""
  adj, w = _weights(graph_or_adjacency, logit_weights)
  b = normalize_matrix(adj)
  b *= (_influence(b, w) + w).astype(np.float32)[:, None]
  return b


def _threshold(scores: np.ndarray, fraction: float) -> float:
  """The smallest score among the top ones that hold ``fraction`` of the total, as
  circuit-tracer's ``find_threshold``; 1.0 keeps every score (its clip to the last one)."""
  ranked = -np.sort(-scores[scores > 0])  # zeros sort last and add nothing to the sum
  if fraction >= 1.0 or not len(ranked):
    return float(scores.min()) if scores.size else 0.0
  cumulative = np.cumsum(ranked, dtype=np.float64)
  i = int(np.searchsorted(cumulative / cumulative[-1], fraction))
  if i < len(ranked):
    return float(ranked[i])
  return 0.0 if len(ranked) < scores.size else float(ranked[-1])


class Pruned(NamedTuple):
  node_mask: np.ndarray  # (n_nodes,) bool: kept nodes (every token and logit)
  edge_mask: np.ndarray  # (n_nodes, n_nodes) bool [target, source]: kept edges
  cumulative_scores: np.ndarray  # (n_nodes,) float64: share of the influence held by the
  # nodes ranked at or above each node (what the graph file writes as "influence")


def _cumulative(influence: np.ndarray) -> np.ndarray:
  order = np.argsort(-influence, kind="stable")
  out = np.empty_like(influence)
  out[order] = np.cumsum(influence[order]) / max(influence.sum(), 1e-300)
  return out


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
  """circuit-tracer's ``prune_graph``: keep the nodes with ``node_threshold`` of the logit
  influence (tokens and logits always), then the edges with ``edge_threshold`` of the edge
  influence among them, then drop features and errors left without an outgoing edge and
  features without an incoming one, repeatedly until nothing changes."""
  for name, t in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
    _check(0.0 <= t <= 1.0, f"{name}: expected a value in [0, 1], got {t}")
  n_feat, fixed = graph.n_selected, graph.n_nodes - graph.n_pos - graph.n_logits
  w = graph.logit_weights()
  influence = node_influence(graph.adjacency, w)
  node_mask = influence >= _threshold(influence, node_threshold)
  node_mask[fixed:] = True
  kept = graph.adjacency * (node_mask[:, None] & node_mask[None, :])
  edge_scores = edge_influence(kept, w)
  edge_mask = edge_scores >= _threshold(edge_scores.ravel(), edge_threshold)
  del kept, edge_scores

  def drop_dangling():
    node_mask[:fixed] &= edge_mask[:, :fixed].any(0)
    node_mask[:n_feat] &= edge_mask[:n_feat].any(1)

  before = node_mask.copy()
  drop_dangling()
  while (node_mask != before).any():  # each removal can leave new dangling nodes
    before[:] = node_mask
    edge_mask[~node_mask] = False
    edge_mask[:, ~node_mask] = False
    drop_dangling()
  return Pruned(node_mask, edge_mask, _cumulative(influence))


def scores(graph: Graph) -> tuple[float, float]:
  """(replacement_score, completeness_score) as circuit-tracer's ``compute_graph_scores``.

  replacement: the tokens' share of the token + error influence; completeness: the
  non-error share of each node's inputs, averaged with weights influence + logit weight.
  """
  errors = slice(graph.n_selected, graph.n_selected + graph.n_layers * graph.n_pos)
  tokens = slice(errors.stop, errors.stop + graph.n_pos)
  w = graph.logit_weights().astype(np.float64)
  b = normalize_matrix(graph.adjacency)
  influence = _influence(b, w)
  token, error = influence[tokens].sum(), influence[errors].sum()
  output = influence + w
  non_error = 1.0 - b[:, errors].sum(1, dtype=np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return float(token / (token + error)), float((non_error * output).sum() / output.sum())


# circuit-tracer's frontend Node model: its keys in its order, with its defaults
_NODE = {"node_id": "", "feature": 0, "layer": "", "ctx_idx": 0, "feature_type": "",
         "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
         "jsNodeId": "", "clerp": "", "influence": None, "activation": None}


def _node(node_id, feature, layer, ctx_idx, feature_type, js_id, **rest) -> dict:
  return {**_NODE, "node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": ctx_idx,
          "feature_type": feature_type, "jsNodeId": js_id, **rest}


def _cantor(x: int, y: int) -> int:
  return (x + y) * (x + y + 1) // 2 + y


def to_json(graph: Graph, *, slug: str = "graph", scan: str | list[str] | None = None,
            token_strings: Callable[[int], str] | Mapping[int, str] | None = None,
            node_threshold: float = 0.8, edge_threshold: float = 0.98, prune: bool = True,
            clerps: Mapping[tuple[int, int], str] | None = None) -> dict:
  """The graph file circuit-tracer's ``create_graph_files`` writes (metadata, qParams,
  nodes, links), of the pruned graph; ``prune=False`` writes every node and nonzero edge.

  token_strings: id -> text (a tokenizer's decode, a vocabulary list or dict); clerps:
  (layer, latent) -> a feature's label; scan: the transcoders' id (default
  ``metadata["scan"]``; a list becomes circuit-tracer's "custom-<hash>" with the list kept).
  Extra keys in ``metadata["dictlearn"]`` (n_layers, edge_threshold, the graph's metadata)
  are ignored by the frontends and read back by ``from_json``.
  """
  decode = (lambda t: f"<{t}>") if token_strings is None else (
      token_strings if callable(token_strings) else token_strings.__getitem__)
  if prune:
    node_mask, edge_mask, cumulative = _prune(graph, node_threshold, edge_threshold)
  else:
    node_mask = np.ones(graph.n_nodes, bool)
    edge_mask, cumulative = graph.adjacency != 0, _cumulative(node_influence(graph))
    node_threshold = edge_threshold = 1.0
  n_feat, n_pos, n_layers = graph.n_selected, graph.n_pos, graph.n_layers
  errors_end = n_feat + n_layers * n_pos
  edge_mask = edge_mask & node_mask[:, None] & node_mask[None, :]
  if prune:  # create_graph_files keeps only linked nodes, and every token and logit
    node_mask = node_mask & (edge_mask.any(0) | edge_mask.any(1))
    node_mask[errors_end:] = True
  feats = graph.feature_nodes
  feature_ids = {f"{l}_{f}_{p}" for l, p, f in feats[node_mask[:n_feat]].tolist()}
  nodes, ids = [], {}
  for i in np.flatnonzero(node_mask).tolist():
    influence = float(cumulative[i])
    if i < n_feat:
      (layer, pos, latent), a = feats[i].tolist(), graph.activation_values[
          graph.selected_features[i]]
      node = _node(f"{layer}_{latent}_{pos}", _cantor(layer, latent), str(layer), pos, FEATURE,
                   f"{layer}_{latent}-0", clerp=(clerps or {}).get((layer, latent), ""),
                   influence=influence, activation=float(a))
    elif i < errors_end:
      layer, pos = divmod(i - n_feat, n_pos)
      node_id = f"0_{layer}_{pos}"
      if node_id in feature_ids:  # circuit-tracer's error id collides with a layer-0 feature's
        node_id = f"err_{layer}_{pos}"
      node = _node(node_id, -1, str(layer), pos, ERROR, f"{layer}_{pos}-0", influence=influence)
    elif i < errors_end + n_pos:
      pos, token = i - errors_end, int(graph.input_tokens[i - errors_end])
      node = _node(f"E_{token}_{pos}", pos, "E", pos, TOKEN, f"E_{token}-{pos}",
                   influence=influence)
    else:
      k = i - errors_end - n_pos
      token, p = int(graph.logit_tokens[k]), float(graph.logit_probabilities[k])
      node = _node(f"{n_layers + 1}_{token}_{n_pos - 1}", token, str(n_layers + 1), n_pos - 1,
                   LOGIT, f"L_{token}-{n_pos - 1}", token_prob=p, is_target_logit=k == 0,
                   clerp=f'Output "{decode(token)}" (p={p:.3f})')
    ids[i] = node["node_id"]
    nodes.append(node)
  # links in circuit-tracer's order (by target, then source); zero weights carry nothing
  targets, sources = np.nonzero(edge_mask & (graph.adjacency != 0))
  links = [{"source": ids[s], "target": ids[t], "weight": float(v)} for t, s, v in zip(
      targets.tolist(), sources.tolist(), graph.adjacency[targets, sources].tolist())]
  scan = graph.metadata.get("scan", "") if scan is None else scan
  transcoders = []
  if isinstance(scan, list):  # circuit-tracer hashes with hash(), which varies per process
    transcoders = [str(s) for s in scan]
    digest = hashlib.sha256("-".join(transcoders).encode()).digest()[:8]
    scan = "custom-" + str(int.from_bytes(digest, "big", signed=True))
  metadata = {
      "slug": slug, "scan": str(scan), "transcoder_list": transcoders,
      "prompt_tokens": [str(decode(int(t))) for t in graph.input_tokens],
      "prompt": graph.input_string, "node_threshold": float(node_threshold),
      "schema_version": 1,
      "dictlearn": {"n_layers": n_layers, "edge_threshold": float(edge_threshold),
                    "pruned": bool(prune),
                    "graph_metadata": json.loads(json.dumps(graph.metadata))}}
  qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
             "sg_pos": ""}
  return {"metadata": metadata, "qParams": qparams, "nodes": nodes, "links": links}


_prune = prune  # to_json's keyword `prune` hides the function
_ID = {FEATURE: r"([0-9]{1,9})_([0-9]{1,12})_([0-9]{1,9})",  # layer, latent, position
       ERROR: r"(?:0|err)_([0-9]{1,9})_([0-9]{1,9})",  # layer, position
       TOKEN: r"E_([0-9]{1,12})_([0-9]{1,9})",  # token id, position
       LOGIT: r"([0-9]{1,9})_([0-9]{1,12})_([0-9]{1,9})"}  # n_layers + 1, token id, position
# a parsed id -> (the node's key, its (layer, feature, ctx_idx) fields as circuit-tracer writes)
_KEY = {FEATURE: lambda x: ((x[0], x[2], x[1]), (str(x[0]), _cantor(x[0], x[1]), x[2])),
        ERROR: lambda x: ((x[0], x[1]), (str(x[0]), -1, x[1])),
        TOKEN: lambda x: (x[1], ("E", x[1], x[1])),
        LOGIT: lambda x: (None, (str(x[0]), x[1], x[2]))}
_F32_MAX = float(np.finfo(np.float32).max)
_TYPES = {"int": int, "num": (int, float), "str": str, "list": list, "dict": dict}


def _get(obj, key: str, kind: str, where: str):
  """obj[key], checked to be of ``kind`` (a key of _TYPES; "num": finite in float32)."""
  _need(isinstance(obj, dict), f"{where}: expected an object, got {type(obj).__name__}")
  _need(key in obj, f"{where}.{key}: missing")
  v = obj[key]
  ok = isinstance(v, _TYPES[kind]) and not isinstance(v, bool)
  if ok and kind == "num":
    ok = abs(v) <= _F32_MAX  # False for NaN and infinities; exact for huge ints
  _need(ok, f"{where}.{key}: expected {kind}, got {v!r:.60}")
  return v


def from_json(data: dict | str | bytes, *, max_nodes: int = MAX_NODES) -> Graph:
  """Rebuilds a Graph from a graph file (``to_json``'s or circuit-tracer's).

  Nodes absent from the file have no edges; active_features are the file's feature nodes,
  all selected. Anything malformed raises GraphFileError naming the field.
  """
  if isinstance(data, (str, bytes)):
    try:
      data = json.loads(data)
    except (ValueError, RecursionError) as e:
      raise GraphFileError(f"graph file: not JSON ({e!s:.200})") from None
  meta = _get(data, "metadata", "dict", "graph")
  prompt_tokens = _get(meta, "prompt_tokens", "list", "metadata")
  prompt, n_pos = _get(meta, "prompt", "str", "metadata"), len(prompt_tokens)
  _need(all(isinstance(t, str) for t in prompt_tokens),
        "metadata.prompt_tokens: expected a list of strings")
  raw_nodes, raw_links = _get(data, "nodes", "list", "graph"), _get(data, "links", "list", "graph")
  _get(data, "qParams", "dict", "graph")
  extra = meta.get("dictlearn", {})
  _need(isinstance(extra, dict) and isinstance(extra.get("graph_metadata", {}), dict),
        "metadata.dictlearn: expected an object")
  # feature (layer, pos, latent) -> activation, error (layer, pos), token pos -> id; logits
  tables, logits, where_of = {FEATURE: {}, ERROR: {}, TOKEN: {}}, [], {}
  for i, node in enumerate(raw_nodes):
    where = f"nodes[{i}]"
    kind, node_id = _get(node, "feature_type", "str", where), _get(node, "node_id", "str", where)
    _need(kind in _ID, f"{where}.feature_type: unknown {kind!r:.40}")
    m = re.fullmatch(_ID[kind], node_id)
    _need(m, f"{where}.node_id: cannot parse {node_id!r:.60} as a {kind} node")
    _need(node_id not in where_of, f"{where}.node_id: {node_id!r} appears twice")
    x = [int(g) for g in m.groups()]
    key, fields = _KEY[kind](x)
    found = (_get(node, "layer", "str", where), _get(node, "feature", "int", where),
             _get(node, "ctx_idx", "int", where))
    _need(found == fields,
          f"{where}: node_id {node_id!r} disagrees with layer, feature, ctx_idx {found!r:.60}")
    _need(found[2] < n_pos, f"{where}.ctx_idx: {found[2]} outside the {n_pos} positions")
    if kind == LOGIT:
      key = len(logits)
      logits.append((x[0] - 1, x[1], x[2], _get(node, "token_prob", "num", where)))
    else:
      _need(key not in tables[kind], f"{where}: a second {kind} node at {key}")
      tables[kind][key] = {FEATURE: lambda: _get(node, "activation", "num", where),
                           ERROR: lambda: True, TOKEN: lambda: x[0]}[kind]()
    where_of[node_id] = (kind, key)
  _need(logits, "nodes: no logit node")
  n_layers = logits[0][0]
  _need(n_layers >= 1 and all(l[0] == n_layers and l[2] == n_pos - 1 for l in logits),
        "nodes: every logit node must be at layer n_layers + 1 >= 2 and the last position")
  _need(extra.get("n_layers", n_layers) == n_layers,
        "metadata.dictlearn.n_layers: disagrees with the logit nodes' layer")
  feats, tokens = tables[FEATURE], tables[TOKEN]
  _need(sorted(tokens) == list(range(n_pos)),
        f"nodes: expected one embedding node at each of the {n_pos} positions")
  _need(all(k[0] < n_layers for t in (feats, tables[ERROR]) for k in t),
        f"nodes: a node's layer is outside [0, n_layers = {n_layers})")
  active = sorted(feats)
  n_feat, n_logits = len(active), len(logits)
  n_nodes = n_feat + (n_layers + 1) * n_pos + n_logits
  _need(n_nodes <= max_nodes, f"nodes: {n_nodes} nodes is over max_nodes = {max_nodes}")
  row = {k: i for i, k in enumerate(active)}
  index = {FEATURE: row.__getitem__, ERROR: lambda k: n_feat + k[0] * n_pos + k[1],
           TOKEN: lambda k: n_feat + n_layers * n_pos + k, LOGIT: lambda k: n_nodes - n_logits + k}
  adjacency, seen = np.zeros((n_nodes, n_nodes), np.float32), set()
  for i, link in enumerate(raw_links):
    where, ends = f"links[{i}]", []
    for end in ("source", "target"):
      name = _get(link, end, "str", where)
      _need(name in where_of, f"{where}.{end}: unknown node {name!r:.60}")
      ends.append(index[where_of[name][0]](where_of[name][1]))
    _need(tuple(ends) not in seen, f"{where}: a second link {link['source']} -> {link['target']}")
    seen.add(tuple(ends))
    adjacency[ends[1], ends[0]] = _get(link, "weight", "num", where)
  try:
    return Graph(
        input_tokens=[tokens[p] for p in range(n_pos)],
        active_features=np.array(active, np.int64).reshape(-1, 3),
        activation_values=np.array([feats[k] for k in active], np.float32),
        selected_features=np.arange(n_feat), adjacency=adjacency, n_layers=n_layers,
        logit_tokens=[l[1] for l in logits], logit_probabilities=[l[3] for l in logits],
        input_string=prompt, metadata=extra.get("graph_metadata", {}))
  except ValueError as e:
    raise GraphFileError(f"graph file: {e}") from None


_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0}
_NPZ = {"input_tokens": ("iu", 1), "active_features": ("iu", 2), "activation_values": ("f", 1),
        "selected_features": ("iu", 1), "logit_tokens": ("iu", 1),
        "logit_probabilities": ("f", 1), "adjacency": ("f", 2), "n_layers": ("iu", 0),
        "input_string": ("U", 0), "metadata": ("U", 0)}


def save(graph: Graph, path) -> None:
  """Writes the whole graph to ``path`` (.npz, compressed; metadata as a JSON string)."""
  arrays = {name: getattr(graph, name) for name in _NPZ if name != "metadata"}
  with open(path, "wb") as f:  # a path without .npz stays as given
    np.savez_compressed(f, **arrays, metadata=np.array(json.dumps(graph.metadata)))


def load(path, *, max_nodes: int = MAX_NODES) -> Graph:
  """Reads ``save``'s .npz, never with pickle; GraphFileError names what is wrong."""
  try:  # headers first, so a file claiming a huge or object array allocates nothing
    with zipfile.ZipFile(path) as z:
      names = {n[:-4] if n.endswith(".npy") else n for n in z.namelist()}
      _need(names == set(_NPZ), f"{path}: missing {sorted(set(_NPZ) - names)}, unexpected "
            f"{sorted(names - set(_NPZ))}")
      for name, (kinds, ndim) in _NPZ.items():
        with z.open(name + ".npy") as f:
          version = np.lib.format.read_magic(f)
          _need(version in _HEADERS, f"{path}: {name}: .npy version {version}")
          shape, _, dtype = _HEADERS[version](f)
        big = math.prod(shape) > max_nodes**2 or (name == "adjacency" and shape[0] > max_nodes)
        _need(not dtype.hasobject and dtype.kind in kinds and len(shape) == ndim and not big,
              f"{path}: {name}: {dtype} {shape} is not a graph's {name}")
    with np.load(path, allow_pickle=False) as npz:
      a = {name: npz[name] for name in _NPZ}
  except GraphFileError:
    raise
  except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error, KeyError) as e:
    raise GraphFileError(f"{path}: not a readable graph file ({e})") from None
  try:
    metadata = json.loads(str(a.pop("metadata")))
  except ValueError as e:
    raise GraphFileError(f"{path}: metadata: not JSON ({e})") from None
  try:
    return Graph(**{k: v for k, v in a.items() if k not in ("n_layers", "input_string")},
                 n_layers=int(a["n_layers"]), input_string=str(a["input_string"]),
                 metadata=metadata)
  except ValueError as e:
    raise GraphFileError(f"{path}: {e}") from None
