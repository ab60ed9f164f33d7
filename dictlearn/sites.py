"""Sites: the named places in a Gemma block where a dictionary reads or writes.

A site is ``Site(kind, layer)``, spelled ``"resid_post.9"`` everywhere (caches, file names,
metadata). The kinds, in the order they occur inside block ``layer``:

  resid_pre   block input (the residual stream before the block)
  attn_z      o_proj input: every head's output, heads concatenated (heads * head_dim)
  attn_out    post-attention-norm output: what attention adds to the residual
  resid_mid   residual stream after the attention sub-block
  mlp_in      pre-feed-forward-norm output: what the MLP reads (transcoder input)
  mlp_out     post-feed-forward-norm output: what the MLP adds (transcoder target)
  resid_post  block output

Gemma Scope names sites by transformers' module paths (``hf_hook_point_in/out``);
``Site.from_hook_point`` and ``Site.hook_point`` convert both ways. ``read_write(d)``
is the one rule for where a dictionary reads and writes. Placing sites in a model is an
adapter's job.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

KINDS = ("resid_pre", "attn_z", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")

# Gemma Scope 2 writes transformers' module paths; each maps to one site kind.
_HOOK_PATTERNS = (
    (re.compile(r"^model\.layers\.(\d+)\.output$"), "resid_post"),
    (re.compile(r"^model\.layers\.(\d+)$"), "resid_post"),
    (re.compile(r"^model\.layers\.(\d+)\.input$"), "resid_pre"),
    (re.compile(r"^model\.layers\.(\d+)\.self_attn\.o_proj\.input$"), "attn_z"),
    (re.compile(r"^model\.layers\.(\d+)\.post_attention_layernorm\.output$"), "attn_out"),
    (re.compile(r"^model\.layers\.(\d+)\.pre_feedforward_layernorm\.output$"), "mlp_in"),
    (re.compile(r"^model\.layers\.(\d+)\.post_feedforward_layernorm\.output$"), "mlp_out"),
    # Gemma Scope 1 / TransformerLens names, for dictionaries converted from SAELens.
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), "resid_post"),
    (re.compile(r"^blocks\.(\d+)\.hook_resid_pre$"), "resid_pre"),
    (re.compile(r"^blocks\.(\d+)\.hook_resid_mid$"), "resid_mid"),
    (re.compile(r"^blocks\.(\d+)\.attn\.hook_z$"), "attn_z"),
    (re.compile(r"^blocks\.(\d+)\.hook_attn_out$"), "attn_out"),
    (re.compile(r"^blocks\.(\d+)\.ln2\.hook_normalized$"), "mlp_in"),
    (re.compile(r"^blocks\.(\d+)\.hook_mlp_out$"), "mlp_out"),
)

_HOOK_POINTS = {
    "resid_post": "model.layers.{L}.output",
    "resid_pre": "model.layers.{L}.input",
    "attn_z": "model.layers.{L}.self_attn.o_proj.input",
    "attn_out": "model.layers.{L}.post_attention_layernorm.output",
    "mlp_in": "model.layers.{L}.pre_feedforward_layernorm.output",
    "mlp_out": "model.layers.{L}.post_feedforward_layernorm.output",
    "resid_mid": "model.layers.{L}.resid_mid",  # no transformers module; ours alone
}


def check_kind(kind: str) -> str:
  """Returns ``kind`` if it is a site kind, else raises a ValueError listing them."""
  if kind not in KINDS:
    raise ValueError(f"unknown site kind {kind!r}; the kinds are {', '.join(KINDS)}")
  return kind


@dataclasses.dataclass(frozen=True, order=True)
class Site:
  """A place in the model: ``kind`` (one of ``KINDS``) at block ``layer``.

  Frozen and hashable; ``str(site)`` is ``"kind.layer"`` and ``Site.parse`` reads it back.
  """

  kind: str
  layer: int

  def __post_init__(self):
    check_kind(self.kind)
    if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
      raise ValueError(f"a site's layer must be a non-negative int, not {self.layer!r}")

  def __str__(self) -> str:
    return f"{self.kind}.{self.layer}"

  @property
  def name(self) -> str:
    return str(self)

  @property
  def hook_point(self) -> str:
    """The Gemma Scope / transformers module path: ``"model.layers.9.output"``."""
    return _HOOK_POINTS[self.kind].format(L=self.layer)

  @classmethod
  def from_hook_point(cls, hook_point: str) -> "Site":
    """``"model.layers.9.output"`` -> ``Site("resid_post", 9)``.

    Raises:
      ValueError: for a string that names no known site.
    """
    for pattern, kind in _HOOK_PATTERNS:
      m = pattern.match(hook_point.strip())
      if m:
        return cls(kind, int(m.group(1)))
    raise ValueError(
        f"hook point {hook_point!r} names no known site; expected one of "
        + ", ".join(p.replace("{L}", "L") for p in _HOOK_POINTS.values()))

  @classmethod
  def parse(cls, name: str) -> "Site":
    """``"resid_post.9"`` (also ``"resid_post_9"``, ``"resid_post(9)"``) or a hook point."""
    text = name.strip()
    for sep in (".", "_"):
      kind, _, layer = text.rpartition(sep)
      if kind in KINDS and layer.isdigit():
        return cls(kind, int(layer))
    if text.endswith(")") and "(" in text:
      kind, _, layer = text[:-1].partition("(")
      if kind.strip() in KINDS and layer.strip().isdigit():
        return cls(kind.strip(), int(layer))
    try:
      return cls.from_hook_point(text)
    except ValueError:
      raise ValueError(
          f"{name!r} names no site; write 'kind.layer' with kind one of {', '.join(KINDS)} "
          "(e.g. 'resid_post.9'), or a Gemma Scope hook point such as "
          "'model.layers.9.output'") from None


def resid_pre(layer: int) -> Site:
  """Block input: the residual stream before block ``layer``."""
  return Site("resid_pre", layer)


def attn_z(layer: int) -> Site:
  """o_proj input: every head's output, concatenated (heads x head_dim)."""
  return Site("attn_z", layer)


def attn_out(layer: int) -> Site:
  """Post-attention-norm output: what attention adds to the residual stream."""
  return Site("attn_out", layer)


def resid_mid(layer: int) -> Site:
  """Residual stream between the attention and MLP sub-blocks."""
  return Site("resid_mid", layer)


def mlp_in(layer: int) -> Site:
  """Pre-feed-forward-norm output: what the MLP reads (transcoder input)."""
  return Site("mlp_in", layer)


def mlp_out(layer: int) -> Site:
  """Post-feed-forward-norm output: what the MLP adds (transcoder target)."""
  return Site("mlp_out", layer)


def resid_post(layer: int) -> Site:
  """Block output: the residual stream after block ``layer``."""
  return Site("resid_post", layer)


def as_site(site: Any) -> Site:
  """A Site from a Site, a string (``"resid_post.9"``, a hook point), a ``(kind, layer)``
  pair, or any object with ``kind`` and ``layer`` attributes (an adapter's hook marker)."""
  if isinstance(site, Site):
    return site
  if isinstance(site, str):
    return Site.parse(site)
  if isinstance(site, tuple) and len(site) == 2 and isinstance(site[1], int):
    return Site(str(site[0]), site[1])
  if isinstance(getattr(site, "kind", None), str) and isinstance(getattr(site, "layer", None), int):
    return Site(site.kind, site.layer)
  raise TypeError(f"cannot make a site from {site!r}; pass a Site or a string like "
                  "'resid_post.9'")


def _is_transcoder(d) -> bool:
  return getattr(d, "kind", None) == "transcoder"


def _meta_read_site(d) -> Site:
  meta = getattr(d, "meta", None)
  if meta is None:
    raise ValueError(f"{type(d).__name__} has no metadata; pass the site explicitly")
  if meta.site is not None and meta.layer is not None:
    return Site(meta.site, meta.layer)
  if meta.hook_point_in:
    return Site.from_hook_point(meta.hook_point_in)
  raise ValueError(
      f"this {type(d).__name__} does not say where it belongs (meta.site, meta.layer and "
      "meta.hook_point_in are unset); pass the site explicitly, e.g. site='resid_post.9'")


def read_write(d, read=None, write=None) -> tuple[Site, Site]:
  """``(read, write)`` sites of dictionary ``d``: the one rule, used by every adapter.

  ``read`` defaults to the site its metadata names (``meta.site``/``meta.layer``, or
  ``meta.hook_point_in``). An SAE writes where it
  reads. A transcoder writes ``write`` if given, else the output site its metadata names
  (``meta.site_out`` or ``meta.hook_point_out``) when that is in the layer it reads, else
  ``mlp_out`` of that layer (Gemma Scope: mlp_in -> mlp_out).

  Raises:
    ValueError: no site known, or an SAE asked to write somewhere other than it reads.
  """
  src = _meta_read_site(d) if read is None else as_site(read)
  if not _is_transcoder(d):
    dst = src if write is None else as_site(write)
    if dst != src:
      raise ValueError(f"an SAE writes where it reads; got read={src} and write={dst}")
    return src, dst
  if write is not None:
    return src, as_site(write)
  meta = d.meta
  dst = None
  if meta.site_out is not None and meta.layer is not None:
    dst = Site(meta.site_out, meta.layer)
  elif meta.hook_point_out:
    try:
      dst = Site.from_hook_point(meta.hook_point_out)
    except ValueError:  # An unfamiliar output hook point: the default rule below.
      dst = None
  if dst is None or dst.layer != src.layer:
    dst = mlp_out(src.layer)
  return src, dst


def site_of(d, which: str = "in") -> Site:
  """The site dictionary ``d`` reads (``which="in"``) or writes (``"out"``), from its
  metadata by the rule of ``read_write``."""
  if which not in ("in", "out"):
    raise ValueError(f"which must be 'in' or 'out', not {which!r}")
  return read_write(d)[0 if which == "in" else 1]
