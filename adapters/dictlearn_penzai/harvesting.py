"""Harvesting activations from a penzai Gemma 3 over a corpus, for training dictionaries.

Texts are tokenized, concatenated and cut into rows of ``seq_len`` tokens, each starting
with BOS (as Gemma Scope did: every training context begins at BOS, and BOS itself is left
out of the data because its activations are huge outliers). The model is truncated after
the deepest block that holds a requested site, so harvesting layer 6 of a 26-layer model
costs 7 blocks and no unembedding. Activations go to shard folders
(``dictlearn.activation_data``) that ``dictlearn.train.fit`` streams, so a corpus larger than
memory works; without ``out`` they are returned as arrays.

With several processes (``dictlearn.distributed.initialize`` first; every process calls
``harvest`` with the same arguments) each runs the model on one contiguous block of the
rows, cut at batch boundaries, and writes its own part of each shard folder (``out`` on a
filesystem they all share); process 0 then lists the parts in process order, so the
folder holds the rows one process would have written, in the same order, and training
on it gives the one-process result.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from tqdm.auto import tqdm

from dictlearn import activation_data
from dictlearn import distributed as dist
from dictlearn_penzai import hooks
from dictlearn_penzai.hookpoint import HookPoint
from dictlearn_penzai.jitting import state_jit
from dictlearn_penzai.sites import Site, as_site, check_site


def token_rows(tokenizer, texts: Iterable[str], seq_len: int, *,
               max_rows: int | None = None) -> Iterator[np.ndarray]:
  """Yields int32 rows (seq_len,) = BOS + the next seq_len - 1 tokens of the corpus."""
  if seq_len < 2:
    raise ValueError(f"seq_len must be at least 2 (BOS + one token), got {seq_len}")
  bos = int(getattr(tokenizer, "bos_id", 2))
  buf: list[int] = []
  rows = 0
  for text in texts:
    buf.extend(tokenizer.encode(text, add_bos=False))
    while len(buf) >= seq_len - 1:
      yield np.asarray([bos] + buf[:seq_len - 1], np.int32)
      del buf[:seq_len - 1]
      rows += 1
      if max_rows is not None and rows >= max_rows:
        return


def truncate(model, sites: Sequence[Site]):
  """The model's body up to the last top-level layer holding one of ``sites``.

  Returns a ``pz.nn.Sequential`` that maps tokens to the residual stream there (no final
  norm, no unembedding): later blocks cannot change what earlier sites see.
  """
  wanted = {(s.kind, s.layer) for s in sites}
  layers = list(model.body.sublayers)
  last = None
  for i, layer in enumerate(layers):
    here = {(h.kind, h.layer) for h in pz.select(layer).at_instances_of(HookPoint).get_sequence()}
    if here & wanted:
      last = i
  if last is None:
    raise ValueError(f"none of {[str(s) for s in sites]} is in this model")
  return pz.nn.Sequential(layers[:last + 1])


@state_jit
def _run(body, tokens, positions):
  return body(tokens, token_positions=positions)


def harvest(model, tokenizer, texts: Iterable[str], sites, *, seq_len: int = 128,
            batch_size: int = 8, skip_bos: bool = True, out: str | os.PathLike | None = None,
            max_tokens: int | None = None, dtype: str = "float32",
            model_name: str | None = None, progress: bool = True):
  """Runs ``model`` over ``texts`` and collects the activations at ``sites``.

  Args:
    model: a penzai Gemma 3 (with HookPoints) from ``load_gemma3``.
    tokenizer: anything with ``encode(text, add_bos=False)`` and ``bos_id``.
    texts: an iterable of strings (consumed once).
    sites: a site or list of sites (``sites.resid_post(6)``, ``"mlp_in.9"``...). For a
      transcoder pass its input and output sites; rows stay paired across sites.
    seq_len: tokens per row, BOS included.
    batch_size: rows per model call (one compiled shape; the last batch is padded).
    skip_bos: leave position 0 (BOS) out of the data.
    out: a folder; each site goes to ``out/<kind>_<layer>/`` as shards. None: return arrays
      (with several processes: this process's rows only).
    max_tokens: stop after about this many harvested tokens (per site).
    dtype: shard dtype, "float32" or "bfloat16" (halves the disk).
    model_name: recorded in the shards' meta.json.
    progress: tqdm bar over tokens.

  Returns:
    ``{site: folder path}`` with ``out``, else ``{site: float32 array (tokens, d)}``.
  """
  site_list = [check_site(model, as_site(s)) for s in
               ([sites] if isinstance(sites, (str, Site)) else sites)]
  body = hooks.capture(truncate(model, site_list), site_list)
  per_row = seq_len - 1 if skip_bos else seq_len
  max_rows = None if max_tokens is None else max(1, -(-max_tokens // per_row))
  rows = token_rows(tokenizer, texts, seq_len, max_rows=max_rows)
  processes = jax.process_count()
  if processes > 1:
    # Every process tokenizes the corpus (cheap next to the model) up to its block.
    if max_rows is None:
      rows = list(rows)  # The blocks need the total.
    start, stop = dist.process_block(len(rows) if max_rows is None else max_rows,
                                     align=batch_size)
    rows = itertools.islice(rows, start, stop)
    max_rows = stop - start  # This process's share, for the bar.

  writers, arrays = {}, {s: [] for s in site_list}
  bar = tqdm(total=None if max_rows is None else max_rows * per_row, unit="tok",
             desc="harvest", disable=not progress or not dist.is_primary())
  positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch_size, seq_len))
  positions = pz.nx.wrap(positions).tag("batch", "seq")
  try:
    while True:
      batch = [r for _, r in zip(range(batch_size), rows)]
      if not batch:
        break
      n = len(batch)
      tokens = np.zeros((batch_size, seq_len), np.int32)  # Padded rows are dropped below.
      tokens[:n] = np.stack(batch)
      _run(body, pz.nx.wrap(jnp.asarray(tokens)).tag("batch", "seq"), positions)
      cache = hooks.read_cache(body)
      for s in site_list:
        acts = np.asarray(cache.array(s), np.float32)[:n, (1 if skip_bos else 0):]
        acts = acts.reshape(-1, acts.shape[-1])
        if out is None:
          arrays[s].append(acts)
          continue
        if s not in writers:
          writers[s] = activation_data.ShardWriter(
              os.path.join(os.fspath(out), activation_data.ShardWriter.folder_name(s.kind, s.layer)),
              d=acts.shape[-1], site=s.kind, layer=s.layer, dtype=dtype,
              model_name=model_name, hook_point=s.hook_point,
              excludes_bos=skip_bos, extra={"seq_len": seq_len},
              part=dist.process_index() if processes > 1 else None)
        writers[s].append(acts)
      bar.update(n * per_row)
  finally:
    bar.close()
    for w in writers.values():
      w.close()
  if processes > 1:
    return _merge(site_list, writers, arrays, out, seq_len)
  if out is not None:
    if not writers:
      raise ValueError(f"the corpus has fewer than {seq_len - 1} tokens: nothing harvested")
    return {s: w.folder for s, w in writers.items()}
  if not any(arrays.values()):
    raise ValueError(f"the corpus has fewer than {seq_len - 1} tokens: nothing harvested")
  return {s: np.concatenate(a) for s, a in arrays.items()}


def _merge(site_list, writers, arrays, out, seq_len):
  """The many-process ending: rows and width per site from every process, process 0
  merges the parts that hold rows, and everyone waits for the merged folders."""
  def local(s):
    if s in writers:
      return writers[s].meta["rows"], writers[s].d
    return sum(a.shape[0] for a in arrays[s]), arrays[s][0].shape[-1] if arrays[s] else 0
  counts = dist.allgather(np.asarray([local(s) for s in site_list], np.int64))  # (P, sites, 2)
  if not counts[:, :, 0].any():
    raise ValueError(f"the corpus has fewer than {seq_len - 1} tokens: nothing harvested")
  if out is None:
    return {s: (np.concatenate(arrays[s]) if arrays[s]
                else np.zeros((0, int(counts[:, j, 1].max())), np.float32))
            for j, s in enumerate(site_list)}
  folders = {s: os.path.join(os.fspath(out),
                             activation_data.ShardWriter.folder_name(s.kind, s.layer))
             for s in site_list}
  if dist.is_primary():
    for j, s in enumerate(site_list):
      activation_data.merge_parts(folders[s], [p for p in range(counts.shape[0])
                                               if counts[p, j, 0] > 0])
  dist.barrier("dictlearn harvest: parts merged")
  return folders
