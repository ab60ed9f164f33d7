"""dictlearn.graphs: node order, validation, influence, circuit-tracer's pruning and scores,
graph files (JSON in the circuit-tracer / Neuronpedia schema, .npz)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st

from dictlearn import graphs
from dictlearn.graphs import Graph, GraphFileError

# circuit-tracer 0.5's frontend models (frontend/graph_models.py): the keys it writes
CT_TOP = {"metadata", "qParams", "nodes", "links"}
CT_METADATA = {"slug", "scan", "transcoder_list", "prompt_tokens", "prompt", "node_threshold",
               "schema_version"}
CT_QPARAMS = {"pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"}
CT_NODE = ("node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob",
           "is_target_logit", "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp", "influence",
           "activation")  # in the model's order, which model_dump_json keeps
CT_LINK = {"source", "target", "weight"}


def random_graph(seed, n_layers=None, n_pos=None, n_logits=None, density=0.6):
  """A causal random graph: a feature or error at (layer, pos) is written at that layer, so
  features read only from tokens and from earlier layers at positions <= theirs; errors and
  tokens read nothing; logits read every non-logit node."""
  rng = np.random.default_rng(seed)
  n_layers = n_layers or int(rng.integers(1, 4))
  n_pos = n_pos or int(rng.integers(1, 5))
  n_logits = n_logits or int(rng.integers(1, 4))
  cells = [(l, p, f) for l in range(n_layers) for p in range(n_pos) for f in range(6)]
  active = np.array(sorted(c for c in cells if rng.random() < 0.3), np.int64).reshape(-1, 3)
  selected = np.flatnonzero(rng.random(len(active)) < 0.7)
  feats = active[selected]
  n_sel = len(selected)
  # (layer, pos) at which each node is written; tokens at layer -1, logits after everything
  layer = np.concatenate([feats[:, 0], np.repeat(np.arange(n_layers), n_pos),
                          np.full(n_pos, -1), np.full(n_logits, n_layers)])
  pos = np.concatenate([feats[:, 1], np.tile(np.arange(n_pos), n_layers), np.arange(n_pos),
                        np.full(n_logits, n_pos - 1)])
  n = len(layer)
  is_feature_row = np.arange(n) < n_sel
  is_logit = np.arange(n) >= n - n_logits
  allowed = (layer[None, :] < layer[:, None]) & (pos[None, :] <= pos[:, None])
  allowed &= (is_feature_row | is_logit)[:, None] & ~is_logit[None, :]
  adj = (rng.normal(size=(n, n)) * allowed * (rng.random((n, n)) < density)).astype(np.float32)
  probs = np.sort(rng.dirichlet(np.ones(n_logits + 1))[:n_logits])[::-1]
  return Graph(input_tokens=rng.integers(0, 100, n_pos), active_features=active,
               activation_values=rng.normal(size=len(active)).astype(np.float32),
               selected_features=selected, logit_tokens=rng.choice(100, n_logits, replace=False),
               logit_probabilities=probs.astype(np.float32), adjacency=adj, n_layers=n_layers,
               input_string="a prompt", metadata={"model": "tiny", "transcoders": "clt"})


def fields(g):
  return dict(input_tokens=g.input_tokens, active_features=g.active_features,
              activation_values=g.activation_values, selected_features=g.selected_features,
              logit_tokens=g.logit_tokens, logit_probabilities=g.logit_probabilities,
              adjacency=g.adjacency, n_layers=g.n_layers)


def assert_same_graph(a, b, exact_features=True):
  np.testing.assert_array_equal(a.adjacency, b.adjacency)
  for name in ("input_tokens", "logit_tokens", "logit_probabilities", "feature_nodes"):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
  np.testing.assert_array_equal(a.activation_values[a.selected_features],
                                b.activation_values[b.selected_features])
  assert (a.n_layers, a.input_string, a.metadata) == (b.n_layers, b.input_string, b.metadata)
  if exact_features:
    np.testing.assert_array_equal(a.active_features, b.active_features)
    np.testing.assert_array_equal(a.selected_features, b.selected_features)


def test_the_module_needs_only_numpy():
  # loaded alone from its file (the package itself imports jax): no jax, torch or penzai
  path = Path(graphs.__file__)
  code = (f"import importlib.util, sys\n"
          f"spec = importlib.util.spec_from_file_location('graphs', {str(path)!r})\n"
          f"module = sys.modules['graphs'] = importlib.util.module_from_spec(spec)\n"
          f"spec.loader.exec_module(module)\n"
          f"bad = sorted({{m.split('.')[0] for m in sys.modules}} & {{'jax', 'torch', 'penzai'}})\n"
          f"assert not bad, bad\n")
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr[-2000:]


# --- the Graph ---------------------------------------------------------------------------

def test_node_order_and_helpers():
  g = random_graph(1, n_layers=2, n_pos=3, n_logits=2)
  s = g.n_selected
  assert g.n_nodes == s + 2 * 3 + 3 + 2 == g.adjacency.shape[0]
  assert g.error_node(1, 2) == s + 5 and g.token_node(0) == s + 6 and g.logit_node(1) == s + 10
  kinds = g.node_kinds()
  assert list(kinds[s:]) == ["error"] * 6 + ["token"] * 3 + ["logit"] * 2
  assert (kinds[:s] == "feature").all()
  np.testing.assert_array_equal(g.feature_nodes, g.active_features[g.selected_features])
  np.testing.assert_array_equal(g.logit_weights()[-2:], g.logit_probabilities)
  with pytest.raises(IndexError):
    g.error_node(2, 0)


@pytest.mark.parametrize("change, field", [
    (dict(input_tokens=np.zeros((2, 2), np.int64)),
     r"input_tokens: expected int64 of shape \(n_pos,\), got int64 \(2, 2\)"),
    (dict(input_tokens=np.array([0.5, 1.0])), "input_tokens"),
    (dict(active_features=np.array([[1, 0, 0], [0, 0, 0]])), "active_features"),
    (dict(active_features=np.array([[0, 0, 0], [0, 0, 0]])), "active_features"),
    (dict(active_features=np.array([[0, 9, 0], [1, 0, 0]])), "active_features"),
    (dict(active_features=np.array([[0, 0], [1, 0]])),
     r"active_features: expected int64 of shape \(n_active, 3\)"),
    (dict(activation_values=np.zeros(3, np.float32)),
     r"activation_values: expected float32 of shape \(n_active,\)"),
    (dict(selected_features=np.array([1, 0])), "selected_features"),
    (dict(selected_features=np.array([0, 2])), "selected_features"),
    (dict(logit_probabilities=np.array([0.5, 0.2, 0.1], np.float32)), "logit_probabilities"),
    (dict(logit_tokens=np.array([], np.int64), logit_probabilities=np.array([], np.float32)),
     "logit_tokens"),
    (dict(adjacency=np.zeros((5, 5), np.float32)),
     r"adjacency: expected float32 of shape \(n_nodes = 10, n_nodes = 10\), got float32 \(5, 5\)"),
    (dict(adjacency=np.full((10, 10), np.nan, np.float32)), "adjacency"),
    (dict(n_layers=0), "n_layers"),
    (dict(metadata={"x": object()}), "metadata"),
])
def test_validation_names_the_field(change, field):
  # 2 selected features, 2 layers, 2 positions, 2 logits: 2 + 4 + 2 + 2 = 10 nodes
  base = dict(input_tokens=[2, 5], active_features=[[0, 0, 3], [1, 1, 4]],
              activation_values=[1.0, 2.0], selected_features=[0, 1], logit_tokens=[7, 8],
              logit_probabilities=[0.6, 0.3], adjacency=np.zeros((10, 10), np.float32),
              n_layers=2)
  Graph(**base)
  with pytest.raises(ValueError, match=field):
    Graph(**{**base, **change})


# --- influence, pruning, scores -----------------------------------------------------------

def test_node_influence_by_hand():
  # token t -> feature f -> logit l, and t -> l directly: nodes [f, err, t, l]
  a = np.zeros((4, 4), np.float32)
  a[0, 2] = 2.0          # f <- t
  a[3, 0] = 3.0          # l <- f
  a[3, 1] = -1.0         # l <- err
  a[3, 2] = 0.0
  w = np.array([0, 0, 0, 0.7], np.float32)
  b = np.abs(a.astype(np.float64))
  b /= np.maximum(b.sum(1, keepdims=True), 1e-10)
  expected = w @ sum(np.linalg.matrix_power(b, k) for k in range(1, 5))
  # by hand: l's inputs are f 3/4, err 1/4; f's input is t: influence f .525, err .175, t .525
  np.testing.assert_allclose(expected, [0.525, 0.175, 0.525, 0.0])
  np.testing.assert_allclose(graphs.node_influence(a, w), expected, rtol=1e-6)
  edges = graphs.edge_influence(a, w)
  np.testing.assert_allclose(edges[3, 0], 0.75 * 0.7, rtol=1e-6)
  np.testing.assert_allclose(edges[0, 2], 1.0 * 0.525, rtol=1e-6)


def test_influence_with_a_cycle_solves_the_linear_system():
  # 0 and 1 feed each other and nothing else: the series diverges
  with pytest.raises(ValueError, match="adjacency"):
    graphs.node_influence(np.array([[0, 1], [1, 0]], np.float32), np.array([1.0, 0]))
  # 0 reads 1 and 2 (half each), 1 reads 0: the cycle leaks into 2, so the series converges
  a = np.array([[0, 1, 1], [3, 0, 0], [0, 0, 0]], np.float32)
  w = np.array([1.0, 0, 0], np.float32)
  b = np.array([[0, 0.5, 0.5], [1, 0, 0], [0, 0, 0]])
  want = w @ b @ np.linalg.inv(np.eye(3) - b)
  np.testing.assert_allclose(want, w @ sum(np.linalg.matrix_power(b, k) for k in range(1, 200)))
  np.testing.assert_allclose(graphs.node_influence(a, w), want, rtol=1e-6)


def ct_prune(adj, probs, n_feat, n_pos, t_node, t_edge):
  """circuit-tracer 0.5's prune_graph re-derived in float64 from its published steps."""
  n, n_logits = len(adj), len(probs)
  w = np.zeros(n)
  w[n - n_logits:] = probs

  def normalise(m):
    m = np.abs(m.astype(np.float64))
    return m / np.clip(m.sum(1, keepdims=True), 1e-10, None)

  def influence(b):
    return w @ b @ np.linalg.inv(np.eye(n) - b)

  def find_threshold(scores, t):
    s = np.sort(scores)[::-1]
    with np.errstate(invalid="ignore"):  # all zero: NaNs, and the clip picks the last score
      c = np.cumsum(s) / s.sum()
    return s[min(np.searchsorted(c, t), len(s) - 1)]

  node_inf = influence(normalise(adj))
  node_mask = node_inf >= find_threshold(node_inf, t_node)
  node_mask[n - n_logits - n_pos:] = True
  pruned = adj * np.outer(node_mask, node_mask)
  b = normalise(pruned)
  edge_scores = b * (influence(b) + w)[:, None]
  edge_mask = edge_scores >= find_threshold(edge_scores.ravel(), t_edge)
  fixed = n - n_logits - n_pos
  old = node_mask.copy()
  node_mask[:fixed] &= edge_mask[:, :fixed].any(0)
  node_mask[:n_feat] &= edge_mask[:n_feat].any(1)
  while (node_mask != old).any():
    old = node_mask.copy()
    edge_mask[~node_mask] = False
    edge_mask[:, ~node_mask] = False
    node_mask[:fixed] &= edge_mask[:, :fixed].any(0)
    node_mask[:n_feat] &= edge_mask[:n_feat].any(1)
  order = np.argsort(-node_inf, kind="stable")
  cumulative = np.empty(n)
  cumulative[order] = np.cumsum(node_inf[order]) / node_inf.sum()
  return node_mask, edge_mask, cumulative


def ct_scores(g):
  """circuit-tracer 0.5's compute_graph_scores, re-derived in float64."""
  n = g.n_nodes
  w = np.zeros(n)
  w[n - g.n_logits:] = g.logit_probabilities
  a = np.abs(g.adjacency.astype(np.float64))
  b = a / np.clip(a.sum(1, keepdims=True), 1e-10, None)
  inf = w @ b @ np.linalg.inv(np.eye(n) - b)
  e0, e1 = g.n_selected, g.n_selected + g.n_layers * g.n_pos
  token, error = inf[e1:e1 + g.n_pos].sum(), inf[e0:e1].sum()
  out = inf + w
  with np.errstate(invalid="ignore"):  # no token or error influence: NaN, as circuit-tracer
    return token / (token + error), ((1 - b[:, e0:e1].sum(1)) * out).sum() / out.sum()


thresholds = st.floats(0.05, 0.99)


@given(seed=st.integers(0, 2**31), t_node=thresholds, t_edge=thresholds)
def test_prune_matches_circuit_tracer(seed, t_node, t_edge):
  g = random_graph(seed)
  if graphs.node_influence(g).sum() == 0:
    return  # no path into the logits: circuit-tracer divides 0 by 0
  p = graphs.prune(g, t_node, t_edge)
  node_mask, edge_mask, cumulative = ct_prune(g.adjacency, g.logit_probabilities, g.n_selected,
                                              g.n_pos, t_node, t_edge)
  np.testing.assert_array_equal(p.node_mask, node_mask)
  np.testing.assert_array_equal(p.edge_mask, edge_mask)
  np.testing.assert_allclose(p.cumulative_scores, cumulative, rtol=1e-5, atol=1e-7)


@given(seed=st.integers(0, 2**31))
def test_scores_match_circuit_tracer(seed):
  g = random_graph(seed)
  if graphs.node_influence(g).sum() == 0:
    return
  np.testing.assert_allclose(graphs.scores(g), ct_scores(g), rtol=1e-5)


def test_scores_of_a_graph_without_errors_are_one():
  g = random_graph(3, n_layers=2, n_pos=3)
  adj = g.adjacency.copy()
  adj[:, g.n_selected:g.n_selected + g.n_layers * g.n_pos] = 0
  replacement, completeness = graphs.scores(Graph(**{**fields(g), "adjacency": adj}))
  assert replacement == pytest.approx(1.0) and completeness == pytest.approx(1.0)


@given(seed=st.integers(0, 2**31), t=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=2))
def test_prune_keeps_every_token_and_logit_and_is_monotone_in_edge_threshold(seed, t):
  g = random_graph(seed)
  node_t = float(np.random.default_rng(seed).choice([0.5, 0.8, 1.0]))
  low, high = (graphs.prune(g, node_t, e) for e in sorted(t))
  for p in (low, high):
    assert p.node_mask[g.token_node(0):].all()
  assert not (low.node_mask & ~high.node_mask).any()
  assert not (low.edge_mask & ~high.edge_mask).any()


@given(seed=st.integers(0, 2**31), t=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=2))
def test_node_selection_is_monotone_in_node_threshold(seed, t):
  # With every edge kept the node mask is the node-threshold selection, a superset as the
  # threshold grows. With edge pruning it need not be: circuit-tracer renormalises the rows
  # over the kept nodes, so keeping more nodes can push a kept node's edges below the cut.
  g = random_graph(seed)
  low, high = (graphs.prune(g, n, 1.0) for n in sorted(t))
  assert not (low.node_mask & ~high.node_mask).any()
  assert not (low.edge_mask & ~high.edge_mask).any()


def test_threshold_one_keeps_everything_and_bad_thresholds_are_refused():
  g = random_graph(4, n_layers=2, n_pos=3)
  p = graphs.prune(g, 1.0, 1.0)
  assert p.node_mask.all() and p.edge_mask[g.adjacency != 0].all()
  with pytest.raises(ValueError, match="edge_threshold"):
    graphs.prune(g, 0.8, 1.5)


# --- graph files ---------------------------------------------------------------------------

def small_graph():
  # 2 layers, 3 positions; features (0, 1, 1) (collides with error (1, 1)'s circuit-tracer
  # id "0_1_1"), (1, 2, 4) and an unselected (1, 2, 5)
  n_sel, n_pos, n_layers, n_logits = 2, 3, 2, 2
  n = n_sel + n_layers * n_pos + n_pos + n_logits
  adj = np.zeros((n, n), np.float32)
  tok = lambda p: n_sel + n_layers * n_pos + p
  err = lambda l, p: n_sel + l * n_pos + p
  adj[0, tok(1)] = 1.5
  adj[1, 0], adj[1, err(0, 2)], adj[1, tok(2)] = 0.5, -0.25, 2.0
  adj[n - 2, 1], adj[n - 2, err(1, 1)], adj[n - 2, tok(2)] = 3.0, 0.125, -1.0
  adj[n - 1, 0], adj[n - 1, tok(0)] = -0.5, 0.75
  return Graph(input_tokens=[2, 10, 11], active_features=[[0, 1, 1], [1, 2, 4], [1, 2, 5]],
               activation_values=[1.25, 2.5, 9.0], selected_features=[0, 1],
               logit_tokens=[12, 13], logit_probabilities=[0.6, 0.25], adjacency=adj,
               n_layers=n_layers, input_string="hi there", metadata={"model": "gemma-3-270m"})


VOCAB = [f"tok{i}" for i in range(20)]


def test_json_has_circuit_tracers_keys_and_formats():
  g = small_graph()
  data = graphs.to_json(g, slug="s", scan="gemma-scope-2-270m-clt", token_strings=VOCAB,
                        prune=False, clerps={(1, 4): "a label"})
  json.dumps(data, allow_nan=False)
  assert set(data) == CT_TOP and set(data["qParams"]) == CT_QPARAMS
  assert set(data["metadata"]) == CT_METADATA | {"dictlearn"}
  assert all(tuple(n) == CT_NODE for n in data["nodes"])
  assert all(set(link) == CT_LINK for link in data["links"])
  meta = data["metadata"]
  assert meta["prompt_tokens"] == ["tok2", "tok10", "tok11"] and meta["prompt"] == "hi there"
  assert (meta["slug"], meta["scan"], meta["schema_version"]) == ("s", "gemma-scope-2-270m-clt", 1)
  by_id = {n["node_id"]: n for n in data["nodes"]}
  f = by_id["1_4_2"]
  assert (f["feature"], f["layer"], f["ctx_idx"], f["feature_type"], f["jsNodeId"]) == (
      (1 + 4) * (1 + 4 + 1) // 2 + 4, "1", 2, "cross layer transcoder", "1_4-0")
  assert (f["activation"], f["clerp"]) == (2.5, "a label")
  e = by_id["0_0_2"]
  assert (e["feature"], e["layer"], e["ctx_idx"], e["feature_type"], e["jsNodeId"]) == (
      -1, "0", 2, "mlp reconstruction error", "0_2-0")
  assert "err_1_1" in by_id and by_id["0_1_1"]["feature_type"] == "cross layer transcoder"
  t = by_id["E_10_1"]
  assert (t["feature"], t["layer"], t["ctx_idx"], t["feature_type"], t["jsNodeId"]) == (
      1, "E", 1, "embedding", "E_10-1")
  lg = by_id["3_12_2"]
  assert (lg["feature"], lg["layer"], lg["ctx_idx"], lg["feature_type"], lg["jsNodeId"]) == (
      12, "3", 2, "logit", "L_12-2")
  assert lg["clerp"] == 'Output "tok12" (p=0.600)' and lg["is_target_logit"]
  assert lg["token_prob"] == pytest.approx(0.6) and not by_id["3_13_2"]["is_target_logit"]
  assert {(l["source"], l["target"]): l["weight"] for l in data["links"]}[
      ("1_4_2", "3_12_2")] == 3.0
  assert len(data["links"]) == np.count_nonzero(g.adjacency)
  custom = graphs.to_json(g, scan=["tc0", "tc1"])["metadata"]
  assert custom["scan"].startswith("custom-") and custom["transcoder_list"] == ["tc0", "tc1"]


def test_json_writes_only_the_pruned_graph():
  g = random_graph(11, n_layers=3, n_pos=4, n_logits=2)
  p = graphs.prune(g, 0.6, 0.9)
  data = graphs.to_json(g, node_threshold=0.6, edge_threshold=0.9)
  assert data["metadata"]["node_threshold"] == 0.6
  kept = p.edge_mask & np.outer(p.node_mask, p.node_mask)
  assert len(data["links"]) == np.count_nonzero(kept & (g.adjacency != 0))
  assert len(data["nodes"]) <= p.node_mask.sum()
  back = graphs.from_json(json.dumps(data))
  assert back.n_selected == sum(n["feature_type"] == "cross layer transcoder"
                                for n in data["nodes"])
  np.testing.assert_array_equal(back.input_tokens, g.input_tokens)
  np.testing.assert_array_equal(back.logit_tokens, g.logit_tokens)
  assert np.count_nonzero(back.adjacency) == len(data["links"])


@given(seed=st.integers(0, 2**31), prune=st.booleans())
def test_json_round_trip(seed, prune):
  g = random_graph(seed)
  data = graphs.to_json(g, prune=prune, node_threshold=1.0, edge_threshold=1.0)
  back = graphs.from_json(json.dumps(data, allow_nan=False))
  assert_same_graph(g, back, exact_features=False)
  np.testing.assert_array_equal(back.selected_features, np.arange(g.n_selected))


def test_json_round_trip_with_colliding_ids_and_without_our_extras():
  g = small_graph()
  data = graphs.to_json(g, prune=False)
  assert_same_graph(g, graphs.from_json(data), exact_features=False)
  del data["metadata"]["dictlearn"]  # as circuit-tracer writes it
  back = graphs.from_json(data)
  assert back.metadata == {}
  assert_same_graph(Graph(**fields(g), input_string=g.input_string), back, exact_features=False)


def test_save_load_round_trip(tmp_path):
  g = random_graph(7)
  graphs.save(g, tmp_path / "g.graph")
  assert_same_graph(g, graphs.load(tmp_path / "g.graph"))
  for seed in range(3):
    g = random_graph(seed)
    graphs.save(g, tmp_path / f"{seed}.npz")
    assert_same_graph(g, graphs.load(tmp_path / f"{seed}.npz"))


def _edit_node(data, which, **changes):
  for n in data["nodes"]:
    if n["node_id"] == which:
      n.update(changes)
      return data
  raise KeyError(node_id)


def _huge_logits(data):
  del data["metadata"]["dictlearn"]
  for n in data["nodes"]:
    if n["feature_type"] == "logit":
      n["layer"] = "999999999"
      n["node_id"] = f"999999999_{n['feature']}_{n['ctx_idx']}"
  return data


def _pop(d, key):
  d.pop(key)
  return d


HOSTILE = [
    (lambda d: _pop(d, "nodes"), r"graph\.nodes: missing"),
    (lambda d: _pop(d, "qParams"), "qParams"),
    (lambda d: {**d, "links": {}}, r"graph\.links"),
    (lambda d: {**d, "metadata": {**d["metadata"], "prompt_tokens": "abc"}},
     r"metadata\.prompt_tokens"),
    (lambda d: {**d, "metadata": {**d["metadata"], "prompt_tokens": [1, 2, 3]}},
     r"metadata\.prompt_tokens"),
    (lambda d: _edit_node(d, "1_4_2", node_id="1_four_2"), r"nodes\[\d+\]\.node_id"),
    (lambda d: _edit_node(d, "1_4_2", feature_type="transcoder"), r"nodes\[\d+\]\.feature_type"),
    (lambda d: _edit_node(d, "1_4_2", ctx_idx="2"), r"nodes\[\d+\]\.ctx_idx"),
    (lambda d: _edit_node(d, "1_4_2", feature=3), r"nodes\[\d+\]: node_id"),
    (lambda d: _edit_node(d, "1_4_2", activation=None), r"nodes\[\d+\]\.activation"),
    (lambda d: _edit_node(d, "1_4_2", node_id="0_1_1", layer="0", feature=2),
     r"nodes\[\d+\]\.node_id: '0_1_1' appears twice"),
    (lambda d: _edit_node(d, "1_4_2", node_id="7_4_2", layer="7", feature=(11 * 12) // 2 + 4),
     r"nodes: .*layer"),
    (lambda d: _edit_node(d, "0_0_2", node_id="0_0_9", ctx_idx=9), r"nodes\[\d+\]\.ctx_idx"),
    (lambda d: {**d, "nodes": [n for n in d["nodes"] if n["node_id"] != "E_10_1"]}, "embedding"),
    (lambda d: {**d, "nodes": [n for n in d["nodes"] if n["feature_type"] != "logit"]}, "logit"),
    (_huge_logits, "max_nodes"),
    (lambda d: {**d, "links": d["links"] + [{**d["links"][0], "target": "5_5_5"}]},
     r"links\[\d+\]\.target: unknown"),
    (lambda d: {**d, "links": d["links"] + [dict(d["links"][0])]}, r"links\[\d+\]: a second"),
    (lambda d: {**d, "links": [{**d["links"][0], "weight": float("nan")}]},
     r"links\[0\]\.weight"),
    (lambda d: {**d, "links": [{**d["links"][0], "weight": "1.0"}]}, r"links\[0\]\.weight"),
    (lambda d: {**d, "links": [{**d["links"][0], "weight": True}]}, r"links\[0\]\.weight"),
    (lambda d: {**d, "links": [{**d["links"][0], "weight": 10**400}]}, r"links\[0\]\.weight"),
    (lambda d: {**d, "links": [{**d["links"][0], "weight": 1e39}]}, r"links\[0\]\.weight"),
    (lambda d: {**d, "links": [["a", "b", 1.0]]}, r"links\[0\]"),
    (lambda d: {**d, "metadata": {**d["metadata"], "dictlearn": {"n_layers": 5}}},
     r"metadata\.dictlearn\.n_layers"),
    (lambda d: [d], "graph"),
]


@pytest.mark.parametrize("spoil, message", HOSTILE)
def test_hostile_json_is_refused(spoil, message):
  data = spoil(json.loads(json.dumps(graphs.to_json(small_graph(), prune=False))))
  with pytest.raises(GraphFileError, match=message):
    graphs.from_json(json.dumps(data))  # NaN travels as the NaN literal json accepts


def test_not_json_is_refused():
  for text in ("{nodes: ", "[" * 100_000 + "]" * 100_000):
    with pytest.raises(GraphFileError, match="not JSON"):
      graphs.from_json(text)


def _npz(path, **arrays):
  with open(path, "wb") as f:
    np.savez(f, **arrays)
  return path


def test_hostile_npz_is_refused(tmp_path):
  g = small_graph()
  graphs.save(g, tmp_path / "good.npz")
  with np.load(tmp_path / "good.npz") as z:
    good = dict(z)
  cases = {
      "pickled": ({**good, "metadata": np.array([{"a": 1}], dtype=object)}, "metadata"),
      "missing": ({k: v for k, v in good.items() if k != "adjacency"}, "adjacency"),
      "extra": ({**good, "payload": np.zeros(3)}, "payload"),
      "wrong kind": ({**good, "input_tokens": np.array([1.5, 2.0, 3.0])}, "input_tokens"),
      "wrong side": ({**good, "adjacency": np.zeros((4, 4), np.float32)}, "adjacency"),
      "nan": ({**good, "adjacency": good["adjacency"] * np.nan}, "adjacency"),
      "bad json": ({**good, "metadata": np.array("{")}, "metadata|JSON|Expecting"),
  }
  for name, (arrays, message) in cases.items():
    with pytest.raises(GraphFileError, match=message):
      graphs.load(_npz(tmp_path / f"{name}.npz", **arrays))
  raw = (tmp_path / "good.npz").read_bytes()
  (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
  (tmp_path / "text.npz").write_text("not a zip")
  for name in ("cut.npz", "text.npz"):
    with pytest.raises(GraphFileError):
      graphs.load(tmp_path / name)
  # a header that claims a 10^6 x 10^6 adjacency allocates nothing
  import zipfile
  with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z:
    for k, v in good.items():
      with z.open(k + ".npy", "w") as f:
        if k == "adjacency":
          np.lib.format.write_array_header_1_0(
              f, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)})
        else:
          np.lib.format.write_array(f, v)
  with pytest.raises(GraphFileError, match="adjacency"):
    graphs.load(tmp_path / "huge.npz")
