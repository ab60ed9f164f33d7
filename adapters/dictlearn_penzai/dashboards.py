"""Feature dashboards of a dictionary on a penzai Gemma: one streamed pass over a corpus.

The corpus is read as ``evaluate`` reads it (``dictlearn_gemma.corpus``: BOS-first pieces
of each document, right-padded, ``batch_size`` sequences a call); each batch runs the
model once capturing the dictionary's read site, and ``dictlearn.dashboards
.DashboardCollector.add_inputs`` encodes the tracked latents and merges them into the
running statistics in one compiled call (the same compilation for the whole run). BOS
and padding never count (``dictlearn.evals.token_mask``); windows show BOS but not
padding. ``write`` turns the result into the feature files and pages
(``dictlearn.dashboards.write``), token strings from the tokenizer's one-token decode and
the logit lens through the model's tied unembedding (``analysis.unembedding_tail``).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from tqdm.auto import tqdm

from dictlearn import dashboards, evals
from dictlearn_gemma import corpus as C
from dictlearn_penzai import analysis, hooks
from dictlearn_penzai.evaluate import named_dictionaries


def collect(model, tokenizer, corpus, dictionary, *, tokens: int | None = 200_000,
            seq_len: int = 128, batch_size: int = 4, latents=None, k: int = 20,
            n_quantiles: int = 5, examples_per_quantile: int = 5,
            window: tuple[int, int] = (12, 4), progress: bool = True, pad_id: int = 0,
            site=None, name: str | None = None,
            compute_dtype=jnp.float32) -> dashboards.Dashboards:
  """Dashboards of ``latents`` of ``dictionary`` over one pass of ``corpus``.

  Args:
    model: a penzai Gemma with HookPoints (``load_gemma3``).
    tokenizer: ``encode(text, add_bos=False)`` and ``bos_id``.
    corpus: a folder of text files, a file, an iterable of strings or a ``datasets``
      dataset (``dictlearn_gemma.corpus.documents``).
    dictionary: a JumpReLU SAE or transcoder (or its penzai layer).
    tokens: stop after this many non-padding tokens, BOS included (None: all).
    seq_len, batch_size: the sequences' length (BOS included) and how many a call.
    latents: indices, or a string such as ``"0:200"`` (``dashboards.parse_latents``);
      default: all.
    k, n_quantiles, examples_per_quantile, window: as in ``DashboardCollector``.
    site: the read site, or ``(read, write)``, overriding the dictionary's metadata.
    name: the dictionary's name in the pages (default: its folder's name).

  Returns:
    ``dictlearn.dashboards.Dashboards``.
  """
  ((default_name, d),) = named_dictionaries([dictionary]).items()
  src, dst = hooks.read_write_sites(model, d, site)
  if latents is None:
    latents = np.arange(d.width)
  elif isinstance(latents, str):
    latents = dashboards.parse_latents(latents, d.width)
  info = {"name": name or default_name, "layer": src.layer, "site_in": str(src),
          "site_out": str(dst)}
  collector = dashboards.DashboardCollector(
      latents, dictionary=d, k=k, n_quantiles=n_quantiles,
      examples_per_quantile=examples_per_quantile, window=window, info=info,
      compute_dtype=compute_dtype)
  rows = C.sequences(tokenizer, C.documents(corpus), seq_len, tokens=tokens, pad_id=pad_id)
  bar = tqdm(total=tokens, unit="tok", desc="dashboards", disable=not progress)
  seen = 0
  try:
    for batch, _ in C.batches(rows, batch_size, seq_len, pad_id=pad_id):
      tok = hooks.as_tokens(jnp.asarray(batch))
      pos = hooks.positions_from_padding(tok, pad_id)
      plain_pos = pos.unwrap("batch", "seq")
      _, cache = hooks.run_with_cache(model, tok, [src], pad_id=pad_id, token_positions=pos)
      collector.add_inputs(cache.array(src), tok.unwrap("batch", "seq"),
                           evals.token_mask(plain_pos), valid=plain_pos >= 0)
      n_tok = int((batch != pad_id).sum())
      seen += n_tok
      bar.update(n_tok)
  finally:
    bar.close()
  if seen == 0:
    raise ValueError("the corpus gave no tokens for the dashboards")
  return collector.results()


def lens_logits(model, convention: str = "raw"):
  """rows (n, d_model) -> logits (n, vocab) through the model's tied unembedding, for
  ``dictlearn.dashboards.logit_lens``: ``"raw"`` (the decoder row times the unembedding,
  as the Gemma Scope tutorial and ``dictlearn circuit`` do) or ``"final_norm"`` (through
  the final RMSNorm first, as ``analysis.logit_lens`` defaults to)."""
  if convention not in ("raw", "final_norm"):
    raise ValueError(f"convention must be 'raw' or 'final_norm', not {convention!r}")
  tail = analysis.unembedding_tail(model)
  if convention == "raw":
    tail = pz.select(tail).at_instances_of(pz.nn.EmbeddingDecode).get_sequence()
  tail = [layer for layer in tail if not isinstance(layer, pz.nn.TanhSoftCap)]
  tail = pz.freeze_params(tail)
  return lambda rows: _through(tail, jnp.asarray(rows, jnp.float32))


@jax.jit
def _through(tail, rows):
  """rows (n, d_model) through the layers ``tail``: one program, not one per penzai op."""
  x = pz.nx.wrap(rows).tag("latent", "embedding")
  for layer in tail:
    x = layer(x)
  return x.astype(jnp.float32).unwrap("latent", "vocabulary")


def write(results: dashboards.Dashboards, out_dir, tokenizer, unembedding=None, *,
          scan: str = "", convention: str = "raw", lens_k: int = 10) -> list[Path]:
  """``dictlearn.dashboards.write`` with the tokenizer's one-token decode as token strings.

  ``unembedding``: the penzai model (the decoder rows' logit lens through its tied
  unembedding, ``lens_logits(model, convention)``; left out when the dictionary writes
  vectors of another width, e.g. an attn_z SAE), a callable rows -> logits, W_U
  (d_model, vocab), or None (no logit lens). ``scan``: as in ``dictlearn.dashboards.write``.
  """
  if isinstance(unembedding, pz.nn.Layer):
    d_model = getattr(getattr(unembedding, "metadata", None), "embedding_dim", None)
    writes = None if results.decoder is None else results.decoder.shape[1]
    unembedding = None if d_model not in (None, writes) else lens_logits(unembedding,
                                                                          convention)
  return dashboards.write(results, out_dir, lambda i: tokenizer.decode([int(i)]),
                          unembedding=unembedding, scan=scan, lens_k=lens_k)
