"""Named sites: where in a Gemma 3 penzai model a dictionary reads or writes.

A ``Site`` is a small frozen ``(kind, layer)`` pair; the kinds are
``dictlearn.hookpoints.SITE_KINDS``. Build one with ``resid_post(9)``, parse one from
``"resid_post.9"`` or from a Gemma Scope 2 hook-point string
(``"model.layers.9.output"``), or read it off a loaded dictionary with ``site_of``.

``check_site(model, site)`` validates a site against a model's ``HookPoint`` layers and
raises a ValueError that lists what the model has, e.g.
``layer 30 is out of range: this model has 18 layers (0-17)``.

What flows through a site is a NamedArray with axes ``batch``, ``seq`` and one feature
axis: ``embedding`` (d_model) everywhere except ``attn_z``, where the model carries head
axes (``heads``, or ``head_groups``/``query_heads``) and ``projection``; the adapter
flattens those into a single axis named ``attn_z`` (heads x head_dim, in o_proj order:
head-major, then head_dim). ``feature_axis(site)`` names it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from penzai import pz

from dictlearn import hookpoints
from dictlearn_penzai.hookpoint import HookPoint

# Head axes in the order o_proj reads them: transformers' query head h is
# (kv group g, query head q within the group) with h = g * per_group + q.
HEAD_AXES = ("heads", "head_groups", "query_heads")
ATTN_Z_AXIS = "attn_z"


@dataclasses.dataclass(frozen=True, order=True)
class Site:
  """A place in the model: ``kind`` (one of SITE_KINDS) at block ``layer``.

  ``str(site)`` is ``"kind.layer"`` (e.g. ``"resid_post.9"``), the key used in caches.
  """

  kind: str
  layer: int

  def __post_init__(self):
    hookpoints.check_kind(self.kind)
    if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
      raise ValueError(f"a site's layer must be a non-negative int, not {self.layer!r}")

  def __str__(self) -> str:
    return f"{self.kind}.{self.layer}"

  @property
  def name(self) -> str:
    return str(self)

  @property
  def hook_point(self) -> str:
    """The Gemma Scope 2 / transformers module path of this site."""
    return hookpoints.hook_point(self.kind, self.layer)

  @property
  def feature_axis(self) -> str:
    return feature_axis(self)

  @classmethod
  def from_hook_point(cls, hook_point: str) -> "Site":
    """``"model.layers.9.output"`` -> ``Site("resid_post", 9)``."""
    return cls(*hookpoints.parse_hook_point(hook_point))

  @classmethod
  def parse(cls, name: str) -> "Site":
    """``"resid_post.9"``, ``"resid_post(9)"`` or a hook-point string -> Site."""
    text = name.strip()
    for sep in (".", "_"):
      kind, _, layer = text.rpartition(sep)
      if kind in hookpoints.SITE_KINDS and layer.isdigit():
        return cls(kind, int(layer))
    if text.endswith(")") and "(" in text:
      kind, _, layer = text[:-1].partition("(")
      if kind.strip() in hookpoints.SITE_KINDS and layer.strip().isdigit():
        return cls(kind.strip(), int(layer))
    try:
      return cls.from_hook_point(text)
    except ValueError:
      raise ValueError(
          f"{name!r} names no site; write 'kind.layer' with kind one of "
          f"{', '.join(hookpoints.SITE_KINDS)} (e.g. 'resid_post.9'), or a Gemma Scope "
          "hook point such as 'model.layers.9.output'") from None


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
  """Site, ``"resid_post.9"``, a hook-point string or a ``(kind, layer)`` pair -> Site."""
  if isinstance(site, Site):
    return site
  if isinstance(site, HookPoint):
    return Site(site.kind, site.layer)
  if isinstance(site, str):
    return Site.parse(site)
  if isinstance(site, tuple) and len(site) == 2:
    return Site(str(site[0]), int(site[1]))
  raise TypeError(f"cannot make a site from {site!r}; pass a Site or a string like "
                  "'resid_post.9'")


def feature_axis(site: Site | str) -> str:
  """The single feature axis a site's values carry in caches and dictionary layers."""
  return ATTN_Z_AXIS if as_site(site).kind == "attn_z" else "embedding"


def site_of(dictionary, which: str = "in") -> Site:
  """The site a dictionary reads (``which="in"``) or writes (``which="out"``).

  Taken from ``meta.site``/``meta.layer`` (and ``meta.site_out`` for the output), or
  parsed from ``meta.hook_point_in``/``hook_point_out``. An SAE writes where it reads; a
  transcoder without an explicit output site writes ``mlp_out`` of its layer.

  Raises:
    ValueError: when the metadata names no site (pass ``site=`` explicitly then).
  """
  if which not in ("in", "out"):
    raise ValueError(f"which must be 'in' or 'out', not {which!r}")
  meta = getattr(dictionary, "meta", None)
  if meta is None:
    raise ValueError(f"{type(dictionary).__name__} has no metadata; pass site= explicitly")
  is_transcoder = getattr(dictionary, "kind", meta.kind) == "transcoder"
  if which == "out":
    hp = meta.hook_point_out
    if meta.site_out is not None and meta.layer is not None:
      return Site(meta.site_out, meta.layer)
    if hp:
      return Site.from_hook_point(hp)
    if not is_transcoder:
      return site_of(dictionary, "in")
    return Site("mlp_out", site_of(dictionary, "in").layer)
  if meta.site is not None and meta.layer is not None:
    return Site(meta.site, meta.layer)
  if meta.hook_point_in:
    return Site.from_hook_point(meta.hook_point_in)
  raise ValueError(
      f"this {type(dictionary).__name__} does not say where it belongs (meta.site, "
      "meta.layer and meta.hook_point_in are unset); pass site= explicitly, e.g. "
      "site=resid_post(9)")


# ------------------------------------------------------------------ model validation


def model_sites(model) -> dict[str, list[int]]:
  """``{kind: sorted layers}`` of every HookPoint in ``model``."""
  found: dict[str, set[int]] = {}
  for hp in pz.select(model).at_instances_of(HookPoint).get_sequence():
    found.setdefault(hp.kind, set()).add(hp.layer)
  return {k: sorted(v) for k, v in found.items()}


def num_layers(model) -> int:
  """Number of blocks, counted from the model's HookPoints."""
  layers = {layer for ls in model_sites(model).values() for layer in ls}
  return max(layers) + 1 if layers else 0


def check_site(model, site) -> Site:
  """Returns ``as_site(site)`` if ``model`` has it, else raises a ValueError saying why."""
  site = as_site(site)
  found = model_sites(model)
  if not found:
    raise ValueError(
        "this model has no HookPoint layers, so it has no named sites; build it with "
        "dictlearn_penzai (e.g. load_gemma3) so every site carries a HookPoint")
  n = num_layers(model)
  if site.layer >= n:
    raise ValueError(
        f"layer {site.layer} is out of range: this model has {n} layers (0-{n - 1})")
  if site.layer not in found.get(site.kind, ()):
    kinds = ", ".join(k for k in hookpoints.SITE_KINDS if site.layer in found.get(k, ()))
    raise ValueError(f"this model has no site {site}; layer {site.layer} has: {kinds}")
  return site
