"""Running Gemma 3: logits for token arrays, and KV-cached sampling in one jitted loop.

``forward_logits(model, tokens)`` hides penzai's calling convention: int tokens
(batch, seq) in, float32 logits (batch, seq, vocab) out, jitted, with positions computed
from padding so left- or right-padded batches give each row its unpadded logits.

``generate`` / ``generate_tokens`` convert the model with penzai's
``KVCachingTransformerLM.from_uncached`` *inside* one ``jax.jit``: prefill, then a
``lax.while_loop`` of single-token steps that stops when every row has emitted a stop token
(EOS or end_of_turn) or ``max_new_tokens`` are out. Compiled once per (model structure,
batch, padded prompt length, max_new_tokens, sampling mode); prompt lengths are rounded up
to a multiple of 16 so similar prompts share a compilation. Padding (left or right) works
because penzai's cached model derives positions by counting non-pad tokens, and masks pad
keys out. Layers inserted into the model (hooks) run in every step and receive the same
side inputs (``token_positions``; also ``kv_token_positions`` and ``cache_end_index``);
their state variables are carried through the loop and written back afterwards.

Sampling: greedy when ``temperature == 0``; otherwise logits / temperature, then top-k
(keep tokens whose logit is >= the k-th largest), then top-p (keep the smallest
highest-probability set whose mass reaches p, renormalized after top-k), as transformers
orders them. The pad token is never emitted: a generated pad would read as padding.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models.transformer.sampling_mode import KVCachingTransformerLM

from dictlearn.interventions import positions_from_padding
from dictlearn_gemma.tokenizer import format_chat, special_ids
from dictlearn_penzai.jitting import split_variables, state_jit

_BUCKET = 16
_MAX_STOP_IDS = 8


@state_jit
def _forward(model, tokens, positions):
  out = model(pz.nx.wrap(tokens).tag("batch", "seq"),
              token_positions=pz.nx.wrap(positions).tag("batch", "seq"))
  return out.unwrap("batch", "seq", "vocabulary").astype(jnp.float32)


def forward_logits(model: Any, tokens: Any, *, pad_id: int | None = 0,
                   token_positions: Any = None) -> jax.Array:
  """Logits of a plain (uncached) model for token ids.

  Args:
    model: a ``TransformerLM`` (e.g. from ``load_gemma3``), hooks inserted or not.
    tokens: int array (batch, seq) or (seq,).
    pad_id: padding id (Gemma: 0), given position -1 and never attended to, so padded rows
      (left or right) get the logits they would get alone; None: positions 0..seq-1.
    token_positions: explicit (batch, seq) positions, overriding ``pad_id``.

  Returns:
    float32 (batch, seq, vocab) logits ((seq, vocab) for 1-D tokens); rows at pad positions
    are meaningless.
  """
  tokens = jnp.asarray(tokens, dtype=jnp.int32)
  squeeze = tokens.ndim == 1
  if squeeze:
    tokens = tokens[None]
  if token_positions is None:
    positions = positions_from_padding(tokens, pad_id)
  else:
    positions = jnp.broadcast_to(jnp.asarray(token_positions, dtype=jnp.int32), tokens.shape)
  logits = _forward(model, tokens, positions)
  return logits[0] if squeeze else logits


def make_kv_cached(model: Any, *, batch_size: int, cache_len: int, pad_id: int = 0
                   ) -> KVCachingTransformerLM:
  """penzai's KV-cached sampling model for ``model`` (axes: batch, seq; HookPoints kept)."""
  return KVCachingTransformerLM.from_uncached(model, cache_len=cache_len,
                                              batch_axes={"batch": batch_size}, pad_id=pad_id)


def filter_logits(logits: jax.Array, *, temperature: Any = 1.0, top_k: Any = None,
                  top_p: Any = None) -> jax.Array:
  """(..., vocab) logits -> temperature-scaled logits with disallowed tokens at -inf.

  ``top_k``/``top_p`` of None (or k <= 0, p >= 1) switch that filter off. Traceable.
  """
  logits = logits.astype(jnp.float32) / temperature
  if top_k is None and top_p is None:
    return logits
  ordered = -jnp.sort(-logits, axis=-1)  # Descending.
  if top_k is not None:
    k = jnp.clip(jnp.asarray(top_k), 1, logits.shape[-1])
    kth = jnp.take_along_axis(ordered, jnp.broadcast_to(k - 1, ordered.shape[:-1])[..., None],
                              axis=-1)
    kth = jnp.where(jnp.asarray(top_k) > 0, kth, -jnp.inf)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    ordered = jnp.where(ordered < kth, -jnp.inf, ordered)
  if top_p is not None:
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # Keep sorted entry j while the mass of the ones above it is < p (the first always).
    kept = jnp.where(mass_before < top_p, ordered, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def _split_unembedding(model):
  """(model without its final ``EmbeddingDecode``, that layer); (model, identity) if none.

  A logit soft-cap after the unembedding (Gemma 2) goes with it, so the prefill still
  unembeds only the last positions.
  """
  body = model.body
  if isinstance(body, pz.nn.Sequential):
    subs = list(body.sublayers)
    n = 2 if len(subs) > 1 and isinstance(subs[-1], pz.nn.TanhSoftCap) else 1
    if isinstance(subs[-n], pz.nn.EmbeddingDecode):
      trunk = dataclasses.replace(model, body=pz.nn.Sequential(subs[:-n]))
      return trunk, subs[-1] if n == 1 else pz.nn.Sequential(subs[-n:])
  return model, pz.nn.Identity()


def _logprob_of(logits, tokens):
  """log p(token) under the model's own (unfiltered, temperature 1) distribution."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def _pick(logits, key, temperature, top_k, top_p, *, greedy, use_top_k, use_top_p, pad_id):
  logits = logits.astype(jnp.float32).at[:, pad_id].set(-jnp.inf)
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits, temperature=temperature, top_k=top_k if use_top_k else None,
                         top_p=top_p if use_top_p else None)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=(
    "max_new_tokens", "cache_len", "greedy", "use_top_k", "use_top_p", "pad_id"))
def _generate_impl(slots, params, states, tokens, key, temperature, top_k, top_p, stops, *,
                   max_new_tokens, cache_len, greedy, use_top_k, use_top_p, pad_id):
  batch = tokens.shape[0]
  model = pz.bind_variables(slots, [*params, *(s.unfreeze_as_copy() for s in states)])
  model, unembed = _split_unembedding(model)
  sampler = make_kv_cached(model, batch_size=batch, cache_len=cache_len, pad_id=pad_id)
  pick = functools.partial(_pick, temperature=temperature, top_k=top_k, top_p=top_p,
                           greedy=greedy, use_top_k=use_top_k, use_top_p=use_top_p,
                           pad_id=pad_id)

  hidden = sampler(pz.nx.wrap(tokens).tag("batch", "seq"))
  idx = jnp.arange(tokens.shape[1])
  last = pz.nx.wrap(jnp.max(jnp.where(tokens != pad_id, idx, -1), axis=1)).tag("batch")
  # Unembed only each row's last prompt position: the (batch, seq, vocab) prompt logits
  # would be gigabytes for long prompts.
  first_logits = unembed(hidden[{"seq": last}]).unwrap("batch", "vocabulary")
  key, sub = jax.random.split(key)
  first = pick(first_logits, sub)
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
  logprobs = jnp.zeros((batch, max_new_tokens), jnp.float32).at[:, 0].set(
      _logprob_of(first_logits, first))
  done = jnp.isin(first, stops)

  sampler_slots, state_vars = pz.unbind_state_vars(sampler)
  frozen = [v.freeze() for v in state_vars]

  def step(carry):
    i, frozen, done, out, logprobs, key = carry
    live = [v.unfreeze_as_copy() for v in frozen]
    m = pz.bind_variables(sampler_slots, live)
    fed = out[:, i - 1][:, None]
    logits = unembed(m(pz.nx.wrap(fed).tag("batch", "seq"))).unwrap("batch", "seq", "vocabulary")
    logits = logits[:, 0]
    key, sub = jax.random.split(key)
    tok = jnp.where(done, pad_id, pick(logits, sub))
    logprob = jnp.where(done, 0.0, _logprob_of(logits, tok))
    return (i + 1, [v.freeze() for v in live], done | jnp.isin(tok, stops),
            out.at[:, i].set(tok), logprobs.at[:, i].set(logprob), key)

  carry = (jnp.int32(1), frozen, done, out, logprobs, key)
  if max_new_tokens > 1:
    if states:
      # State a hook keeps (e.g. the last activations) may change shape between prefill and
      # single-token steps, and a loop carry may not: take one step before the loop. (Only
      # then: it adds a copy of the model to the compiled program.)
      carry = step(carry)
    carry = jax.lax.while_loop(
        lambda c: (c[0] < max_new_tokens) & ~jnp.all(c[2]), step, carry)
  _, frozen, _, out, logprobs, _ = carry
  # Hand back the user's state variables (those of the uncached model), updated.
  final = {v.label: v for v in frozen}
  return out, logprobs, [final.get(s.label, s) for s in states]


def generate_tokens(model: Any, tokens: Any, *, max_new_tokens: int, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                    stop_ids: Sequence[int] = (1, 106), pad_id: int = 0,
                    return_logprobs: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """KV-cached sampling from token ids.

  Args:
    model: a plain ``TransformerLM`` (hooks allowed); it is converted inside the jit.
    tokens: int (batch, seq) prompts, padded with ``pad_id`` on either side (each row needs
      a non-pad token), or one unpadded (seq,) prompt.
    max_new_tokens: tokens to generate per row (fewer if every row stops early).
    temperature: 0 for greedy (argmax); otherwise sampling temperature.
    top_k, top_p: optional filters (see module doc).
    seed: PRNG seed for sampling.
    stop_ids: a row stops after emitting one of these (Gemma: EOS 1, end_of_turn 106).
    pad_id: the padding id; also fills each row after it stops.
    return_logprobs: also return each new token's log-probability under the model
      (log-softmax of the raw KV-cached logits; 0 after a row stops).

  Returns:
    int32 numpy (batch, max_new_tokens) ((max_new_tokens,) for a 1-D prompt): new tokens,
    the stop token included, ``pad_id`` after it; with ``return_logprobs``, a pair
    (tokens, float32 log-probs of the same shape).
  """
  tokens = np.asarray(tokens, dtype=np.int32)
  squeeze = tokens.ndim == 1
  if squeeze:
    tokens = tokens[None]
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if not np.all((tokens != pad_id).any(axis=1)):
    raise ValueError("every prompt needs at least one non-padding token (e.g. BOS)")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  slots, params, state_vars = split_variables(model)
  stop_ids = [int(s) for s in stop_ids]
  if len(stop_ids) > _MAX_STOP_IDS:
    raise ValueError(f"at most {_MAX_STOP_IDS} stop ids, got {len(stop_ids)}")
  # A fixed-size traced array (-1 never matches), so stop ids never cause a recompile.
  stops = jnp.asarray(stop_ids + [-1] * (_MAX_STOP_IDS - len(stop_ids)), dtype=jnp.int32)
  out, logprobs, new_states = _generate_impl(
      slots, params, [v.freeze() for v in state_vars], jnp.asarray(tokens),
      jax.random.key(seed), jnp.float32(max(temperature, 1e-6)),
      jnp.int32(top_k or 0), jnp.float32(1.0 if top_p is None else top_p), stops,
      max_new_tokens=int(max_new_tokens), cache_len=tokens.shape[1] + int(max_new_tokens),
      greedy=temperature == 0, use_top_k=top_k is not None, use_top_p=top_p is not None,
      pad_id=int(pad_id))
  for var, value in zip(state_vars, new_states):
    var.value = value.value
  out, logprobs = np.asarray(out), np.asarray(logprobs)
  if squeeze:
    out, logprobs = out[0], logprobs[0]
  return (out, logprobs) if return_logprobs else out


def pad_batch(id_lists: Sequence[Sequence[int]], *, pad_id: int = 0, side: str = "left",
              multiple: int = 1) -> np.ndarray:
  """Pads id lists to one (batch, seq) array; seq rounded up to ``multiple``."""
  if side not in ("left", "right"):
    raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
  width = max(len(ids) for ids in id_lists)
  width = -(-width // multiple) * multiple
  out = np.full((len(id_lists), width), pad_id, dtype=np.int32)
  for row, ids in zip(out, id_lists):
    if side == "left":
      row[width - len(ids):] = ids
    else:
      row[:len(ids)] = ids
  return out


def _encode(tokenizer: Any, text: str) -> list[int]:
  """BOS + ids with any tokenizer object (ours, gm.text.Gemma3Tokenizer, ...)."""
  bos = special_ids(tokenizer)["bos_id"]
  try:
    ids = list(tokenizer.encode(text, add_bos=True))
  except TypeError:
    ids = list(tokenizer.encode(text))
  return ids if ids[:1] == [bos] else [bos, *ids]


def generate(model: Any, tokenizer: Any, prompt_or_prompts: str | Sequence[str], *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, chat: bool = False,
             padding: str = "left") -> str | list[str]:
  """Generates continuations of text prompt(s) with KV caching.

  Args:
    model: a plain ``TransformerLM`` (from ``load_gemma3``), hooks inserted or not.
    tokenizer: anything with ``encode(text, add_bos=...)`` and ``decode(ids)``.
    prompt_or_prompts: one prompt or a list (batched, padded on ``padding`` side).
    max_new_tokens, temperature, top_k, top_p, seed: see ``generate_tokens``.
    chat: wrap each prompt in Gemma's chat format (instruction-tuned models): a string
      becomes one user turn; a list of {"role", "content"} dicts is a conversation.
    padding: "left" or "right"; both give each prompt its unbatched continuation.

  Returns:
    The continuation text (without the stop token), or a list for a list of prompts.
  """
  single = isinstance(prompt_or_prompts, str) or (
      chat and prompt_or_prompts and isinstance(prompt_or_prompts[0], dict))
  prompts = [prompt_or_prompts] if single else list(prompt_or_prompts)
  if chat:
    prompts = [format_chat(p) for p in prompts]
  ids = special_ids(tokenizer)
  batch = pad_batch([_encode(tokenizer, p) for p in prompts], pad_id=ids["pad_id"],
                    side=padding, multiple=_BUCKET)
  stop = (ids["eos_id"], ids["end_of_turn_id"])
  new = generate_tokens(model, batch, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=seed, stop_ids=stop,
                        pad_id=ids["pad_id"])
  texts = []
  for row in new.tolist():
    cut = next((n for n, t in enumerate(row) if t in stop), len(row))
    texts.append(tokenizer.decode(row[:cut]))
  return texts[0] if single else texts
