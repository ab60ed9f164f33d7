"""KV-cached sampling: cached logits equal uncached ones, greedy is the argmax of a full forward
at every step, padding (left or right) changes nothing, top-k/top-p never leave the allowed
set, stopping; and the real 270M's greedy continuations equal transformers'.

Shapes are chosen so the tiny-model tests share a handful of compilations.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from penzai import pz

import dictlearn_penzai as dp
from dictlearn_gemma.config import PRESETS
from dictlearn_gemma.params import init_gemma_params
from dictlearn_penzai.sampling import filter_logits

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TINY = PRESETS["tiny"]
# Prompt lengths 5 and 9 around the tiny window of 4; 8 new tokens cross it again.
PROMPTS = [[2, 17, 5, 99, 250], [2, 41, 7, 300, 12, 9, 100, 33, 61]]
NEW = 8
WIDTH = 16  # What generate() pads prompts to (a multiple of 16).


@pytest.fixture(scope="module")
def model():
  return dp.from_gemma_params(init_gemma_params(TINY, seed=5))


def _allowed_mask(logits, temperature, top_k, top_p):
  """Tokens generate may emit given a step's raw logits (pad excluded, as generate does)."""
  logits = np.array(logits, np.float32)
  logits[..., 0] = -np.inf
  return np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), temperature=temperature,
                                              top_k=top_k, top_p=top_p)))


def _full_forward_steps(model, prompts, new_tokens):
  """Uncached logits predicting each new token: (batch, NEW, vocab), one left-padded batch."""
  rows = [list(p) + list(n[:-1]) for p, n in zip(prompts, new_tokens)]
  batch = dp.pad_batch(rows, side="left", multiple=WIDTH)
  logits = np.array(dp.forward_logits(model, batch))  # A writable copy.
  return logits[:, -new_tokens.shape[1]:]


def test_kv_cached_logits_equal_uncached_step_by_step(model):
  step = pz.variable_jit(lambda m, t: m(pz.nx.wrap(t).tag("batch", "seq")).unwrap(
      "batch", "seq", "vocabulary"))
  prefix = dp.pad_batch([p[:5] for p in PROMPTS], side="left")
  cached = dp.make_kv_cached(model, batch_size=2, cache_len=16)
  got = [np.asarray(step(cached, jnp.asarray(prefix)))[:, -1]]
  rest = [p[5:] + [11, 12, 13, 14, 15, 16, 17][: 7 - len(p[5:])] for p in PROMPTS]
  for t in range(7):  # Past the window of 4 and across the global layer.
    got.append(np.asarray(step(cached, jnp.asarray([[r[t]] for r in rest])))[:, 0])
  got = np.stack(got, axis=1)  # (batch, 8, vocab)
  for row, (prompt, tail) in enumerate(zip(PROMPTS, rest)):
    full = np.asarray(dp.forward_logits(model, np.array(prompt[:5] + tail)))
    np.testing.assert_allclose(got[row], full[4:], atol=1e-4)


def test_greedy_is_argmax_and_padding_changes_nothing(model):
  left = dp.generate_tokens(model, dp.pad_batch(PROMPTS, side="left", multiple=WIDTH),
                            max_new_tokens=NEW, stop_ids=(), return_logprobs=True)
  right = dp.generate_tokens(model, dp.pad_batch(PROMPTS, side="right", multiple=WIDTH),
                             max_new_tokens=NEW, stop_ids=())
  # Each prompt beside a copy of itself instead of the other one (same compiled shape).
  alone = [dp.generate_tokens(model, dp.pad_batch([p, p], multiple=WIDTH), max_new_tokens=NEW,
                              stop_ids=())[0] for p in PROMPTS]
  tokens, logprobs = left
  np.testing.assert_array_equal(tokens, right)
  np.testing.assert_array_equal(tokens, np.stack(alone))
  full = _full_forward_steps(model, PROMPTS, tokens)
  # The KV-cached log-probs of the chosen tokens are the uncached ones.
  logp = np.asarray(jax.nn.log_softmax(jnp.asarray(full), -1))
  np.testing.assert_allclose(logprobs, np.take_along_axis(logp, tokens[..., None], -1)[..., 0],
                             atol=1e-4)
  full[..., 0] = -np.inf  # generate never emits the pad id.
  np.testing.assert_array_equal(tokens, full.argmax(-1))


@given(seed=st.integers(0, 2**31 - 1), top_k=st.integers(1, 70),
       top_p=st.floats(0.01, 1.0), temperature=st.floats(0.1, 3.0))
def test_filter_keeps_exactly_top_k_then_top_p(seed, top_k, top_p, temperature):
  logits = np.random.default_rng(seed).normal(0, 3, size=(3, 64)).astype(np.float32)
  kept = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), temperature=temperature,
                                              top_k=top_k, top_p=top_p)))
  for row, keep in zip(logits, kept):
    order = np.argsort(-row)[:min(top_k, 64)]  # Top-k, then top-p over their softmax.
    probs = np.exp((row[order] - row[order].max()) / temperature)
    cumulative = np.cumsum(probs / probs.sum())
    # The smallest prefix whose mass reaches p; float32 vs float64 may differ at the edge.
    low, high = (min(int(np.searchsorted(cumulative, top_p * f)) + 1, len(order))
                 for f in (1 - 1e-5, 1 + 1e-5))
    assert low <= keep.sum() <= high
    assert keep[order[:keep.sum()]].all()


@settings(max_examples=6)
@given(seed=st.integers(0, 1000), top_k=st.integers(1, 12), top_p=st.floats(0.05, 1.0),
       temperature=st.floats(0.3, 2.0))
def test_sampling_never_leaves_the_allowed_set(model, seed, top_k, top_p, temperature):
  batch = dp.pad_batch(PROMPTS, side="left", multiple=WIDTH)
  tokens = dp.generate_tokens(model, batch, max_new_tokens=NEW, temperature=temperature,
                              top_k=top_k, top_p=top_p, seed=seed, stop_ids=())
  allowed = _allowed_mask(_full_forward_steps(model, PROMPTS, tokens), temperature, top_k, top_p)
  assert np.take_along_axis(allowed, tokens[..., None], -1).all()


def test_stops_at_a_stop_token_and_generate_takes_any_tokenizer(model):
  batch = dp.pad_batch([PROMPTS[0]] * 2, multiple=WIDTH)
  greedy = dp.generate_tokens(model, batch, max_new_tokens=NEW, stop_ids=())[0]
  stopped = dp.generate_tokens(model, batch, max_new_tokens=NEW, stop_ids=(int(greedy[2]),))[0]
  np.testing.assert_array_equal(stopped[:3], greedy[:3])
  assert (stopped[3:] == 0).all()

  class ListTokenizer:  # Only encode/decode, like gm.text.Gemma3Tokenizer; Gemma ids assumed.
    def encode(self, text, add_bos=False):
      return ([2] if add_bos else []) + [int(t) for t in text.split()]

    def decode(self, ids):
      return " ".join(str(i) for i in ids)

  text = " ".join(str(t) for t in PROMPTS[0][1:])
  assert dp.generate(model, ListTokenizer(), text, max_new_tokens=NEW) == " ".join(
      str(t) for t in greedy[:next((i for i, t in enumerate(greedy) if t in (1, 106)), NEW)])
  with pytest.raises(ValueError, match="non-padding token"):
    dp.generate_tokens(model, np.zeros((1, 4), np.int32), max_new_tokens=2)


# --- the real 270M


def _reference():
  path = FIXTURES / "gemma3_270m_reference.json"
  if not path.is_file():
    pytest.skip("reference fixtures not generated")
  return json.loads(path.read_text())


def test_270m_greedy_continuations_equal_transformers(gemma3_270m):
  model, tokenizer = gemma3_270m
  prompts = [p for p in _reference()["prompts"] if len(p["ids"]) <= 64 and p["greedy_ids"]]
  assert len(prompts) >= 5
  texts = dp.generate(model, tokenizer, [p["text"] for p in prompts], max_new_tokens=16)
  for prompt, text in zip(prompts, texts):
    want = prompt["greedy_ids"]
    cut = next((i for i, t in enumerate(want) if t in (1, 106)), len(want))
    assert text == tokenizer.decode(want[:cut])


@pytest.mark.slow
def test_270m_long_prompt_greedy_and_cached_logprobs(gemma3_270m):
  """Over 512 tokens (the sliding window matters in the cache too): the greedy continuation
  equals transformers', and the cached log-probs of its tokens equal transformers' top-1."""
  model, tokenizer = gemma3_270m
  ref = _reference()
  arrays = np.load(FIXTURES / "gemma3_270m_reference.npz")
  for i, prompt in enumerate(ref["prompts"]):
    if len(prompt["ids"]) <= 512 or not prompt["greedy_ids"]:
      continue
    tokens, logprobs = dp.generate_tokens(model, np.array(prompt["ids"]), max_new_tokens=16,
                                          return_logprobs=True)
    want = prompt["greedy_ids"]
    assert tokens.tolist()[:len(want)] == want
    # The first new token's log-prob is the reference's top-1 at the last prompt position.
    np.testing.assert_allclose(logprobs[0], arrays[f"top_logprobs_{i}"][-1, 0], atol=1e-3)
