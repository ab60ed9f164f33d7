"""Hooks at named sites: capture, run_with_cache, splice, steer, ablate, clamp.

Every hook is a penzai layer inserted right after a site's ``HookPoint`` with
``pz.select`` (no layer counting). Hooks at one site live in a ``SiteHooks`` sequence and
run in the order they were added, so they compose: splice at one site and steer at
another, or steer then capture at the same site (the capture sees the steered value).
A patched model is an ordinary penzai model: jit it, convert it to KV-cached sampling
mode, patch it again. ``remove_hooks`` takes them out.

BOS: dictionaries from Gemma Scope 2 were not trained on BOS, whose activations are
huge outliers, so splice/steer/ablate/clamp leave the token at position 0 alone by
default (``skip_bos=True``), found through the ``token_positions`` side input: position
0 after left padding, never in a KV-cached decode step (which continues at position > 0),
so steering applies to every generated token.

Transcoders read one site and write another (Gemma Scope 2: ``mlp_in`` -> ``mlp_out`` of
the same layer). Their hooks are two layers sharing a ``StateVariable``: a ``Stash`` at
the input site stores the value, the writer at the output site takes it (and empties the
slot, so between calls the model's state is always the same). Both run in the same call,
so this works under jit and in every prefill and decode step.

Caches: ``run_with_cache`` returns ``(logits, cache)``; ``cache[site]`` (a Site, its name
``"resid_post.9"`` or a hook-point string) is a NamedArray with axes ``batch``, ``seq`` and
one feature axis: ``embedding`` (d_model), or ``attn_z`` (heads x head_dim flattened in
o_proj order) at attn_z sites.
"""

from __future__ import annotations

import collections.abc
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models.transformer.sampling_mode import KVCachingTransformerLM

from dictlearn import interventions
from dictlearn.crosslayer import CrossLayerTranscoder
from dictlearn_penzai import layers as L
from dictlearn_penzai.hookpoint import HookPoint
from dictlearn_penzai.jitting import state_jit
from dictlearn_penzai.sites import (
    Site, as_site, check_site, feature_axis, num_layers, read_write)

NamedArray = pz.nx.NamedArray


# ------------------------------------------------------------------ placement


def _find(model, site: Site):
  return pz.select(model).at_instances_of(L.SiteHooks).where(lambda h: h.site == site)


def attach(model, site, layer: pz.nn.Layer):
  """Returns ``model`` with ``layer`` run right after ``site`` (after earlier hooks there)."""
  site = check_site(model, site)
  existing = _find(model, site)
  if existing.count():
    return existing.apply(lambda h: dataclasses.replace(h, sublayers=[*h.sublayers, layer]))
  return (pz.select(model).at_instances_of(HookPoint)
          .where(lambda hp: (hp.kind, hp.layer) == (site.kind, site.layer))
          .insert_after(L.SiteHooks(sublayers=[layer], site=site)))


def remove_hooks(model, site=None):
  """``model`` without the hooks this module added (at ``site`` only, if given)."""
  site = None if site is None else as_site(site)
  sel = pz.select(model).at_instances_of(L.SiteHooks)
  if site is not None:
    sel = sel.where(lambda h: h.site == site)
  return sel.remove_from_parent()


def hooks_at(model) -> dict[Site, list[pz.nn.Layer]]:
  """``{site: [hook layers in run order]}`` for every hooked site of ``model``."""
  return {h.site: list(h.sublayers)
          for h in pz.select(model).at_instances_of(L.SiteHooks).get_sequence()}


def _labels(model) -> set:
  return {v.label for v in pz.select(model).at_instances_of(pz.StateVariable).get_sequence()}


def _fresh_label(model, base: str) -> str:
  # Deterministic labels (not penzai's auto ones) keep jit caches warm across calls
  # that patch the same model the same way.
  taken, label, n = _labels(model), base, 1
  while label in taken:
    n += 1
    label = f"{base}#{n}"
  return label


def site_width(model, site: Site) -> int | None:
  """Features a site carries, from the model's metadata (None when it has none)."""
  meta = getattr(model, "metadata", None)
  if meta is None or not hasattr(meta, "embedding_dim"):
    return None
  if site.kind != "attn_z":
    return meta.embedding_dim
  heads = 1
  for n in {**meta.common_head_axes, **meta.query_only_head_axes}.values():
    heads *= n
  return heads * meta.projection_dim


def _check_width(model, site: Site, n: int, what: str):
  width = site_width(model, site)
  if width is not None and width != n:
    raise ValueError(f"{what} but the site {site} carries {width}")


# ------------------------------------------------------------------ capture


def capture(model, sites) -> Any:
  """Returns ``model`` with a ``Capture`` layer (a StateVariable) after each site.

  After calling the patched model, ``read_cache(patched)`` (or each Capture's
  ``slot.value``) holds what flowed through; ``run_with_cache`` does both in one call.
  """
  for site in _site_list(sites):
    slot = pz.StateVariable(value=None, label=_fresh_label(model, f"dictlearn/capture/{site}"))
    model = attach(model, site, L.Capture(slot=slot, site=site))
  return model


def _site_list(sites) -> list[Site]:
  if isinstance(sites, (str, Site)) or (isinstance(sites, tuple) and len(sites) == 2
                                         and isinstance(sites[1], int)):
    sites = [sites]
  out = []
  for s in sites:
    s = as_site(s)
    if s not in out:
      out.append(s)
  return out


class ActivationCache(collections.abc.Mapping):
  """Captured activations by site: ``cache[resid_post(9)]``, ``cache["resid_post.9"]``.

  Each value is a NamedArray with axes ``batch``, ``seq`` and one feature axis
  (``embedding``, or ``attn_z`` at attn_z sites). ``cache.array(site)`` gives the plain
  ``(batch, seq, d)`` jax array.
  """

  def __init__(self, values: dict[Site, NamedArray]):
    self._values = dict(values)

  def __getitem__(self, key) -> NamedArray:
    site = as_site(key)
    if site not in self._values:
      raise KeyError(f"{site} was not captured; the cache has "
                     f"{', '.join(map(str, self._values)) or 'nothing'}")
    return self._values[site]

  def __iter__(self):
    return iter(self._values)

  def __len__(self):
    return len(self._values)

  def __contains__(self, key):
    try:
      return as_site(key) in self._values
    except (ValueError, TypeError):
      return False

  def array(self, key) -> jax.Array:
    """``(batch, seq, d)`` plain array of ``cache[key]``."""
    site = as_site(key)
    return self[site].unwrap("batch", "seq", feature_axis(site))

  def names(self) -> list[str]:
    return [str(s) for s in self._values]

  def __repr__(self):
    items = ", ".join(f"{s}: {dict(v.named_shape)}" for s, v in self._values.items())
    return f"ActivationCache({items})"


def read_cache(model) -> ActivationCache:
  """The values held by the ``Capture`` layers of a captured model after a call."""
  values = {}
  for c in pz.select(model).at_instances_of(L.Capture).get_sequence():
    if c.slot.value is not None:
      values[c.site] = _canonical(c.slot.value, feature_axis(c.site))
  return ActivationCache(values)


def _canonical(x: NamedArray, axis: str) -> NamedArray:
  order = [a for a in ("batch", "seq") if a in x.named_shape]
  rest = [a for a in x.named_shape if a not in (*order, axis)]
  return x.order_as(*order, *rest, axis)


def as_tokens(tokens) -> NamedArray:
  """Token ids as an int NamedArray with axes ``batch`` and ``seq``.

  Accepts a NamedArray (a missing ``batch`` axis is added with size 1) or a plain array
  ``(seq,)`` / ``(batch, seq)``.
  """
  if isinstance(tokens, pz.nx.NamedArrayBase):
    if "seq" not in tokens.named_shape:
      raise ValueError(f"tokens need a 'seq' axis, got {dict(tokens.named_shape)}")
    return tokens if "batch" in tokens.named_shape else tokens[{"batch": None}]
  arr = jnp.asarray(tokens)
  if arr.ndim == 1:
    arr = arr[None]
  if arr.ndim != 2:
    raise ValueError(f"tokens must be (seq,) or (batch, seq), got shape {tuple(arr.shape)}")
  return pz.nx.wrap(arr.astype(jnp.int32)).tag("batch", "seq")


def positions_from_padding(tokens: NamedArray, pad_id: int | None) -> NamedArray:
  """(batch, seq) positions, -1 at pads: ``dictlearn.interventions.positions_from_padding``
  on named tokens, so each row's BOS sits at position 0, where the hooks look for it."""
  return pz.nx.nmap(lambda t: interventions.positions_from_padding(t, pad_id))(
      tokens.untag("seq")).tag("seq")


@state_jit
def _jit_call(model, tokens, side_inputs):
  return model(tokens, **side_inputs)


def call(model, tokens, *, jit: bool = True, pad_id: int | None = 0,
         **side_inputs) -> NamedArray:
  """Runs ``model`` on tokens (see ``as_tokens``) compiled (``jitting.state_jit``) if ``jit``.

  Unless ``token_positions`` is given, positions come from padding (``pad_id``, Gemma's
  0; None: 0..seq-1), as in ``sampling.forward_logits``. A KV-cached model computes its
  own positions, so nothing is added for it. State variables in the model (captures)
  are updated either way. The jit cache is keyed on the model's structure, so a model
  patched the same way again (other weights, other coefficients) does not recompile.
  """
  tokens = as_tokens(tokens)
  if "token_positions" not in side_inputs and not isinstance(model, KVCachingTransformerLM):
    side_inputs["token_positions"] = positions_from_padding(tokens, pad_id)
  if jit:
    return _jit_call(model, tokens, side_inputs)
  return model(tokens, **side_inputs)


def run_with_cache(model, tokens, sites, *, jit: bool = True, pad_id: int | None = 0,
                   **side_inputs) -> tuple[NamedArray, ActivationCache]:
  """Runs the model once and returns ``(logits, cache)`` of the activations at ``sites``.

  Args:
    model: a penzai model with HookPoints (it may already carry hooks; captures see
      the value after them).
    tokens: ids, NamedArray (batch, seq) or an array (seq,) / (batch, seq).
    sites: a site or a list of them (Site, "resid_post.9", hook-point strings).
    jit: compile the call (default) or run eagerly.
    pad_id: padding id; without ``token_positions``, positions come from padding (see
      ``call``), so padded batches need nothing more.
    **side_inputs: e.g. ``token_positions`` (NamedArray batch, seq; -1 for padding).

  Returns:
    logits NamedArray (batch, seq, vocabulary) and an ActivationCache.
  """
  patched = capture(model, sites)
  logits = call(patched, tokens, jit=jit, pad_id=pad_id, **side_inputs)
  return logits, read_cache(patched)


# ------------------------------------------------------------------ interventions


def read_write_sites(model, dictionary, site=None) -> tuple[Site, Site]:
  """``(read site, write site)`` of a dictionary (``dictlearn.sites.read_write``),
  validated against the model's sites and widths.

  ``site``: None (from the dictionary's metadata), the site it reads, or a pair
  ``(read, write)`` of sites (e.g. ``("mlp_in.2", "mlp_out.2")``).
  """
  d = L.core_dictionary(dictionary)
  read = write = None
  if isinstance(site, (list, tuple)) and len(site) == 2 and not isinstance(site[1], int):
    read, write = site
  elif site is not None:
    read = site
  src, dst = read_write(d, read, write)
  src, dst = check_site(model, src), check_site(model, dst)
  _check_width(model, src, d.d_in, f"{type(d).__name__} expects d_in={d.d_in}")
  _check_width(model, dst, d.d_out, f"{type(d).__name__} writes d_out={d.d_out}")
  return src, dst


def _stash(model, src: Site, dst: Site):
  """For a transcoder: a slot, and the model with a Stash at ``src`` filling it."""
  slot = pz.StateVariable(value=None, label=_fresh_label(model, f"dictlearn/stash/{src}->{dst}"))
  return attach(model, src, L.Stash(slot=slot, site=src)), slot


def _reader(model, layer, site):
  """(model, sites, input slot): a Stash at the read site when it differs from the write
  site (transcoders), so the hook at the write site sees the dictionary's input."""
  src, dst = read_write_sites(model, layer.dictionary, site)
  if src == dst:
    return model, dst, None
  model, slot = _stash(model, src, dst)
  return model, dst, slot


def splice(model, dictionary, site=None, skip_bos: bool = True, *,
           compute_dtype=jnp.float32):
  """Replaces a site's activations with the dictionary's output (BOS left alone).

  An SAE replaces its site with its reconstruction. A transcoder reads its input site
  (``mlp_in``) and replaces its output site (``mlp_out`` of the same layer) with its
  prediction: the MLP's contribution is then the transcoder's. Runs the fused
  ``dictlearn.interventions.splice``. A ``dictlearn.CrossLayerTranscoder`` replaces every
  MLP at once: each layer's latents are encoded at its mlp_in and every mlp_out gets the
  writes of all layers up to it (``site`` must be None).

  Args:
    model: a penzai model with HookPoints.
    dictionary: a ``dictlearn.JumpReLUSAE`` / ``Transcoder`` (or SAELayer/TranscoderLayer).
    site: where; by default the site its metadata names. For a transcoder, its input
      site, or a pair ``(input_site, output_site)``.
    skip_bos: leave position 0 (BOS) unchanged.
    compute_dtype: matmul operand dtype for the core (float32 accumulation always).
  """
  if isinstance(dictionary, CrossLayerTranscoder):
    if site is not None:
      raise ValueError("a cross-layer transcoder replaces every MLP: pass site=None")
    return _splice_clt(model, dictionary.validate(), skip_bos)
  layer = L.dictionary_layer(dictionary, compute_dtype)
  model, dst, slot = _reader(model, layer, site)
  return attach(model, dst, L.Splice(layer=layer, input_slot=slot, site=dst,
                                     skip_bos=skip_bos))


def _splice_clt(model, clt: CrossLayerTranscoder, skip_bos: bool):
  n = num_layers(model)
  if clt.n_layers != n:
    raise ValueError(f"the cross-layer transcoder has {clt.n_layers} layers, the model {n}")
  _check_width(model, Site("mlp_in", 0), clt.d_in, f"the CLT expects d_in={clt.d_in}")
  slot = pz.StateVariable(value=None, label=_fresh_label(model, "dictlearn/clt"))
  for i in range(n):
    model = attach(model, Site("mlp_in", i), L.CrossLayerRead(
        clt=clt, slot=slot, layer=i, site=Site("mlp_in", i)))
    model = attach(model, Site("mlp_out", i), L.CrossLayerWrite(
        clt=clt, slot=slot, layer=i, site=Site("mlp_out", i), skip_bos=skip_bos))
  return model


def steer(model, site, direction, coeff, scale: str = "norm", skip_bos: bool = True):
  """Adds a direction at a site, at every position but BOS, in prefill and decode.

  Args:
    site: where (e.g. ``resid_post(9)`` or "resid_post.9").
    direction: a vector (d,) on the site's feature axis (e.g. an SAE decoder row,
      ``sae.w_dec[i]``), plain or a single-axis NamedArray.
    coeff: scalar. ``scale="norm"`` adds ``coeff * ||x|| * direction`` per token (the
      Gemma Scope 2 tutorial's steering: strength relative to the activation's own
      size, for a unit direction); ``scale="none"`` adds ``coeff * direction``.
    skip_bos: leave position 0 (BOS) unchanged during prefill.
  """
  if scale not in ("norm", "none"):
    raise ValueError(f"scale must be 'norm' or 'none', not {scale!r}")
  site = check_site(model, site)
  d = L.direction_array(direction, feature_axis(site), site_width(model, site))
  return attach(model, site, L.Steer(direction=d, coeff=jnp.asarray(coeff, jnp.float32),
                                     site=site, scale=scale, skip_bos=skip_bos))


def _latent_list(latents, width: int) -> tuple[int, ...]:
  idx = np.atleast_1d(np.asarray(latents))
  if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
    raise ValueError(f"latents must be an index or a list of indices, got {latents!r}")
  if idx.size and (idx.min() < 0 or idx.max() >= width):
    raise ValueError(f"latent indices must be in 0..{width - 1}, got "
                     f"{int(idx.min())}..{int(idx.max())}")
  return tuple(int(i) for i in idx)


def _edit(model, dictionary, latents, values, site, skip_bos, compute_dtype):
  layer = L.dictionary_layer(dictionary, compute_dtype)
  idx = _latent_list(latents, layer.width)
  clamp_values = None
  if values is not None:
    values = jnp.broadcast_to(jnp.asarray(values, jnp.float32), (len(idx),))
    last = {i: j for j, i in enumerate(idx)}  # A repeated latent takes its last value.
    idx, clamp_values = tuple(last), values[np.asarray(list(last.values()), np.int32)]
  model, dst, slot = _reader(model, layer, site)
  return attach(model, dst, L.EditLatents(
      layer=layer, clamp_values=clamp_values, input_slot=slot,
      ablate=idx if values is None else (), clamp_latents=() if values is None else idx,
      site=dst, skip_bos=skip_bos))


def ablate(model, dictionary, latents, site=None, skip_bos: bool = True, *,
           compute_dtype=jnp.float32):
  """Zeroes chosen latents, keeping the dictionary's reconstruction error.

  The site becomes ``x + decode(f with latents zeroed) - decode(f)``, i.e.
  ``x - sum_i f_i * w_dec[i]`` over the chosen latents: only their contribution is
  removed, unlike splicing the edited reconstruction, which would also remove whatever
  the dictionary fails to reconstruct. For transcoders, f is read at the input site and
  the edit lands on the output site. BOS is left alone by default.
  """
  return _edit(model, dictionary, latents, None, site, skip_bos, compute_dtype)


def clamp(model, dictionary, latents, values, site=None, skip_bos: bool = True, *,
          compute_dtype=jnp.float32):
  """Sets chosen latents to ``values`` at every (non-BOS) position, keeping the error.

  Same error-preserving form as ``ablate``: ``x + decode(f') - decode(f)`` with
  ``f'`` = f with ``latents`` set to ``values`` (a scalar or one value per latent).
  """
  return _edit(model, dictionary, latents, values, site, skip_bos, compute_dtype)
