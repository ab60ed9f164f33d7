"""dictlearn.attribution through a toy transformer in plain JAX (no framework).

The toy honours ``LinearizableModel.forward``'s contract (patterns and norm scales without
gradient, recorded or replayed), so these tests are what a second adapter needs. The
edges are checked against ``intervene``, which runs the frozen replacement model forward
with the clean run's patterns and scales replayed (no gradients, no stop_gradient): an
independent path to the same direct effects.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dictlearn
from dictlearn import attribution, crosslayer, graphs

D, VOCAB, LAYERS, WIDTH = 16, 40, 3, 24
TOKENS = np.array([1, 7, 3, 12, 5, 9, 2])


def _frozen(key, compute, frozen, record):
  if frozen is not None:
    return frozen[key]
  value = jax.lax.stop_gradient(compute())
  if record is not None:
    record[key] = value
  return value


def _norm(x, w, key, frozen, record):
  scale = _frozen(key, lambda: jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6),
                  frozen, record)
  return x * scale * w


def toy_forward(params, x0, mlp, frozen=None, record=None):
  """Pre-norm blocks: causal softmax attention (one head), a GELU MLP with post-norm."""
  x = x0
  n = x.shape[0]
  causal = jnp.tril(jnp.ones((n, n), bool))
  for i, b in enumerate(params["blocks"]):
    h = _norm(x, b["n1"], f"n1.{i}", frozen, record)
    scores = jnp.where(causal, (h @ b["q"]) @ (h @ b["k"]).T / np.sqrt(D), -1e9)
    pattern = _frozen(f"attn.{i}", lambda: jax.nn.softmax(scores, -1), frozen, record)
    x = x + _norm(pattern @ (h @ b["v"]) @ b["o"], b["n2"], f"n2.{i}", frozen, record)
    h = _norm(x, b["n3"], f"n3.{i}", frozen, record)

    def real(v, b=b, i=i):
      return _norm(jax.nn.gelu(v @ b["w1"]) @ b["w2"], b["n4"], f"n4.{i}", frozen, record)

    x = x + mlp(i, h, real)
  return _norm(x, params["final"], "final", frozen, record)


def toy_linear_blocks(params, frozen, n_pos, d):
  """``toy_forward``'s blocks as ``LinearBlocks``: one kv head, one query head per group."""
  blocks = params["blocks"]
  norm = lambda key, w: jnp.broadcast_to(frozen[key] * w, (n_pos, d))  # noqa: E731
  stack = lambda f: jnp.stack([f(i, b) for i, b in enumerate(blocks)])  # noqa: E731
  return attribution.LinearBlocks(
      attn_norm=stack(lambda i, b: norm(f"n1.{i}", b["n1"])),
      patterns=stack(lambda i, b: frozen[f"attn.{i}"][None, None]),
      w_v=stack(lambda i, b: b["v"][None]), w_o=stack(lambda i, b: b["o"][None, None]),
      attn_out_norm=stack(lambda i, b: norm(f"n2.{i}", b["n2"])),
      mlp_norm=stack(lambda i, b: norm(f"n3.{i}", b["n3"])),
      final_norm=norm("final", params["final"]))


def toy_params(seed=0):
  rng = np.random.default_rng(seed)
  m = lambda *s: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[0]), jnp.float32)  # noqa: E731
  w = lambda: jnp.asarray(1 + 0.1 * rng.standard_normal(D), jnp.float32)  # noqa: E731
  blocks = [dict(q=m(D, D), k=m(D, D), v=m(D, D), o=m(D, D), w1=m(D, 2 * D), w2=m(2 * D, D),
                 n1=w(), n2=w(), n3=w(), n4=w()) for _ in range(LAYERS)]
  return dict(blocks=blocks, final=w()), jnp.asarray(rng.standard_normal((VOCAB, D)), jnp.float32)


def toy_model(seed=0, forward=toy_forward):
  params, table = toy_params(seed)
  model = attribution.LinearizableModel(params=params, forward=forward,
                                        linear_blocks=toy_linear_blocks, unembedding=table,
                                        n_layers=LAYERS)
  return model, table[TOKENS] * np.sqrt(D)


def transcoders(seed=0, skip=True, layers=range(LAYERS)):
  out = {}
  for layer in layers:
    k1, k2, k3 = jax.random.split(jax.random.key(seed * 100 + layer), 3)
    t = dictlearn.random_dictionary(k1, D, WIDTH, kind="transcoder", affine=skip)
    t = t.replace(w_enc=jax.random.normal(k2, (D, WIDTH)) / np.sqrt(D),
                  threshold=jnp.full((WIDTH,), 0.3))
    if skip:
      t = t.replace(w_skip=0.3 * jax.random.normal(k3, (D, D)) / np.sqrt(D))
    out[layer] = t
  return out


def a_clt(seed=0, skip=True):
  c = crosslayer.random_clt(jax.random.key(seed), LAYERS, D, WIDTH, skip=skip, threshold=0.3)
  return c.replace(b_enc=jnp.full((LAYERS, WIDTH), 0.05))


def check_edges_against_intervene(model, x0, tc, g, sources, value_scale=0.0):
  """Setting source feature s to v changes each target by edge * (v - a_s) / a_s."""
  n_sel = len(g.selected_features)
  targets = g.active_features[g.selected_features]
  n_nodes = g.adjacency.shape[0]
  n_logits = len(g.logit_tokens)
  for s in sources:
    layer, pos, lat = (int(v) for v in g.active_features[g.selected_features[s]])
    a = float(g.activation_values[g.selected_features[s]])
    v = value_scale * a
    r = attribution.intervene(model, x0, tc, {(layer, pos, lat): v}, frozen=True)
    got = np.array([r.pre_activations[l][p, k] - r.clean_pre_activations[l][p, k]
                    for l, p, k in targets])
    want = g.adjacency[:n_sel, s] * (v - a) / a
    scale = np.abs(want).max() + 1e-6
    np.testing.assert_allclose(got, want, atol=2e-5 * scale + 1e-6)
    dl = r.logits[-1] - r.clean_logits[-1]
    dl = dl - dl.mean()
    np.testing.assert_allclose(dl[g.logit_tokens], g.adjacency[n_nodes - n_logits:, s]
                               * (v - a) / a, atol=2e-5 * scale + 1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("skip", [True, False])
def test_edges_are_the_frozen_models_direct_effects(skip):
  model, x0 = toy_model()
  tc = transcoders(skip=skip)
  g = attribution.attribute(model, x0, TOKENS, tc, max_n_logits=4, progress=False)
  assert len(g.selected_features) == len(g.active_features) > 10
  rng = np.random.default_rng(0)
  sources = rng.choice(len(g.selected_features), 4, replace=False)
  check_edges_against_intervene(model, x0, tc, g, sources, value_scale=0.0)
  check_edges_against_intervene(model, x0, tc, g, sources[:1], value_scale=2.5)


@pytest.mark.slow
def test_cross_layer_transcoder_edges_are_direct_effects():
  model, x0 = toy_model()
  c = a_clt()
  g = attribution.attribute(model, x0, TOKENS, c, max_n_logits=4, progress=False)
  layers = g.active_features[:, 0]
  assert set(layers) == set(range(LAYERS))
  first = np.flatnonzero(layers == 0)[:3]  # Layer-0 latents write into every later MLP.
  check_edges_against_intervene(model, x0, c, g, first)


def test_exact_transcoders_leave_zero_error_edges():
  tc = transcoders(skip=True)

  def exact_forward(params, x0, mlp, frozen=None, record=None):
    def swap(layer, h, real):  # Each MLP is its transcoder.
      return mlp(layer, h, lambda v: dictlearn.forward(tc[layer], v))
    return toy_forward(params, x0, swap, frozen, record)

  model, x0 = toy_model(forward=exact_forward)
  g = attribution.attribute(model, x0, TOKENS, tc, max_n_logits=3, progress=False)
  n_sel, n_pos = len(g.selected_features), len(TOKENS)
  errors = g.adjacency[:, n_sel:n_sel + LAYERS * n_pos]
  assert np.abs(g.adjacency).max() > 1e-2
  assert np.abs(errors).max() < 1e-6 * np.abs(g.adjacency).max()


def test_bos_has_no_feature_or_error_nodes_and_edges_are_causal():
  model, x0 = toy_model()
  g = attribution.attribute(model, x0, TOKENS, transcoders(), max_n_logits=2, progress=False)
  assert (g.active_features[:, 1] > 0).all()
  n_sel, n_pos = len(g.selected_features), len(TOKENS)
  err = g.adjacency[:, n_sel:n_sel + LAYERS * n_pos].reshape(-1, LAYERS, n_pos)
  assert not err[:, :, 0].any()
  f = g.active_features[g.selected_features]
  later = (f[:, None, 0] <= f[None, :, 0]) | (f[:, None, 1] < f[None, :, 1])  # [t, s]
  assert not g.adjacency[:n_sel, :n_sel][later].any()  # Only earlier layers, same or earlier positions.


def test_a_layer_without_transcoder_is_all_error():
  model, x0 = toy_model()
  g = attribution.attribute(model, x0, TOKENS, transcoders(layers=[0, 2]), max_n_logits=2,
                            progress=False)
  assert 1 not in set(g.active_features[:, 0])
  n_sel, n_pos = len(g.selected_features), len(TOKENS)
  err1 = g.adjacency[-len(g.logit_tokens):, n_sel + n_pos:n_sel + 2 * n_pos]
  assert np.abs(err1).max() > 0


def test_capped_graph_keeps_the_full_graphs_rows_of_its_features():
  model, x0 = toy_model()
  tc = transcoders()
  full = attribution.attribute(model, x0, TOKENS, tc, max_n_logits=3, progress=False)
  cap = 7
  g = attribution.attribute(model, x0, TOKENS, tc, max_n_logits=3, max_feature_nodes=cap,
                            batch_size=2, progress=False)
  assert len(g.selected_features) == cap
  np.testing.assert_array_equal(g.active_features, full.active_features)
  sel = g.selected_features
  n_rest = full.adjacency.shape[0] - len(full.selected_features)
  cols = np.concatenate([sel, len(full.selected_features) + np.arange(n_rest)])
  rows = np.concatenate([sel, len(full.selected_features) + np.arange(n_rest)])
  np.testing.assert_allclose(g.adjacency, full.adjacency[np.ix_(rows, cols)], atol=1e-6)
  # The cap keeps features the full graph ranks influential: more than a random pick would.
  infl = graphs.node_influence(full)[:len(full.selected_features)]
  assert infl[sel].mean() > infl.mean()


@pytest.mark.parametrize("batch_size", [1, 64])
def test_rows_run_on_prefixes_and_partial_depths_equal_full_rows(batch_size):
  # batch_size 1: every row runs only the blocks below its own layer; 64: one batch.
  params, table = toy_params(1)
  model = attribution.LinearizableModel(params=params, forward=toy_forward,
                                        linear_blocks=toy_linear_blocks, unembedding=table,
                                        n_layers=LAYERS)
  tokens = np.random.default_rng(0).integers(0, VOCAB, 40)
  x0 = table[tokens] * np.sqrt(D)
  tc = transcoders()
  whole = attribution.attribute(model, x0, tokens, tc, max_n_logits=3, batch_size=512,
                                progress=False)
  assert attribution.row_prefixes(40, 1) == (16, 24, 32, 40)
  split = attribution.attribute(model, x0, tokens, tc, max_n_logits=3, split_rows_from=1,
                                batch_size=batch_size, progress=False)
  np.testing.assert_array_equal(split.active_features, whole.active_features)
  np.testing.assert_allclose(split.adjacency, whole.adjacency, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pad", [False, True])
def test_a_prompt_where_nothing_fires_has_error_and_token_edges_only(pad):
  model, x0 = toy_model()
  tc = {k: t.replace(threshold=jnp.full((WIDTH,), 1e9)) for k, t in transcoders().items()}
  g = attribution.attribute(model, x0, TOKENS, tc, max_n_logits=3, pad_shapes=pad,
                            progress=False)
  n_pos, n_logits = len(TOKENS), len(g.logit_tokens)
  assert len(g.active_features) == 0
  assert g.adjacency.shape == ((LAYERS + 1) * n_pos + n_logits,) * 2
  logit_rows = g.adjacency[-n_logits:, :(LAYERS + 1) * n_pos]
  assert np.abs(logit_rows).max() > 1e-3  # Every MLP output is error: it carries the edges.


@pytest.mark.parametrize("kind", ["skip", "noskip", "clt"])
def test_padded_shapes_change_no_edge(kind):
  # 7 tokens run as 8, feature lists and logits padded: the pads must add nothing.
  model, x0 = toy_model()
  tc = a_clt() if kind == "clt" else transcoders(skip=kind == "skip")
  exact, padded = (attribution.attribute(model, x0, TOKENS, tc, max_n_logits=3,
                                         pad_shapes=pad, progress=False)
                   for pad in (False, True))
  np.testing.assert_array_equal(padded.active_features, exact.active_features)
  np.testing.assert_array_equal(padded.logit_tokens, exact.logit_tokens)
  assert padded.adjacency.shape == exact.adjacency.shape
  np.testing.assert_allclose(padded.adjacency, exact.adjacency, atol=1e-6, rtol=1e-5)


def test_prompts_of_similar_size_share_the_compiled_rows():
  model, _ = toy_model()
  table = model.unembedding
  tc = transcoders()
  rng = np.random.default_rng(11)

  def sizes(g):  # What the compiled rows' shapes depend on.
    counts = np.bincount(g.active_features[:, 0], minlength=LAYERS)
    return attribution.bucket(len(g.input_tokens)), attribution.bucket(counts.max())

  seen, shared = {}, 0
  for _ in range(5):
    tokens = rng.integers(0, VOCAB, int(rng.integers(13, 15)))  # 13, 14: one bucket
    before = attribution._rows._cache_size()
    g = attribution.attribute(model, table[tokens] * np.sqrt(D), tokens, tc, max_n_logits=1,
                              progress=False)
    compiled = attribution._rows._cache_size() - before
    if sizes(g) in seen:
      assert compiled == 0, f"a prompt of sizes {sizes(g)} compiled again"
      shared += 1
    seen[sizes(g)] = True
  assert shared >= 3


def test_short_prompts_share_one_compiled_clean_run():
  model, _ = toy_model()
  rng = np.random.default_rng(12)
  before = attribution._clean_blocks._cache_size()
  for n in (5, 11, 20, attribution.SHORT_PROMPT):  # Four row buckets: 8, 12, 20, 32.
    tokens = rng.integers(0, VOCAB, n)
    attribution.attribute(model, model.unembedding[tokens] * np.sqrt(D), tokens,
                          transcoders(), max_n_logits=1, progress=False)
  assert attribution._clean_blocks._cache_size() - before <= 1


def test_sharded_rows_equal_one_device():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  model, x0 = toy_model()
  tc = transcoders()
  one = attribution.attribute(model, x0, TOKENS, tc, max_n_logits=3, progress=False)
  mesh = jax.make_mesh((8,), ("rows",))
  many = attribution.attribute(model, x0, TOKENS, tc, max_n_logits=3, mesh=mesh,
                               batch_size=5, progress=False)
  np.testing.assert_allclose(many.adjacency, one.adjacency, atol=1e-6, rtol=1e-5)


def test_salient_logits_match_a_plain_sort():
  rng = np.random.default_rng(3)
  logits = rng.standard_normal(VOCAB).astype(np.float32) * 3
  table = rng.standard_normal((VOCAB, D)).astype(np.float32)
  for want_p, n_max in [(0.5, 10), (0.95, 3), (0.999, 40)]:
    ids, p, vecs = attribution.salient_logits(logits, table, max_n_logits=n_max,
                                              desired_logit_prob=want_p)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    k = 1
    while k < n_max and probs[order[:k]].sum() < want_p:
      k += 1
    np.testing.assert_array_equal(ids, order[:k])
    np.testing.assert_allclose(p, probs[order[:k]], rtol=1e-5)
    np.testing.assert_allclose(vecs, table[order[:k]] - table.mean(0), atol=1e-5)


def test_bad_transcoders_are_refused_with_the_fix():
  model, x0 = toy_model()
  sae = dictlearn.random_dictionary(jax.random.key(0), D, 8)
  with pytest.raises(TypeError, match="transcoders"):
    attribution.attribute(model, x0, TOKENS, {0: sae}, progress=False)
  with pytest.raises(ValueError, match="layer index"):
    attribution.attribute(model, x0, TOKENS, {LAYERS: transcoders()[0]}, progress=False)
  wide = dictlearn.random_dictionary(jax.random.key(0), D + 1, 8, kind="transcoder", d_out=D + 1)
  with pytest.raises(ValueError, match="model's MLP"):
    attribution.attribute(model, x0, TOKENS, {0: wide}, progress=False)
  with pytest.raises(ValueError, match="no transcoder"):
    attribution.intervene(model, x0, transcoders(layers=[0]), {(1, 2, 3): 1.0})
