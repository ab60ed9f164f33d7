"""Feature dashboards: what a latent means, collected in one streamed pass over a corpus.

``DashboardCollector`` keeps, for each tracked latent and without ever holding the
(tokens x width) activation matrix of the corpus:

- the ``k`` top-activating tokens: per batch, the running (latents, k) best are merged with
  the batch's best by ``lax.top_k`` over their concatenation. Each kept example stores its
  sequence index, its position, and the windows of token ids and of that latent's
  activations around it (``window = (left, right)`` tokens, clipped at the sequence's ends,
  padding left out). Ties go to the token streamed first (``lax.top_k`` puts the lower
  index first and the running list comes before the batch), so a dense search sorted by
  (value descending, stream order) gives the same list;
- a uniform sample of ``sample_size`` fired tokens (a bottom-k sketch: each (sequence,
  position, latent) gets a fixed pseudo-random priority from an integer hash, the highest
  priorities are kept, merged per batch like the top-k), so the sample is the same however
  the corpus is cut into batches. At the end it is split into ``n_quantiles`` quantile bins
  (equal counts of the sampled activations, edges from ``np.quantile``; not SAEDashboard's
  equal-width intervals, whose upper bins a uniform sample rarely reaches) and each bin
  gives ``examples_per_quantile`` examples (its highest priorities: uniform within the
  bin);
- the activation density (fired tokens / kept tokens, fired meaning > 0), act max and min
  over kept tokens, and a histogram of the fired activations over fixed log-spaced bins
  (``HIST_EDGES``: 10 a decade from 1e-3 to 1e5, values outside counted in the end bins;
  fixed bins need no running maximum, so counts add exactly across batches).

Kept tokens are those of ``mask`` (the adapter passes "not BOS, not padding",
``dictlearn.evals.token_mask``); ``valid`` (default ``mask``) says which tokens windows may
show (not padding), with activations outside ``mask`` shown as 0.

Only the tracked latents are computed: a JumpReLU latent depends only on its own encoder
column, bias and threshold, so ``select_latents(d, latents)`` (a dictionary of those
columns) encodes them exactly; its float32 values can differ from the full encode's
columns in the last bits (the matmul sums in another order).

Output (``write``): per latent ``features/<scan>/<feature>.json`` in the feature schema
circuit-tracer's frontend reads (``feature_json``), with the page ``<feature>.html``
beside it, and ``index.html``. ``<feature>`` is the Cantor pairing of (layer, latent), the
``feature`` field ``dictlearn.graphs.to_json`` gives a graph's feature nodes, and ``<scan>``
the graph's ``metadata["scan"]``: circuit-tracer's frontend loads a node's file from
``features/<scan>/<feature>.json``, and ``feature_file`` / ``link_graph`` map graph nodes
to these files.

Shapes: acts (batch, seq, n) with n = len(latents); x (batch, seq, d_in); tokens, mask,
valid (batch, seq); seq_ids (batch,).
"""

from __future__ import annotations

import dataclasses
import functools
import html
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn import graphs, report, sites
from dictlearn.dictionary import DictMeta, encode

HIST_EDGES = np.logspace(-3, 5, 81).astype(np.float32)
TOP_NAME = "Top activations"


# ----------------------------------------------------------------------------- latents


def parse_latents(spec: str, width: int) -> np.ndarray:
  """Latent indices from ``"0:200"``, ``"5"``, ``"1,7,9"``, ``"0:10,42"`` or ``"all"``.

  Raises:
    ValueError: naming the part that is not a latent of a ``width``-wide dictionary.
  """
  out: list[int] = []
  for part in str(spec).replace(" ", "").split(","):
    try:
      if part in ("all", ":"):
        out.extend(range(width))
      elif ":" in part:
        a, b = part.split(":")
        lo, hi = int(a or 0), int(b) if b else width
        if not 0 <= lo < hi <= width:
          raise ValueError
        out.extend(range(lo, hi))
      else:
        i = int(part)
        if not 0 <= i < width:
          raise ValueError
        out.append(i)
    except ValueError:
      raise ValueError(
          f"latents {spec!r}: {part!r} is not a latent range of this {width}-wide dictionary; "
          f"write indices in [0, {width}) as 'start:stop' (e.g. 0:{min(200, width)}), 'i', "
          "'i,j,k' or 'all'") from None
  return np.array(sorted(set(out)), np.int64)


def select_latents(d, latents):
  """The dictionary of ``latents`` alone: encoder columns, biases, thresholds and decoder
  rows gathered. ``encode(select_latents(d, ls), x)`` is ``encode(d, x)[..., ls]``."""
  idx = jnp.asarray(np.asarray(latents, np.int64))
  return d.replace(w_enc=d.w_enc[:, idx], b_enc=d.b_enc[idx], threshold=d.threshold[idx],
                   w_dec=d.w_dec[idx])


def feature_index(layer: int, latent: int) -> int:
  """The Cantor pairing of (layer, latent): a graph feature node's ``feature`` field and
  its feature file's name."""
  return (layer + latent) * (layer + latent + 1) // 2 + latent


def _check_scan(scan: str) -> str:
  parts = str(scan).split("/")
  if str(scan).startswith("/") or "\\" in scan or "\x00" in scan or any(
      p in (".", "..") for p in parts):
    raise ValueError(f"scan {scan!r} must be a relative name (no '..', '\\' or leading '/'), "
                     "e.g. 'gemma-3-270m-transcoders'")
  return str(scan)


def feature_file(node: dict, scan: str = "") -> str:
  """``features/<scan>/<feature>.json``: where circuit-tracer's frontend (and ``write``)
  puts the feature file of graph node ``node`` (a ``graphs.to_json`` feature node)."""
  return "/".join(p for p in ("features", _check_scan(scan), f"{int(node['feature'])}.json")
                  if p)


def link_graph(graph: dict, root, *, relative_to=None) -> int:
  """Sets ``dashboard_url`` on each feature node of a graph file dict whose dashboard page
  exists under ``root`` (the folder ``write`` wrote), for ``dictlearn.graph_view``; the
  URL is relative to the folder ``relative_to`` (default: the working directory). Returns
  how many nodes were linked."""
  scan = str(graph.get("metadata", {}).get("scan", ""))
  base = Path(relative_to or ".").resolve()
  n = 0
  for node in graph.get("nodes", []):
    if node.get("feature_type") != graphs.FEATURE:
      continue
    page = Path(root, feature_file(node, scan)).with_suffix(".html")
    if page.exists():
      node["dashboard_url"] = quote(Path(os.path.relpath(page.resolve(), base)).as_posix())
      n += 1
  return n


# ----------------------------------------------------------------------------- streaming


def _priority(seq, pos, latent, seed: int):
  """A pseudo-random float in [0, 2^24) per (sequence, position, latent): a murmur-style
  mix of the three, so the sample never depends on how the corpus was batched."""
  u = jnp.uint32
  h = (seq.astype(u) * u(0x9E3779B1) + pos.astype(u) * u(0x85EBCA77)
       + latent.astype(u) * u(0xC2B2AE3D) + u(seed & 0xFFFFFFFF))
  h = (h ^ (h >> 16)) * u(0x7FEB352D)
  h = (h ^ (h >> 15)) * u(0x846CA68B)
  h = h ^ (h >> 16)
  return (h >> 8).astype(jnp.float32)  # 24 bits: exact in float32


def _windows(idx, seq_len, tokens, acts, mask, valid, left, right):
  """(n, m, W) token ids (-1 outside the sequence or at padding) and activations (0 where
  not kept) around flat token indices idx (n, m) of the batch."""
  b, p = idx // seq_len, idx % seq_len
  at = p[..., None] + jnp.arange(-left, right + 1)
  inside = (at >= 0) & (at < seq_len)
  at = jnp.clip(at, 0, seq_len - 1)
  bb = jnp.broadcast_to(b[..., None], at.shape)
  ok = inside & valid[bb, at]
  lat = jnp.arange(idx.shape[0])[:, None, None]
  tok = jnp.where(ok, tokens[bb, at], -1)
  act = jnp.where(ok & mask[bb, at], acts[bb, at, lat], 0.0)
  return tok, act


def _merge(run, new, m):
  """The best m of running and batch candidates: dicts of (n, ·, ...) arrays ranked by
  ``key``; the running ones first, so ties keep the earlier token."""
  cat = {f: jnp.concatenate([run[f], new[f]], axis=1) for f in run}
  _, j = jax.lax.top_k(cat["key"], m)
  return {f: jnp.take_along_axis(v, j.reshape(j.shape + (1,) * (v.ndim - 2)), axis=1)
          for f, v in cat.items()}


def _candidates(key, m, seq_ids, seq_len, tokens, acts, mask, valid, left, right):
  """The batch's best m per latent by ``key`` (batch, seq, n), with locations and windows."""
  flat = key.reshape(-1, key.shape[-1]).T  # (n, batch * seq), row-major: stream order
  k, idx = jax.lax.top_k(flat, min(m, flat.shape[1]))
  tok, act = _windows(idx, seq_len, tokens, acts, mask, valid, left, right)
  # 0 where not kept (BOS, padding), so "value > 0" alone tells a fired example
  kept = jnp.where(mask[..., None], acts, 0.0).reshape(-1, acts.shape[-1]).T
  value = jnp.take_along_axis(kept, idx, axis=1)
  return {"key": k, "value": value, "seq": seq_ids[idx // seq_len], "pos": idx % seq_len,
          "tokens": tok, "acts": act}


@functools.partial(jax.jit, static_argnames=("k", "r", "left", "right", "seed",
                                             "compute_dtype"))
def _update(state, inputs, tokens, mask, valid, seq_ids, labels, sub, *, k, r, left, right,
            seed, compute_dtype):
  acts = inputs if sub is None else encode(sub, inputs, compute_dtype=compute_dtype)
  acts = acts.astype(jnp.float32)
  seq_len = acts.shape[1]
  mask = mask & valid
  fired = mask[..., None] & (acts > 0)
  kept = jnp.where(mask[..., None], acts, -jnp.inf)
  n = acts.shape[-1]
  edges = jnp.asarray(HIST_EDGES)
  bins = jnp.clip(jnp.searchsorted(edges, acts, side="right") - 1, 0, len(HIST_EDGES) - 2)
  lat = jnp.broadcast_to(jnp.arange(n), acts.shape)
  win = dict(seq_ids=seq_ids, seq_len=seq_len, tokens=tokens, acts=acts, mask=mask,
             valid=valid, left=left, right=right)
  seq = jnp.broadcast_to(seq_ids[:, None, None], acts.shape)
  pos = jnp.broadcast_to(jnp.arange(seq_len)[None, :, None], acts.shape)
  pri = jnp.where(fired, _priority(seq, pos, jnp.broadcast_to(labels, acts.shape), seed), -1.0)
  return {
      "kept": state["kept"] + mask.sum(dtype=jnp.int32),
      "fired": state["fired"] + fired.sum((0, 1), dtype=jnp.int32),
      "act_max": jnp.maximum(state["act_max"], kept.max((0, 1))),
      "act_min": jnp.minimum(state["act_min"], jnp.where(mask[..., None], acts, jnp.inf)
                             .min((0, 1))),
      "hist": state["hist"].at[lat, bins].add(fired.astype(jnp.int32)),
      "top": _merge(state["top"], _candidates(kept, k, **win), k),
      "sample": _merge(state["sample"], _candidates(pri, r, **win), r),
  }


@dataclasses.dataclass(frozen=True)
class Example:
  """One context: ``tokens`` (ids) and ``acts`` around the token at ``tokens[index]``,
  which is position ``pos`` of sequence ``seq`` and has activation ``value``."""

  value: float
  seq: int
  pos: int
  tokens: list[int]
  acts: list[float]
  index: int


@dataclasses.dataclass(frozen=True)
class Quantile:
  """A bin [lo, hi] of the sampled activations and examples from it."""

  lo: float
  hi: float
  examples: list[Example]


@dataclasses.dataclass(frozen=True)
class Feature:
  """A latent's dashboard data (``density`` = fired / kept tokens)."""

  latent: int
  fired: int
  density: float
  act_max: float
  act_min: float
  histogram: np.ndarray
  top: list[Example]
  quantiles: list[Quantile]
  quantile_values: list[float]


@dataclasses.dataclass(frozen=True)
class Dashboards:
  """``Feature`` per tracked latent, the kept-token count, the histogram edges, and what
  the dictionary is (``info``: name, kind, layer, site_in, site_out; ``decoder`` (n, d_out):
  the tracked latents' decoder rows, for the logit lens)."""

  features: list[Feature]
  tokens: int
  hist_edges: np.ndarray
  info: dict
  decoder: np.ndarray | None = None


class DashboardCollector:
  """Streams batches into per-latent dashboard statistics (see the module docstring).

  Args:
    latents: the tracked latents' indices (n,) (``parse_latents`` reads ``"0:200"``).
    dictionary: optional JumpReLU SAE or transcoder: enables ``add_inputs`` (encode of the
      tracked latents and the merge in one compiled call) and fills ``info`` and the
      decoder rows from it.
    k: top examples per latent.
    n_quantiles, examples_per_quantile: quantile bins and examples from each.
    window: (left, right) tokens of context around an example's token.
    sample_size: fired tokens sampled per latent (default 4 x n_quantiles x per bin).
    seed: of the sample's priorities.
    info: overrides of ``Dashboards.info`` (e.g. ``name``, sites).
  """

  def __init__(self, latents, *, dictionary=None, k: int = 20, n_quantiles: int = 5,
               examples_per_quantile: int = 5, window: tuple[int, int] = (12, 4),
               sample_size: int | None = None, seed: int = 0, info: dict | None = None,
               compute_dtype=jnp.float32):
    self.latents = np.asarray(latents, np.int64).reshape(-1)
    if self.latents.size == 0:
      raise ValueError("no latents to track")
    if len(set(self.latents.tolist())) != self.latents.size or self.latents.min() < 0:
      raise ValueError("latents must be distinct non-negative indices")
    if dictionary is not None and self.latents.max() >= dictionary.width:
      raise ValueError(f"latent {int(self.latents.max())} is not in this "
                       f"{dictionary.width}-wide dictionary")
    if min(k, n_quantiles, examples_per_quantile) < 1 or min(window) < 0:
      raise ValueError("k, n_quantiles and examples_per_quantile must be >= 1 and the "
                       "window sides >= 0")
    self.k, self.n_quantiles, self.per_quantile = int(k), int(n_quantiles), int(
        examples_per_quantile)
    self.window = (int(window[0]), int(window[1]))
    self.sample_size = int(sample_size or 4 * n_quantiles * examples_per_quantile)
    self.seed, self.compute_dtype = int(seed), compute_dtype
    self._sub = None
    if dictionary is not None:  # metadata is static under jit: same-shape dictionaries
      sub = select_latents(dictionary, self.latents)  # share one compilation without it
      self._sub = sub.replace(meta=DictMeta(kind=sub.kind))
    self.info = {"name": "", "kind": None, "layer": None, "site_in": None, "site_out": None}
    if dictionary is not None:
      self.info["kind"] = getattr(dictionary, "kind", None)
      try:
        src, dst = sites.read_write(dictionary)
        self.info.update(layer=src.layer, site_in=str(src), site_out=str(dst))
      except ValueError:  # no metadata: the caller may name the sites in info
        pass
    self.info.update(info or {})
    n, w = self.latents.size, sum(self.window) + 1

    def slots(m):
      return {"key": jnp.full((n, m), -jnp.inf), "value": jnp.zeros((n, m)),
              "seq": jnp.full((n, m), -1, jnp.int32), "pos": jnp.full((n, m), -1, jnp.int32),
              "tokens": jnp.full((n, m, w), -1, jnp.int32), "acts": jnp.zeros((n, m, w))}

    self._state = {"kept": jnp.int32(0), "fired": jnp.zeros(n, jnp.int32),
                   "act_max": jnp.full(n, -jnp.inf), "act_min": jnp.full(n, jnp.inf),
                   "hist": jnp.zeros((n, len(HIST_EDGES) - 1), jnp.int32),
                   "top": slots(self.k), "sample": slots(self.sample_size)}
    self._labels = jnp.asarray(self.latents, jnp.int32)
    self._rows = 0

  def add(self, acts, tokens, mask, *, valid=None, seq_ids=None) -> None:
    """Adds a batch of the tracked latents' activations acts (batch, seq, n)."""
    acts = jnp.asarray(acts)
    if acts.ndim != 3 or acts.shape[-1] != self.latents.size:
      raise ValueError(f"acts must be (batch, seq, {self.latents.size}) (one column per "
                       f"tracked latent) but has shape {tuple(acts.shape)}")
    self._add(acts, None, tokens, mask, valid, seq_ids)

  def add_inputs(self, x, tokens, mask, *, valid=None, seq_ids=None) -> None:
    """Adds a batch of the dictionary's inputs x (batch, seq, d_in), encoding only the
    tracked latents."""
    if self._sub is None:
      raise ValueError("add_inputs needs DashboardCollector(..., dictionary=d)")
    x = jnp.asarray(x)
    if x.ndim != 3 or x.shape[-1] != self._sub.d_in:
      raise ValueError(f"x must be (batch, seq, d_in={self._sub.d_in}) but has shape "
                       f"{tuple(x.shape)}")
    self._add(x, self._sub, tokens, mask, valid, seq_ids)

  def _add(self, inputs, sub, tokens, mask, valid, seq_ids):
    b, s = inputs.shape[:2]
    tokens = jnp.asarray(tokens, jnp.int32)
    mask = jnp.asarray(mask, bool)
    valid = mask if valid is None else jnp.asarray(valid, bool)
    for name, a in (("tokens", tokens), ("mask", mask), ("valid", valid)):
      if a.shape != (b, s):
        raise ValueError(f"{name} must be (batch, seq) = {(b, s)} but has {tuple(a.shape)}")
    if seq_ids is None:
      seq_ids = np.arange(self._rows, self._rows + b)
    seq_ids = jnp.asarray(seq_ids, jnp.int32).reshape(b)
    self._rows += b
    self._state = _update(self._state, inputs, tokens, mask, valid, seq_ids, self._labels,
                          sub, k=self.k, r=self.sample_size, left=self.window[0],
                          right=self.window[1], seed=self.seed,
                          compute_dtype=self.compute_dtype)

  def results(self) -> Dashboards:
    """The dashboards of everything added so far."""
    st = jax.tree_util.tree_map(np.asarray, self._state)
    kept = int(st["kept"])
    feats = []
    for j, latent in enumerate(self.latents.tolist()):
      top = _examples(st["top"], j, self.window[0])
      sample = _examples(st["sample"], j, self.window[0])
      edges, bins = _quantiles(sample, self.n_quantiles, self.per_quantile)
      lo = float(st["act_min"][j]) if kept else 0.0
      hi = float(st["act_max"][j]) if kept else 0.0
      feats.append(Feature(latent=latent, fired=int(st["fired"][j]),
                           density=int(st["fired"][j]) / kept if kept else 0.0,
                           act_max=hi, act_min=lo, histogram=st["hist"][j], top=top,
                           quantiles=bins, quantile_values=edges))
    decoder = None if self._sub is None else np.asarray(self._sub.w_dec, np.float32)
    return Dashboards(feats, kept, HIST_EDGES.copy(), dict(self.info), decoder)


def _examples(slots, j: int, left: int) -> list[Example]:
  """Latent j's fired examples from streamed slots, best first (pads cut from windows)."""
  out = []
  for m in np.flatnonzero(slots["value"][j] > 0).tolist():
    tok, act = slots["tokens"][j, m], slots["acts"][j, m]
    ok = tok >= 0
    out.append(Example(float(slots["value"][j, m]), int(slots["seq"][j, m]),
                       int(slots["pos"][j, m]), tok[ok].tolist(),
                       act[ok].astype(float).tolist(), int(ok[:left].sum())))
  return out


def _quantiles(sample: list[Example], n: int, per: int) -> tuple[list[float], list[Quantile]]:
  """Quantile edges (n + 1,) of the sampled values and each bin's first ``per`` examples
  (the sample is in priority order, so these are a uniform pick); highest bin first."""
  if not sample:
    return [], []
  values = np.array([e.value for e in sample], np.float64)
  edges = np.quantile(values, np.linspace(0, 1, n + 1))
  which = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, n - 1)
  bins = []
  for b in range(n - 1, -1, -1):
    chosen = [sample[i] for i in np.flatnonzero(which == b)[:per].tolist()]
    if chosen:
      bins.append(Quantile(float(edges[b]), float(edges[b + 1]), chosen))
  return edges.tolist(), bins


# ----------------------------------------------------------------------------- logit lens


def logit_lens(rows, unembedding, k: int = 10, *, chunk: int = 64):
  """Top and bottom ``k`` tokens of each row's logits ``rows @ W_U``.

  Args:
    rows: (n, d) directions (decoder rows: for a transcoder, what it writes at mlp_out).
    unembedding: W_U (d, vocab), or a callable mapping (m, d) rows to (m, vocab) logits.
    chunk: rows per call (a vocabulary of 262k makes each row's logits 1 MB).

  Returns:
    (top ids, top logits, bottom ids, bottom logits), each (n, k), strongest first.
  """
  rows = jnp.asarray(rows, jnp.float32)
  fn = unembedding if callable(unembedding) else (
      lambda r, w=jnp.asarray(unembedding, jnp.float32): r @ w)
  out = [[], [], [], []]
  for i in range(0, rows.shape[0], chunk):
    logits = jnp.asarray(fn(rows[i:i + chunk]), jnp.float32)
    kk = min(int(k), logits.shape[-1])
    tv, ti = jax.lax.top_k(logits, kk)
    bv, bi = jax.lax.top_k(-logits, kk)
    for acc, a in zip(out, (ti, tv, bi, -bv)):
      acc.append(np.asarray(a))
  return tuple(np.concatenate(a) for a in out)


# ----------------------------------------------------------------------------- files


def _example_json(e: Example, text, repeated: bool) -> dict:
  return {"tokens": [text(t) for t in e.tokens], "tokens_acts_list": e.acts,
          "train_token_ind": e.index, "is_repeated_datapoint": repeated}


def feature_json(dash: Dashboards, j: int, text: Callable[[int], str], *,
                 lens: tuple | None = None, transcoder_id: str | None = None) -> dict:
  """Latent j's feature file in the schema circuit-tracer's frontend reads:
  ``examples_quantiles`` (top activations first, then the quantile bins, highest first;
  ``is_repeated_datapoint`` marks a bin example also among the top ones), ``top_logits``,
  ``bottom_logits``, ``act_min``, ``act_max``, ``quantile_values`` (the bin edges),
  ``histogram`` (counts of fired activations in the bins ``dictlearn.histogram_edges``),
  ``activation_frequency`` (the density); our extras under ``dictlearn``. ``text``: token
  id -> string; ``lens``: ``logit_lens``'s result for the tracked latents."""
  f = dash.features[j]
  top_at = {(e.seq, e.pos) for e in f.top}
  quantiles = [{"quantile_name": TOP_NAME,
                "examples": [_example_json(e, text, False) for e in f.top]}]
  n = len(f.quantiles)
  for i, q in enumerate(f.quantiles):
    quantiles.append({"quantile_name": f"Quantile {n - i}/{n}: {q.lo:.4g} to {q.hi:.4g}",
                      "examples": [_example_json(e, text, (e.seq, e.pos) in top_at)
                                   for e in q.examples]})
  top_ids, top_v, bottom_ids, bottom_v = (a[j] for a in lens) if lens is not None else (
      [],) * 4
  info = dash.info
  return {
      "transcoder_id": str(transcoder_id if transcoder_id is not None else info.get("name", "")),
      "index": f.latent, "examples_quantiles": quantiles,
      "top_logits": [text(int(t)) for t in top_ids],
      "bottom_logits": [text(int(t)) for t in bottom_ids],
      "act_min": f.act_min, "act_max": f.act_max, "quantile_values": f.quantile_values,
      "histogram": f.histogram.astype(float).tolist(), "activation_frequency": f.density,
      "dictlearn": {"layer": info.get("layer"), "kind": info.get("kind"),
                    "site_in": info.get("site_in"), "site_out": info.get("site_out"),
                    "fired": f.fired, "tokens": dash.tokens,
                    "histogram_edges": dash.hist_edges.astype(float).tolist(),
                    "top_logit_values": [float(v) for v in top_v],
                    "bottom_logit_values": [float(v) for v in bottom_v]}}


def _visible(token: str) -> str:
  # Whitespace-only tokens would vanish: newlines and tabs as symbols, then escaped.
  return html.escape(token.replace("\n", "\u21b5").replace("\t", "\u2192"))


def _context(e: Example, text, vmax: float) -> str:
  spans = []
  for i, (t, a) in enumerate(zip(e.tokens, e.acts)):
    alpha = min(max(a / vmax, 0.0), 1.0) if vmax > 0 else 0.0
    tip = html.escape(f"{text(t)!r}: {a:.4g}", quote=True)
    edge = ' class="max"' if i == e.index else ""
    spans.append(f'<span{edge} title="{tip}" style="background:rgba(255,120,0,{alpha:.3f})">'
                 f"{_visible(text(t))}</span>")
  return (f'<div class="ctx"><span class="v">{e.value:.3f}</span> '
          f'<span class="where">seq {e.seq} @{e.pos}</span> {"".join(spans)}</div>')


def _histogram_svg(f: Feature, edges: np.ndarray) -> str:
  nz = np.flatnonzero(f.histogram)
  if not nz.size:
    return '<p class="note">never fired</p>'
  lo, hi = int(nz[0]), int(nz[-1]) + 1
  counts = f.histogram[lo:hi]
  w, h, bw = 640, 160, 640 / (hi - lo)
  top = float(counts.max())
  bars = "".join(
      f'<rect x="{i * bw:.1f}" y="{h - h * c / top:.1f}" width="{max(bw - 1, 1):.1f}" '
      f'height="{h * c / top:.1f}" fill="#e67300"><title>{edges[lo + i]:.3g} to '
      f'{edges[lo + i + 1]:.3g}: {int(c)}</title></rect>' for i, c in enumerate(counts))
  return (f'<svg id="histogram" width="{w}" height="{h + 20}" viewBox="0 0 {w} {h + 20}">'
          f'{bars}<text x="0" y="{h + 15}" font-size="11">{edges[lo]:.3g}</text>'
          f'<text x="{w}" y="{h + 15}" font-size="11" text-anchor="end">{edges[hi]:.3g}</text>'
          f"</svg><p class=\"note\">fired activations, log-spaced bins</p>")


_CSS = """<style>
.ctx { font-family: monospace; white-space: pre-wrap; margin: 2px 0; line-height: 1.7; }
.ctx .v { color: #555; display: inline-block; width: 5em; }
.ctx .where { color: #999; font-size: 80%; }
.ctx span.max { outline: 1px solid #a40; }
</style>"""


def feature_page(dash: Dashboards, j: int, text, *, lens=None, index_href="index.html") -> str:
  """Latent j's self-contained page: sites, density, histogram, logit lens, top and
  quantile contexts (every token shaded by its activation, its value in the tooltip)."""
  f, info = dash.features[j], dash.info
  esc = lambda v: html.escape(str(v))  # noqa: E731
  rows = [("dictionary", info.get("name") or ""), ("kind", info.get("kind")),
          ("reads", info.get("site_in")), ("writes", info.get("site_out")),
          ("density", f"{f.density:.4g} ({f.fired} of {dash.tokens} tokens)"),
          ("act max", f"{f.act_max:.4g}"), ("act min", f"{f.act_min:.4g}")]
  table = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
  lens_html = ""
  if lens is not None:
    cells = lambda ids, vals: "".join(  # noqa: E731
        f"<tr><td><code>{_visible(text(int(t)))}</code></td><td>{v:.3f}</td></tr>"
        for t, v in zip(ids[j], vals[j]))
    lens_html = (f'<h2>Logit lens</h2><div style="display:flex;gap:2em">'
                 f'<table id="top-logits"><tr><th>top</th><th>logit</th></tr>'
                 f"{cells(lens[0], lens[1])}</table>"
                 f'<table id="bottom-logits"><tr><th>bottom</th><th>logit</th></tr>'
                 f"{cells(lens[2], lens[3])}</table></div>")
  vmax = f.act_max
  top = "".join(_context(e, text, vmax) for e in f.top) or '<p class="note">none</p>'
  qs = "".join(f"<h3>{q.lo:.4g} to {q.hi:.4g}</h3>" + "".join(
      _context(e, text, vmax) for e in q.examples) for q in f.quantiles)
  body = (f'{_CSS}<p><a href="{html.escape(index_href, quote=True)}">all latents</a></p>'
          f'<table id="stats">{table}</table><h2>Activations</h2>'
          f"{_histogram_svg(f, dash.hist_edges)}{lens_html}"
          f'<h2>{TOP_NAME}</h2><div id="top">{top}</div>'
          f'<h2>Quantiles</h2><div id="quantiles">{qs}</div>')
  return report.page(f"latent {f.latent}" + (f" of {info['name']}" if info.get("name") else ""),
                     body)


_FILTER_JS = """<script>
(function () {
  var box = document.getElementById("search");
  var rows = Array.prototype.slice.call(document.querySelectorAll("#latents tr[data-latent]"));
  function apply() {
    var q = box.value.trim().toLowerCase(), num = /^[0-9]+$/.test(q), shown = 0;
    rows.forEach(function (r) {
      var hit = !q || (num ? r.getAttribute("data-latent") === q
                           : r.textContent.toLowerCase().indexOf(q) >= 0);
      r.hidden = !hit;
      shown += hit ? 1 : 0;
    });
    document.getElementById("shown").textContent = String(shown);
  }
  box.addEventListener("input", apply);
  var q = new URLSearchParams(location.search).get("q");
  if (q !== null) box.value = q;
  apply();
})();
</script>"""


def index_page(dash: Dashboards, text, pages: Sequence[str], *, lens=None) -> str:
  """All tracked latents by density (highest first), linking to ``pages`` (one href per
  latent); the search box filters by latent index or by token text (``?q=`` prefills it)."""
  order = sorted(range(len(dash.features)), key=lambda j: (-dash.features[j].density, j))
  rows = []
  for j in order:
    f = dash.features[j]
    toks = list(dict.fromkeys(text(e.tokens[e.index]) for e in f.top))[:8]
    logits = [text(int(t)) for t in lens[0][j][:5]] if lens is not None else []
    rows.append(
        f'<tr data-latent="{f.latent}"><td><a href="{html.escape(pages[j], quote=True)}">'
        f"{f.latent}</a></td><td>{f.density:.4g}</td><td>{f.act_max:.4g}</td>"
        f"<td>{' '.join(f'<code>{_visible(t)}</code>' for t in toks)}</td>"
        f"<td>{' '.join(f'<code>{_visible(t)}</code>' for t in logits)}</td></tr>")
  info = dash.info
  where = " -> ".join(dict.fromkeys(html.escape(str(info[k])) for k in ("site_in", "site_out")
                                    if info.get(k)))  # an SAE's one site once
  body = (f'<p>{len(rows)} latents{" at " + where if where else ""}, {dash.tokens} tokens. '
          '<input id="search" type="search" placeholder="latent index or token text"> '
          '<span id="shown"></span> shown</p>'
          '<table id="latents"><tr><th>latent</th><th>density</th><th>act max</th>'
          f'<th>top tokens</th><th>top logits</th></tr>{"".join(rows)}</table>{_FILTER_JS}')
  return report.page(f"dashboards of {info['name']}" if info.get("name") else "dashboards",
                     body)


def write(dash: Dashboards, out, text: Callable[[int], str], *, unembedding=None,
          scan: str = "", transcoder_id: str | None = None, lens_k: int = 10) -> list[Path]:
  """Writes ``out/features/<scan>/<feature>.json`` and ``.html`` per latent and
  ``out/index.html``; returns the paths (index last).

  ``text``: token id -> string (a tokenizer's one-token decode); ``unembedding``: W_U
  (d, vocab) or a callable (see ``logit_lens``), for the decoder rows' logit lens (left
  out without one, or when the dictionary writes something other than d-vectors);
  ``scan``: the graphs' ``metadata["scan"]`` these dashboards serve.
  """
  out = Path(out)
  folder = out / "features" / _check_scan(scan)
  folder.mkdir(parents=True, exist_ok=True)
  names: dict[int, str] = {}

  def cached(i: int) -> str:
    if i not in names:
      names[i] = str(text(int(i)))
    return names[i]

  lens = None
  if unembedding is not None and dash.decoder is not None:
    d = getattr(unembedding, "shape", (dash.decoder.shape[1],))[0]
    if d == dash.decoder.shape[1]:
      lens = logit_lens(dash.decoder, unembedding, lens_k)
  layer = dash.info.get("layer") or 0
  paths, pages = [], []
  index_href = os.path.relpath(out / "index.html", folder)
  for j, f in enumerate(dash.features):
    stem = folder / str(feature_index(layer, f.latent))
    doc = feature_json(dash, j, cached, lens=lens, transcoder_id=transcoder_id)
    stem.with_suffix(".json").write_text(json.dumps(_finite(doc)), encoding="utf-8")
    stem.with_suffix(".html").write_text(
        feature_page(dash, j, cached, lens=lens, index_href=Path(index_href).as_posix()),
        encoding="utf-8")
    paths += [stem.with_suffix(".json"), stem.with_suffix(".html")]
    pages.append(quote(stem.with_suffix(".html").relative_to(out).as_posix()))
  index = out / "index.html"
  index.write_text(index_page(dash, cached, pages, lens=lens), encoding="utf-8")
  return [*paths, index]


def _finite(o: Any):
  """``o`` with NaN and infinities as None (strict JSON)."""
  if isinstance(o, dict):
    return {k: _finite(v) for k, v in o.items()}
  if isinstance(o, list):
    return [_finite(v) for v in o]
  if isinstance(o, float) and not math.isfinite(o):
    return None
  return o
