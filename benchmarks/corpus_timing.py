"""What the corpus benchmarks (bench_evals, bench_dashboards) share: timing, the corpus's
batches, and the bare model forward over them."""

from __future__ import annotations

import time

import jax

from dictlearn_gemma import corpus as C
from dictlearn_penzai import hooks


def timed(fn):
  """``(fn(), seconds)``."""
  t = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t


def corpus_batches(tokenizer, docs, seq_len: int, batch_size: int, tokens: int):
  """``(batches, n_tokens)``: the (batch_size, seq_len) token arrays ``evaluate`` and
  ``collect`` see for these settings, and their non-padding tokens."""
  rows = list(C.sequences(tokenizer, C.documents(docs), seq_len, tokens=tokens))
  batches = [b for b, _ in C.batches(rows, batch_size, seq_len)]
  return batches, int(sum((b != 0).sum() for b in batches))


def bare_forward_seconds(model, batches) -> float:
  """Seconds of the model's forward over ``batches`` (compiled first, not timed).

  Dispatched as ``evaluate`` and ``collect`` dispatch (async, one wait at the end, so
  batches may overlap); each batch's logits (batch, seq, 262k) are 0.5 GB, so only the last
  one is kept.
  """
  jax.block_until_ready(hooks.call(model, batches[0]).data_array)

  def run():
    for b in batches:
      out = hooks.call(model, b).data_array
    jax.block_until_ready(out)

  return timed(run)[1]
