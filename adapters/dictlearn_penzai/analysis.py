"""The Gemma Scope 2 tutorial's analyses as functions: top latents, token HTML, logit
lens, reconstruction metrics and per-token loss.

Every statistic leaves BOS out (and padding: pad tokens, id ``pad_id`` = 0 by default, or
positions of -1 in an explicit ``token_positions``):
Gemma Scope 2 dictionaries are not trained on BOS, whose activations are outliers.
The statistics are the core's (``dictlearn.analysis``, one mask rule from
``dictlearn.interventions``); this module wires a penzai model, its sites and the results
together, and adds the logit lens, token HTML and the loss plot.

Shapes: tokens (batch, seq) int; site activations (batch, seq, d); latents
(batch, seq, width); per-token losses (batch, seq - 1), entry t being the loss of
predicting token t + 1.
"""

from __future__ import annotations

import dataclasses
import html
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from dictlearn import analysis, interventions
from dictlearn.analysis import TopLatents  # noqa: F401  (re-exported)
from dictlearn_penzai import hooks
from dictlearn_penzai import layers as L
from dictlearn_penzai.hookpoint import HookPoint
from dictlearn_penzai.sites import Site


def _plain(acts) -> jax.Array:
  """Site activations as a plain array (..., d): NamedArrays are ordered batch, seq, d."""
  if isinstance(acts, pz.nx.NamedArrayBase):
    names = [a for a in ("batch", "seq") if a in acts.named_shape]
    rest = [a for a in acts.named_shape if a not in names]
    if len(rest) != 1:
      raise ValueError(f"expected one feature axis besides batch/seq, got {dict(acts.named_shape)}")
    return acts.unwrap(*names, *rest)
  return jnp.asarray(acts)


def positions_of(tokens, token_positions=None, pad_id: int | None = 0) -> jax.Array:
  """Token positions (batch, seq): ``token_positions`` if given, else from padding
  (``dictlearn.interventions.positions_from_padding``: each row's BOS at 0, pads -1)."""
  ids = hooks.as_tokens(tokens).unwrap("batch", "seq")
  if token_positions is None:
    return interventions.positions_from_padding(ids, pad_id)
  if isinstance(token_positions, pz.nx.NamedArrayBase):
    return jnp.broadcast_to(token_positions.unwrap(*token_positions.named_shape), ids.shape)
  p = jnp.asarray(token_positions)
  return p[None] if p.ndim == 1 else p


def token_mask(tokens, token_positions=None, mask=None, pad_id: int | None = 0) -> jax.Array:
  """(batch, seq) bool: the positions that count (``interventions.active_positions``: not
  BOS, not padding), and'ed with ``mask`` if given."""
  keep = interventions.active_positions(positions_of(tokens, token_positions, pad_id))
  if mask is not None:
    keep = keep & jnp.asarray(mask, bool).reshape(keep.shape)
  return keep


# ------------------------------------------------------------------ top latents


def top_latents(dictionary, acts, k: int = 10, mask=None, *, tokens=None,
                token_positions=None, pad_id: int | None = 0, reduce: str = "max",
                skip_bos: bool = True) -> TopLatents:
  """``dictlearn.analysis.top_latents`` on cached activations, BOS and padding left out.

  Args:
    dictionary: the SAE or transcoder (or its penzai layer).
    acts: activations at its input site: a cached NamedArray (batch, seq, d) or an
      array (batch, seq, d) / (seq, d).
    k: how many latents.
    mask: optional (batch, seq) bool of tokens to count.
    tokens, token_positions, pad_id: where each row's BOS and padding are, as in
      ``token_mask`` (a left-padded row's BOS is not in column 0); with neither, the
      rows are taken as unpadded, BOS first.
    reduce: "max" or "mean" activation over the kept tokens, for the prompt ranking.
    skip_bos: leave BOS out of the prompt ranking.
  """
  x = _plain(acts)
  x = x[None] if x.ndim == 2 else x
  if tokens is not None:
    positions = positions_of(tokens, token_positions, pad_id)
  elif token_positions is not None:
    positions = positions_of(jnp.ones(x.shape[:2], jnp.int32), token_positions, None)
  else:
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
  keep = interventions.active_positions(positions, skip_bos)
  if mask is not None:
    keep = keep & jnp.asarray(mask, bool).reshape(keep.shape)
  return analysis.top_latents(L.core_dictionary(dictionary), x, k, keep, reduce=reduce)


def latent_activations(dictionary, acts, latent: int) -> np.ndarray:
  """One latent's activation at every token: (batch, seq) (or (seq,) for (seq, d) input)."""
  return analysis.latent_activations(L.core_dictionary(dictionary), _plain(acts), latent)


# ------------------------------------------------------------------ token HTML


class TokenActivationHTML(str):
  """An HTML fragment (a str) that notebooks render and ``save`` writes as a full page."""

  def _repr_html_(self) -> str:
    return str(self)

  def save(self, path) -> None:
    page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>token activations"
            f"</title></head><body>{self}</body></html>\n")
    with open(path, "w", encoding="utf-8") as f:
      f.write(page)


def _colour(v: float, vmax: float) -> str:
  a = 0.0 if vmax <= 0 or not np.isfinite(v) else min(abs(v) / vmax, 1.0)
  rgb = "220,38,38" if v >= 0 else "37,99,235"  # red for positive, blue for negative
  return f"rgba({rgb},{a:.3f})"


def _visible(token: str) -> str:
  # Whitespace-only tokens would vanish; show newlines and tabs as symbols.
  return html.escape(token.replace("\n", "\u21b5").replace("\t", "\u2192"), quote=False)


def token_activation_html(tokens_as_strings: Sequence[str], values, title: str | None = None,
                          *, vmax: float | None = None) -> TokenActivationHTML:
  """Tokens with backgrounds coloured by a per-token value; hovering shows the value.

  Self-contained (inline styles, no scripts): shows in a notebook (``_repr_html_``) and
  in a page written with ``.save(path)``. Red for positive, blue for negative values,
  opacity ``|value| / vmax`` (``vmax`` defaults to the largest |value|). Text is escaped.

  Args:
    tokens_as_strings: one string per token (e.g. ``[tokenizer.decode([i]) for i in ids]``).
    values: one number per token (seq,).
    title: optional heading.
    vmax: value that gets full colour.
  """
  vals = np.asarray(values, dtype=np.float64).reshape(-1)
  if len(tokens_as_strings) != vals.shape[0]:
    raise ValueError(f"{len(tokens_as_strings)} tokens but {vals.shape[0]} values")
  finite = vals[np.isfinite(vals)]
  top = float(vmax) if vmax is not None else (float(np.abs(finite).max()) if finite.size else 0.0)
  spans = []
  for i, (tok, v) in enumerate(zip(tokens_as_strings, vals)):
    tip = html.escape(f"#{i} {tok!r}: {v:.4g}", quote=True)
    spans.append(
        f'<span title="{tip}" data-value="{v:.6g}" style="background-color:{_colour(v, top)};'
        'padding:2px 0;border-radius:2px;white-space:pre-wrap;">'
        f"{_visible(str(tok))}</span>")
  head = f"<div style=\"font-weight:bold;margin-bottom:4px;\">{html.escape(title)}</div>" if (
      title) else ""
  legend = (f'<div style="font-size:11px;color:#555;margin-top:6px;">colour scale: '
            f'<span style="background:{_colour(-top, top)};padding:0 6px;">{-top:.3g}</span> '
            f'<span style="padding:0 6px;">0</span> '
            f'<span style="background:{_colour(top, top)};padding:0 6px;">{top:.3g}</span>'
            " (hover a token for its value)</div>")
  body = ('<div class="dictlearn-tokens" style="font-family:monospace;line-height:1.9;'
          f'font-size:14px;">{head}<div>{"".join(spans)}</div>{legend}</div>')
  return TokenActivationHTML(body)


def token_strings(tokenizer, ids) -> list[str]:
  """One display string per token id, via ``tokenizer.decode([id])``."""
  ids = np.asarray(ids).reshape(-1).tolist()
  return [tokenizer.decode([i]) for i in ids]


# ------------------------------------------------------------------ logit lens


@dataclasses.dataclass(frozen=True)
class LogitLens:
  """Tokens a direction pushes up (``top``) and down (``bottom``), strongest first."""

  top_ids: np.ndarray
  top_values: np.ndarray
  bottom_ids: np.ndarray
  bottom_values: np.ndarray
  convention: str
  top_tokens: tuple[str, ...] | None = None
  bottom_tokens: tuple[str, ...] | None = None

  def __str__(self):
    def rows(ids, vals, toks):
      toks = toks or [str(i) for i in ids]
      return [f"{v:>9.3f} | {t!r}" for v, t in zip(vals, toks)]
    return "\n".join([f"logit lens ({self.convention}) top:",
                      *rows(self.top_ids, self.top_values, self.top_tokens), "bottom:",
                      *rows(self.bottom_ids, self.bottom_values, self.bottom_tokens)])


def _body(model):
  body = getattr(model, "body", model)
  while not isinstance(body, pz.nn.Sequential) and hasattr(body, "body"):
    body = body.body
  if not isinstance(body, pz.nn.Sequential):
    raise ValueError("cannot find the model's layer sequence (model.body)")
  return body


def unembedding_tail(model) -> list[pz.nn.Layer]:
  """The layers after the last block (final norm, unembedding, soft-cap)."""
  subs = list(_body(model).sublayers)
  last = max((i for i, s in enumerate(subs)
              if pz.select(s).at_instances_of(HookPoint).count()), default=None)
  if last is None:
    raise ValueError("this model has no HookPoints, so its blocks cannot be found")
  tail = subs[last + 1:]
  if not pz.select(tail).at_instances_of(pz.nn.EmbeddingDecode).count():
    raise ValueError("no tied unembedding (pz.nn.EmbeddingDecode) after the last block")
  return tail


def logit_lens(model, direction, k: int = 10, *, convention: str = "final_norm",
               tokenizer=None) -> LogitLens:
  """Top and bottom tokens of a residual-stream direction (e.g. a decoder row).

  Conventions:
    ``"final_norm"`` (default): the direction goes through the model's final RMSNorm and
      the tied unembedding, as a residual vector would (no logit soft-cap: it is
      monotone and changes no ranking). RMS-normalising one vector is a positive scalar,
      so what differs from "raw" is the norm's per-feature gain (1 + scale), which in
      Gemma is far from uniform and reorders the tokens.
    ``"raw"``: the Gemma Scope 2 tutorial's lens, the raw direction times the
      unembedding (``W_E @ direction``), without the final norm.

  Args:
    model: a penzai Gemma model with HookPoints.
    direction: (d_model,) vector or a single-axis NamedArray.
    k: how many tokens each way.
    tokenizer: optional; with one, the result carries token strings.
  """
  if convention not in ("final_norm", "raw"):
    raise ValueError(f"convention must be 'final_norm' or 'raw', not {convention!r}")
  from dictlearn_penzai.layers import direction_array
  tail = unembedding_tail(model)
  d = direction_array(direction, "embedding")
  if convention == "raw":
    (decode,) = pz.select(tail).at_instances_of(pz.nn.EmbeddingDecode).get_sequence()
    logits = decode(d)
  else:
    x = d
    for layer in tail:
      if isinstance(layer, pz.nn.TanhSoftCap):
        continue
      x = layer(x)
    logits = x
  logits = np.asarray(logits.astype(jnp.float32).unwrap("vocabulary"))
  k = min(int(k), logits.shape[0])
  order = np.argsort(-logits, kind="stable")
  top, bottom = order[:k], order[::-1][:k]
  tt = bt = None
  if tokenizer is not None:
    tt = tuple(tokenizer.decode([int(i)]) for i in top)
    bt = tuple(tokenizer.decode([int(i)]) for i in bottom)
  return LogitLens(top, logits[top], bottom, logits[bottom], convention, tt, bt)


# ------------------------------------------------------------------ reconstruction


@dataclasses.dataclass(frozen=True)
class Runs:
  """A clean and a spliced run of the model on the same tokens.

  Attributes:
    dictionary: the core dictionary; site_in, site_out: where it read and wrote.
    x_in, target: (batch, seq, d) clean activations at those sites.
    tokens: (batch, seq) ids; mask: (batch, seq) bool, the positions that count.
    clean_logits, spliced_logits: (batch, seq, vocab).
  """

  dictionary: object
  site_in: Site
  site_out: Site
  x_in: jax.Array
  target: jax.Array
  tokens: jax.Array
  mask: jax.Array
  clean_logits: jax.Array
  spliced_logits: jax.Array

  def reconstruction(self) -> analysis.Reconstruction:
    """``dictlearn.analysis.reconstruction`` of these runs."""
    return analysis.reconstruction(
        self.dictionary, self.x_in, self.target, self.mask, tokens=self.tokens,
        clean_logits=self.clean_logits, spliced_logits=self.spliced_logits,
        site_in=str(self.site_in), site_out=str(self.site_out))


def _side(token_positions):
  if token_positions is None:
    return {}
  if not isinstance(token_positions, pz.nx.NamedArrayBase):
    token_positions = hooks.as_tokens(token_positions)
  return {"token_positions": token_positions}


def clean_and_spliced(model, tokens, dictionary, site=None, *, token_positions=None,
                      mask=None, pad_id: int | None = 0, jit: bool = True,
                      side_inputs: dict | None = None) -> Runs:
  """Runs ``model`` on ``tokens`` clean (capturing the dictionary's sites) and with the
  dictionary spliced in (BOS untouched). Arguments as in ``reconstruction_report``."""
  src, dst = hooks.read_write_sites(model, dictionary, site)
  tokens = hooks.as_tokens(tokens)
  side = {**(side_inputs or {}), **_side(token_positions)}
  clean, cache = hooks.run_with_cache(model, tokens, [src, dst], jit=jit, pad_id=pad_id, **side)
  spliced = hooks.call(hooks.splice(model, dictionary, site=(src, dst)), tokens, jit=jit,
                       pad_id=pad_id, **side)
  ids = tokens.unwrap("batch", "seq")
  return Runs(L.core_dictionary(dictionary), src, dst, cache.array(src), cache.array(dst),
              ids, token_mask(ids, token_positions, mask, pad_id),
              clean.unwrap("batch", "seq", "vocabulary"),
              spliced.unwrap("batch", "seq", "vocabulary"))


def reconstruction_report(model, tokens, dictionary, site=None, *, token_positions=None,
                          mask=None, pad_id: int | None = 0, jit: bool = True,
                          side_inputs: dict | None = None) -> analysis.Reconstruction:
  """FVU, L0, MSE and delta loss of a dictionary on ``tokens``, BOS and padding left out.

  The dictionary reads its input site; FVU/MSE compare its output with the activations
  at its output site (the same site for an SAE, mlp_out for a transcoder); delta loss is
  the mean next-token loss with the dictionary spliced in (BOS untouched) minus without,
  over targets that are neither BOS nor padding (``dictlearn.analysis.reconstruction``).

  Args:
    tokens: (batch, seq) ids (NamedArray or array).
    site: as in ``hooks.splice`` (default: from the dictionary's metadata).
    token_positions: (batch, seq) positions with -1 for padding; by default they come
      from ``pad_id`` (left or right padding both work).
    mask: optional extra (batch, seq) bool of tokens to count.
    pad_id: the padding id (Gemma: 0); None when the tokens hold no padding.
    side_inputs: more side inputs for both runs, e.g. a prompt's images
      (``dictlearn_penzai.vision.prepare(...).side_inputs``).
  """
  return clean_and_spliced(model, tokens, dictionary, site, token_positions=token_positions,
                           mask=mask, pad_id=pad_id, jit=jit,
                           side_inputs=side_inputs).reconstruction()


@dataclasses.dataclass(frozen=True)
class PerTokenLoss:
  """Next-token loss per position, clean and with the dictionary spliced in.

  clean, spliced: (batch, seq - 1), entry t = loss of predicting token t + 1.
  mask: (batch, seq - 1), True where the target token counts (not BOS, not padding).
  """

  clean: np.ndarray
  spliced: np.ndarray
  mask: np.ndarray

  @property
  def delta(self) -> np.ndarray:
    return self.spliced - self.clean


def per_token_loss(model, tokens, dictionary, site=None, *, token_positions=None,
                   mask=None, pad_id: int | None = 0, jit: bool = True,
                   side_inputs: dict | None = None) -> PerTokenLoss:
  """Clean vs spliced next-token loss at every position.

  Arguments as in ``reconstruction_report``.
  """
  r = reconstruction_report(model, tokens, dictionary, site, token_positions=token_positions,
                            mask=mask, pad_id=pad_id, jit=jit, side_inputs=side_inputs)
  return PerTokenLoss(r.clean_per_token, r.spliced_per_token, r.loss_mask)


def per_token_loss_figure(loss: PerTokenLoss, tokens_as_strings: Sequence[str] | None = None,
                          *, batch_index: int = 0, title: str | None = None,
                          labels: tuple[str, str] = ("clean", "spliced")):
  """A plotly line figure of clean and spliced loss per predicted token.

  Args:
    loss: from ``per_token_loss``.
    tokens_as_strings: the prompt's tokens (seq,) (the x axis shows the predicted ones,
      tokens[1:]); default: positions.
  """
  import plotly.graph_objects as go

  clean = loss.clean[batch_index]
  spliced = loss.spliced[batch_index]
  keep = loss.mask[batch_index]
  x = list(range(1, clean.shape[0] + 1))
  ticks = None
  if tokens_as_strings is not None:
    if len(tokens_as_strings) != clean.shape[0] + 1:
      raise ValueError(f"{len(tokens_as_strings)} tokens for {clean.shape[0]} losses; "
                       "pass the whole prompt (seq tokens for seq - 1 losses)")
    ticks = [repr(t)[1:-1] for t in tokens_as_strings[1:]]
  fig = go.Figure()
  for name, ys in zip(labels, (clean, spliced)):
    shown = [float(v) if k else None for v, k in zip(ys, keep)]
    fig.add_trace(go.Scatter(x=x, y=shown, mode="lines+markers", name=name,
                             text=ticks, hovertemplate="%{text}: %{y:.3f}" if ticks else None))
  fig.update_layout(
      title=title or "Next-token loss per token", yaxis_title="loss (nats)",
      xaxis=dict(title="predicted token", tickvals=x if ticks else None, ticktext=ticks,
                 tickangle=45))
  return fig
