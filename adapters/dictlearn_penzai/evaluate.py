"""Corpus-level evals of dictionaries on a penzai Gemma: one streamed pass, many dictionaries.

Per batch of ``batch_size`` sequences (``dictlearn_gemma.corpus``: BOS-first pieces of each
document, right-padded): one clean run capturing every site a dictionary reads or writes,
one zero-ablation run per distinct write site, and one spliced run per dictionary. The
dictionary's output comes from the fused ``dictlearn.encode_decode`` on the clean input
(exactly what ``hooks.splice`` computes inside the model: with one dictionary in place,
the site it reads is unchanged), and a ``Replace`` hook sets the write site to it at every
position but BOS and padding. The arrays go to ``dictlearn.evals.CorpusEval``, whose
docstring defines every metric.

With several processes (``dictlearn.distributed.initialize`` first; every process calls
``evaluate`` with the same arguments) batch ``b`` of the corpus runs on process
``b % process_count``, and the sums are reduced over the processes at the end, so every
process returns the one-process result (up to float64 summation order).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from penzai import pz
from tqdm.auto import tqdm

import dictlearn
from dictlearn import distributed as dist
from dictlearn import evals
from dictlearn_gemma import corpus as C
from dictlearn_penzai import hooks
from dictlearn_penzai import layers as L
from dictlearn_penzai.sites import Site


@pz.pytree_dataclass
class Replace(L.SiteHook):
  """Sets a site to ``value`` (batch, seq, d), a plain array in ``plain(x)``'s layout."""

  value: jax.Array
  site: Site = dataclasses.field(metadata={"pytree_node": False})

  def __call__(self, x, **side_inputs):
    flat, back = L.plain(x)
    if flat.shape != self.value.shape:
      raise ValueError(f"Replace at {self.site}: value has shape {self.value.shape} but the "
                       f"site carries {flat.shape}")
    return back(self.value.astype(flat.dtype))


def _name(d, i: int) -> str:
  src = getattr(getattr(d, "meta", None), "source", None)
  if src:
    src = str(src).rstrip("/\\")
    return Path(src).name if os.sep in src or "/" in src else src
  return f"dictionary_{i}"


def named_dictionaries(dictionaries) -> dict[str, Any]:
  """``{name: core dictionary}`` from a mapping, a list (names from each one's
  ``meta.source``, its folder's name, made unique) or a single dictionary."""
  if isinstance(dictionaries, Mapping):
    items = [(str(k), v) for k, v in dictionaries.items()]
  else:
    if not isinstance(dictionaries, Iterable):
      dictionaries = [dictionaries]
    items = [(_name(L.core_dictionary(d), i), d) for i, d in enumerate(dictionaries)]
  out: dict[str, Any] = {}
  for name, d in items:
    base, n = name, 1
    while name in out:
      n += 1
      name = f"{base}#{n}"
    d = L.core_dictionary(d)
    if not isinstance(d, (dictlearn.JumpReLUSAE, dictlearn.Transcoder)):
      raise TypeError(f"{name!r} is a {type(d).__name__}, not a dictlearn JumpReLUSAE or "
                      "Transcoder")
    out[name] = d
  if not out:
    raise ValueError("no dictionaries to evaluate")
  return out


def _replaced(model, site: Site, value):
  return hooks.attach(model, site, Replace(value=value, site=site))


def evaluate(model, tokenizer, corpus, dictionaries, *, tokens: int | None = 20_000,
             seq_len: int = 128, batch_size: int = 4, progress: bool = True,
             dense_threshold: float = evals.DENSE_THRESHOLD, k: int = 256,
             compute_dtype=jnp.float32, pad_id: int = 0,
             sites: Mapping[str, Any] | None = None) -> dict[str, dict]:
  """Evaluates every dictionary over one pass of ``corpus``.

  Args:
    model: a penzai Gemma with HookPoints (``load_gemma3``).
    tokenizer: ``encode(text, add_bos=False)`` and ``bos_id``.
    corpus: a folder of text files (one document a file), a file, an iterable of strings,
      or a ``datasets`` dataset with a ``text`` column (``dictlearn_gemma.corpus``).
    dictionaries: ``{name: dictionary}``, a list of them, or one.
    tokens: stop after this many non-padding tokens, BOS included (None: all).
    seq_len: tokens per sequence, BOS included.
    batch_size: sequences per model call (one compiled shape).
    progress: a tqdm bar over tokens.
    dense_threshold: the density above which a latent counts as dense.
    k: code slots per token of the fused encoder (exact beyond it; see ``evals``).
    compute_dtype: matmul operand dtype of the dictionaries.
    pad_id: the padding id.
    sites: ``{name: site or (read, write)}`` overriding a dictionary's metadata.

  Returns:
    ``{name: metrics}`` in ``dictlearn.evals.eval_result_metrics``' layout.
  """
  named = named_dictionaries(dictionaries)
  sites = dict(sites or {})
  rw = {n: hooks.read_write_sites(model, d, sites.get(n)) for n, d in named.items()}
  needed = list(dict.fromkeys(s for pair in rw.values() for s in pair))
  write_sites = {n: dst for n, (_, dst) in rw.items()}
  ev = evals.CorpusEval({n: d.width for n, d in named.items()}, write_sites,
                        dense_threshold=dense_threshold)
  rows = C.sequences(tokenizer, C.documents(corpus), seq_len, tokens=tokens, pad_id=pad_id)
  bar = tqdm(total=tokens, unit="tok", desc="eval",
             disable=not progress or not dist.is_primary())
  seen = 0
  processes, me = jax.process_count(), jax.process_index()
  try:
    for b, (batch, _) in enumerate(C.batches(rows, batch_size, seq_len, pad_id=pad_id)):
      if b % processes != me:  # Another process's batch.
        bar.update(int((batch != pad_id).sum()))
        continue
      tok = hooks.as_tokens(jnp.asarray(batch))
      pos = hooks.positions_from_padding(tok, pad_id)
      plain_pos = pos.unwrap("batch", "seq")
      plain_tok = tok.unwrap("batch", "seq")
      mask = evals.token_mask(plain_pos)[..., None]
      logits, cache = hooks.run_with_cache(model, tok, needed, pad_id=pad_id,
                                           token_positions=pos)
      # Shared by every patched run of the batch (its logsumexp and CE computed once).
      clean = evals.clean_predictions(logits.unwrap("batch", "seq", "vocabulary"), plain_tok,
                                      plain_pos)

      def patched(site, value):
        out = hooks.call(_replaced(model, site, value), tok, pad_id=pad_id,
                         token_positions=pos)
        return out.unwrap("batch", "seq", "vocabulary")

      for site in dict.fromkeys(write_sites.values()):
        target = cache.array(site)
        zero = jnp.where(mask, jnp.zeros((), target.dtype), target)
        ev.add_ablation(site, clean, patched(site, zero), plain_tok, plain_pos)
      for n, d in named.items():
        src, dst = rw[n]
        target = cache.array(dst)
        y, codes = dictlearn.encode_decode(d, cache.array(src), k=k,
                                           compute_dtype=compute_dtype)
        spliced = jnp.where(mask, y.astype(target.dtype), target)
        ev.add_dictionary(n, clean, patched(dst, spliced), plain_tok, plain_pos, target, y,
                          codes)
      n_tok = int((batch != pad_id).sum())
      seen += n_tok
      bar.update(n_tok)
  finally:
    bar.close()
  if processes > 1:
    dist.reduce_corpus_eval(ev)
    seen = dist.allreduce_sum(seen)
  if seen == 0:
    raise ValueError("the corpus gave no tokens to evaluate")
  return ev.results()
