"""Named sites in a penzai model: the core's ``dictlearn.sites`` plus what only a penzai
model knows (which HookPoints it has, the named feature axis of a site's values).

``Site``, its constructors (``resid_post(9)``), parsing and the read/write rule are the
core's and re-exported here. ``check_site(model, site)`` validates a site against a
model's ``HookPoint`` layers and raises a ValueError that lists what the model has, e.g.
``layer 30 is out of range: this model has 18 layers (0-17)``.

What flows through a site is a NamedArray with axes ``batch``, ``seq`` and one feature
axis: ``embedding`` (d_model) everywhere except ``attn_z``, where the model carries head
axes (``heads``, or ``head_groups``/``query_heads``) and ``projection``; the adapter
flattens those into a single axis named ``attn_z`` (heads x head_dim, in o_proj order:
head-major, then head_dim). ``feature_axis(site)`` names it.
"""

from __future__ import annotations

from penzai import pz

from dictlearn.sites import (  # noqa: F401  (re-exported)
    KINDS, Site, as_site, attn_out, attn_z, mlp_in, mlp_out, read_write, resid_mid,
    resid_post, resid_pre, site_of)
from dictlearn_penzai.hookpoint import HookPoint

# Head axes in the order o_proj reads them: transformers' query head h is
# (kv group g, query head q within the group) with h = g * per_group + q.
HEAD_AXES = ("heads", "head_groups", "query_heads")
ATTN_Z_AXIS = "attn_z"


def feature_axis(site) -> str:
  """The single feature axis a site's values carry in caches and dictionary layers."""
  return ATTN_Z_AXIS if as_site(site).kind == "attn_z" else "embedding"


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
    kinds = ", ".join(k for k in KINDS if site.layer in found.get(k, ()))
    raise ValueError(f"this model has no site {site}; layer {site.layer} has: {kinds}")
  return site
