"""dictlearn.dashboards (no penzai): the streamed top-k, sample, density and histogram
against a dense numpy search over the same corpus for any batching, the sliced encoder,
the logit lens, the feature files (circuit-tracer's schema and layout, graph nodes
resolving to them) and the pages in headless Chromium with hostile token strings."""

import json
import re
import subprocess
import sys
from urllib.parse import quote

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from chromium import dump_dom, html_tag
from hypothesis import given, settings
from hypothesis import strategies as st

import dictlearn as dl
from dictlearn import dashboards as D
from dictlearn import graphs

ROWS, SEQ, N, BATCH, K, WIN = 11, 10, 6, 4, 5, (3, 2)
LATENTS = np.array([0, 3, 4, 9, 17, 20])
EVIL = ["<script>alert(1)</script>", '"', "&", "</script>", "<img src=x onerror=alert(2)>"]
VOCAB = EVIL + [f"tok{i}" for i in range(40)]


def corpus(seed=0):
  """Activations with ties (one decimal), right-padded rows, BOS masked."""
  rng = np.random.default_rng(seed)
  acts = np.where(rng.random((ROWS, SEQ, N)) < 0.35,
                  rng.integers(1, 12, (ROWS, SEQ, N)) / 10, 0).astype(np.float32)
  acts[:, 0] = 50.0  # BOS: an outlier that must never count
  tokens = rng.integers(0, len(VOCAB), (ROWS, SEQ)).astype(np.int32)
  lengths = rng.integers(2, SEQ + 1, ROWS)
  valid = np.arange(SEQ)[None] < lengths[:, None]
  mask = valid & (np.arange(SEQ)[None] > 0)
  return acts, tokens, mask, valid


ACTS, TOKENS, MASK, VALID = corpus()


def stream(cuts, **kw):
  """Feeds the corpus in batches cut at ``cuts`` (at most BATCH rows each), every batch
  filled up to BATCH rows with padding rows: one compiled shape for every split."""
  c = D.DashboardCollector(LATENTS, k=K, window=WIN, n_quantiles=3, examples_per_quantile=2,
                           **kw)
  bounds = [0, *cuts, ROWS]
  for a, b in zip(bounds[:-1], bounds[1:]):
    pad = BATCH - (b - a)
    def fill(x, v):
      return np.concatenate([x[a:b], np.full((pad,) + x.shape[1:], v, x.dtype)])
    c.add(fill(ACTS, 0), fill(TOKENS, 0), fill(MASK, False), valid=fill(VALID, False),
          seq_ids=np.r_[np.arange(a, b), np.full(pad, -1)])
  return c.results()


def dense_top(j):
  """Latent j's top K by (value descending, sequence, position), windows from the dense
  arrays: the reference for the streamed merge."""
  hits = sorted((-ACTS[s, p, j], s, p) for s in range(ROWS) for p in range(SEQ)
                if MASK[s, p] and ACTS[s, p, j] > 0)[:K]
  out = []
  for _, s, p in hits:
    at = [q for q in range(p - WIN[0], p + WIN[1] + 1) if 0 <= q < SEQ and VALID[s, q]]
    out.append((float(ACTS[s, p, j]), s, p, TOKENS[s, at].tolist(),
                [float(ACTS[s, q, j]) if MASK[s, q] else 0.0 for q in at], at.index(p)))
  return out


@pytest.fixture(scope="module")
def whole():
  return stream([4, 8])


def splits():
  """Cut points of batches of 1 to BATCH rows."""
  return st.lists(st.integers(1, BATCH), min_size=ROWS, max_size=ROWS).map(
      lambda sizes: [c for c in np.cumsum(sizes).tolist() if c < ROWS])


@settings(max_examples=20)
@given(cuts=splits())
def test_streamed_results_equal_a_dense_search_for_any_batching(whole, cuts):
  r = stream(cuts)
  fired = MASK[..., None] & (ACTS > 0)
  assert r.tokens == MASK.sum()
  for j, f in enumerate(r.features):
    assert f.latent == LATENTS[j]
    got = [(e.value, e.seq, e.pos, e.tokens, e.acts, e.index) for e in f.top]
    assert got == dense_top(j)
    assert f.fired == fired[..., j].sum() and f.density == fired[..., j].sum() / MASK.sum()
    assert f.act_max == ACTS[..., j][MASK].max() and f.act_min == ACTS[..., j][MASK].min()
    values = ACTS[..., j][fired[..., j]]
    expect = np.histogram(np.clip(values, D.HIST_EDGES[0], D.HIST_EDGES[-1]), D.HIST_EDGES)[0]
    np.testing.assert_array_equal(f.histogram, expect)
    # the sample does not depend on the batching either
    assert f.quantiles == whole.features[j].quantiles
    assert f.quantile_values == whole.features[j].quantile_values


def test_quantile_examples_are_fired_tokens_in_their_bins(whole):
  for j, f in enumerate(whole.features):
    assert len(f.quantile_values) == 4 and f.quantile_values == sorted(f.quantile_values)
    assert f.quantile_values[0] >= ACTS[..., j][MASK & (ACTS[..., j] > 0)].min()
    assert [q.lo for q in f.quantiles] == sorted((q.lo for q in f.quantiles), reverse=True)
    for q in f.quantiles:
      assert 1 <= len(q.examples) <= 2
      for e in q.examples:
        assert q.lo <= e.value <= q.hi and e.value == ACTS[e.seq, e.pos, j] > 0
        assert MASK[e.seq, e.pos] and e.tokens[e.index] == TOKENS[e.seq, e.pos]


def test_sliced_encoder_equals_the_full_encode_columns():
  d = dl.random_dictionary(jax.random.key(0), 16, 64, threshold=0.2)
  d = d.replace(b_enc=jnp.linspace(-0.3, 0.3, 64))
  x = jax.random.normal(jax.random.key(1), (BATCH, SEQ, 16))
  full = np.asarray(dl.encode(d, x))[..., LATENTS]
  part = np.asarray(dl.encode(D.select_latents(d, LATENTS), x))
  np.testing.assert_allclose(part, full, rtol=1e-6, atol=1e-6)
  assert ((part > 0) == (full > 0)).all() and (full > 0).mean() > 0.1
  mask = np.ones((BATCH, SEQ), bool)
  kw = dict(k=K, window=WIN, n_quantiles=3, examples_per_quantile=2)  # stream()'s compile
  a = D.DashboardCollector(LATENTS, dictionary=d, **kw)
  a.add_inputs(x, TOKENS[:BATCH], mask)
  b = D.DashboardCollector(LATENTS, **kw)
  b.add(full, TOKENS[:BATCH], mask)
  ra, rb = a.results(), b.results()
  for fa, fb in zip(ra.features, rb.features):
    assert [(e.seq, e.pos) for e in fa.top] == [(e.seq, e.pos) for e in fb.top]
    np.testing.assert_allclose([e.value for e in fa.top], [e.value for e in fb.top], rtol=1e-6)
    assert fa.fired == fb.fired
  np.testing.assert_array_equal(ra.decoder, np.asarray(d.w_dec)[LATENTS])
  with pytest.raises(ValueError, match="64-wide"):
    D.DashboardCollector([3, 64], dictionary=d)
  with pytest.raises(ValueError, match=r"\(batch, seq, 6\)"):
    b.add(full[..., :2], TOKENS[:BATCH], mask)


def test_parse_latents():
  assert D.parse_latents("0:4", 10).tolist() == [0, 1, 2, 3]
  assert D.parse_latents("5", 10).tolist() == [5]
  assert D.parse_latents("9,1,7, 1", 10).tolist() == [1, 7, 9]
  assert D.parse_latents("8:,0:2", 10).tolist() == [0, 1, 8, 9]
  assert D.parse_latents("all", 3).tolist() == [0, 1, 2]
  for bad in ("0:200", "10", "-1", "x", "3:1", ""):
    with pytest.raises(ValueError, match=r"write indices in \[0, 10\)"):
      D.parse_latents(bad, 10)


def test_logit_lens_matches_numpy():
  rng = np.random.default_rng(1)
  rows, w_u = rng.normal(size=(70, 8)), rng.normal(size=(8, 30))
  logits = rows @ w_u
  for u in (w_u, lambda r: jnp.asarray(r) @ jnp.asarray(w_u, jnp.float32)):
    ti, tv, bi, bv = D.logit_lens(rows, u, 4)
    np.testing.assert_array_equal(ti, np.argsort(-logits, 1)[:, :4])
    np.testing.assert_array_equal(bi, np.argsort(logits, 1)[:, :4])
    np.testing.assert_allclose(tv, np.take_along_axis(logits, ti, 1), rtol=1e-5)
    np.testing.assert_allclose(bv, np.take_along_axis(logits, bi, 1), rtol=1e-5)


def small_graph():
  """One layer, two positions, features (layer 0, latent 3) and (0, 17), one logit."""
  n = 2 + 2 + 2 + 1
  adj = np.zeros((n, n), np.float32)
  adj[0, 4], adj[1, 5], adj[6, 0], adj[6, 1] = 1.0, 0.5, 2.0, 1.0
  return graphs.Graph(input_tokens=[2, 7], active_features=[[0, 1, 3], [0, 1, 17]],
                      activation_values=[1.0, 2.0], selected_features=[0, 1],
                      logit_tokens=[9], logit_probabilities=[0.9], adjacency=adj, n_layers=1,
                      input_string="x", metadata={})


@pytest.fixture(scope="module")
def written(whole, tmp_path_factory):
  out = tmp_path_factory.mktemp("dash")
  w_u = np.random.default_rng(2).normal(size=(8, len(VOCAB))).astype(np.float32)
  dash = D.Dashboards(whole.features, whole.tokens, whole.hist_edges,
                      {"name": "<b>sae</b>", "kind": "sae", "layer": 0,
                       "site_in": "resid_post.0", "site_out": "resid_post.0"},
                      np.random.default_rng(3).normal(size=(N, 8)).astype(np.float32))
  paths = D.write(dash, out, VOCAB.__getitem__, unembedding=w_u, scan="my-scan", lens_k=3)
  return out, dash, paths, D.logit_lens(dash.decoder, w_u, 3)


def test_feature_files_have_circuit_tracers_fields_and_graph_nodes_find_them(written):
  out, dash, paths, lens = written
  assert paths[-1] == out / "index.html" and len(paths) == 2 * N + 1
  for j, latent in enumerate(LATENTS.tolist()):
    path = out / "features" / "my-scan" / f"{D.feature_index(0, latent)}.json"
    doc = json.loads(path.read_text())
    assert isinstance(doc["transcoder_id"], str) and doc["index"] == latent
    assert doc["top_logits"] == [VOCAB[i] for i in lens[0][j]]
    assert doc["bottom_logits"] == [VOCAB[i] for i in lens[2][j]]
    for key in ("act_min", "act_max", "activation_frequency"):
      assert isinstance(doc[key], float)
    for key in ("quantile_values", "histogram"):
      assert all(isinstance(v, float) for v in doc[key])
    assert sum(doc["histogram"]) == dash.features[j].fired
    qs = doc["examples_quantiles"]
    assert qs[0]["quantile_name"] == "Top activations" and len(qs) == 1 + len(
        dash.features[j].quantiles)
    for q in qs:
      assert isinstance(q["quantile_name"], str) and q["examples"]
      for e in q["examples"]:
        assert set(e) == {"tokens", "tokens_acts_list", "train_token_ind",
                          "is_repeated_datapoint"}
        assert all(isinstance(t, str) for t in e["tokens"]) and len(e["tokens"]) == len(
            e["tokens_acts_list"])
        assert all(isinstance(a, float) for a in e["tokens_acts_list"])
        assert isinstance(e["train_token_ind"], int) and isinstance(
            e["is_repeated_datapoint"], bool)
    examples = [dash.features[j].top] + [q.examples for q in dash.features[j].quantiles]
    assert [[e["tokens_acts_list"][e["train_token_ind"]] for e in q["examples"]] for q in qs] == [
        [e.value for e in es] for es in examples]
    top = {(e.seq, e.pos) for e in dash.features[j].top}
    assert [[e["is_repeated_datapoint"] for e in q["examples"]] for q in qs[1:]] == [
        [(e.seq, e.pos) in top for e in q.examples] for q in dash.features[j].quantiles]
  data = graphs.to_json(small_graph(), scan="my-scan", prune=False)
  feats = [n for n in data["nodes"] if n["feature_type"] == graphs.FEATURE]
  assert [D.feature_file(n, "my-scan") for n in feats] == [
      f"features/my-scan/{D.feature_index(0, 3)}.json",
      f"features/my-scan/{D.feature_index(0, 17)}.json"]
  assert D.link_graph(data, out, relative_to=out) == 2
  assert (out / feats[0]["dashboard_url"]).with_suffix(".json").exists()
  assert D.feature_file({"feature": 5}) == "features/5.json"
  with pytest.raises(ValueError, match="relative name"):
    D.feature_file({"feature": 5}, "../x")


def test_pages_render_offline_and_token_strings_stay_text(written, tmp_path):
  out, dash, paths, lens = written
  for p in paths[1::2] + [paths[-1]]:
    text = p.read_text()
    assert "<script>alert" not in text and "<img" not in text and "<b>sae" not in text
    markup = re.sub(r"<script.*?</script>", "", text, flags=re.S)
    assert not re.search(r'(src|href)="?(https?:|//)', markup), "the page fetches something"
  j = int(np.argmax([len(f.top) for f in dash.features]))
  page = out / "features" / "my-scan" / f"{D.feature_index(0, int(LATENTS[j]))}.html"
  dom = dump_dom(page.as_uri(), tmp_path / "p1")
  assert "data-js-errors" not in html_tag(dom), html_tag(dom)
  assert "<img" not in dom and "<b>sae" not in dom and "alert(1)</script>" not in dom
  assert dom.count('class="ctx"') == len(dash.features[j].top) + sum(
      len(q.examples) for q in dash.features[j].quantiles)
  assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom and '<svg id="histogram"' in dom
  # the index filtered by token text (a hostile one) and by latent index
  query = "<script>"
  shown = [list(dict.fromkeys(VOCAB[e.tokens[e.index]] for e in f.top))[:8]
           + [VOCAB[t] for t in lens[0][i]] for i, f in enumerate(dash.features)]
  expect = sum(any(query in t for t in ts) for ts in shown)
  assert 0 < expect < N
  for i, (q, n) in enumerate(((query, expect), ("17", 1))):
    dom = dump_dom(f"{paths[-1].as_uri()}?q={quote(q)}", tmp_path / f"p{i}")
    assert "data-js-errors" not in html_tag(dom), html_tag(dom)
    assert f'<span id="shown">{n}</span>' in dom
    assert len(re.findall(r'<tr data-latent="\d+">', dom)) == n  # the rest carry hidden=""
  assert "<script>alert" not in dom


def test_the_module_imports_no_framework():
  code = ("import sys, dictlearn.dashboards; "
          "assert not {'penzai', 'treescope', 'flax'} & {m.split('.')[0] for m in sys.modules}")
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
