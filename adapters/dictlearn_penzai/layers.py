"""Penzai layers around the core dictionaries, and the intervention layers hooks insert.

``SAELayer`` and ``TranscoderLayer`` hold a ``dictlearn`` dictionary (a pytree; treescope
shows its weights and metadata) and run it on NamedArrays: they unwrap the feature axis
and call ``dictlearn.encode``/``decode``/``encode_decode``, never re-implementing the
math. Latents come back on an axis named ``latents``.

The intervention layers (``Capture``, ``Stash``, ``Splice``, ``Steer``, ``EditLatents``)
are what ``dictlearn_penzai.hooks`` puts after a site's ``HookPoint``. Each unwraps the
site's value to a plain ``(..., seq, d)`` array and calls ``dictlearn.interventions``
with the mask of ``position_mask`` (from the ``token_positions`` side input: BOS at 0,
padding at -1, so left-padded batches and decode steps are handled). Each is pure apart
from the ``StateVariable`` it names and works under ``jax.jit`` and in KV-cached sampling.

Shapes: values at a site are NamedArrays with axes ``batch``, ``seq`` and a feature axis
(``embedding``, or at attn_z the model's head axes plus ``projection``, which
``to_features`` flattens to one ``attn_z`` axis in o_proj order).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from penzai import pz

import dictlearn
from dictlearn import crosslayer
from dictlearn import interventions
from dictlearn_penzai.sites import ATTN_Z_AXIS, HEAD_AXES, Site

NamedArray = pz.nx.NamedArray
LATENTS = "latents"


# ------------------------------------------------------------------ feature axes


def to_features(x: NamedArray) -> tuple[NamedArray, str, Callable[[NamedArray], NamedArray]]:
  """Gives ``x`` a single named feature axis.

  Returns ``(flat, axis, restore)``: ``flat`` has every axis of ``x`` except the features,
  plus ``axis`` (``embedding`` or ``attn_z``); ``restore`` maps a value shaped like
  ``flat`` back to ``x``'s axes. At attn_z, the head axes (``heads``, or
  ``head_groups`` then ``query_heads``) and ``projection`` are flattened head-major,
  which is the order of transformers' o_proj input (heads x head_dim).
  """
  shape = x.named_shape
  for axis in ("embedding", ATTN_Z_AXIS):
    if axis in shape:
      return x, axis, lambda y: y
  if "projection" in shape:
    heads = tuple(a for a in HEAD_AXES if a in shape) + ("projection",)
    sizes = tuple(shape[a] for a in heads)
    flat = pz.nx.nmap(lambda a: a.reshape(-1))(x.untag(*heads)).tag(ATTN_Z_AXIS)

    def restore(y):
      return pz.nx.nmap(lambda a: a.reshape(sizes))(y.untag(ATTN_Z_AXIS)).tag(*heads)

    return flat, ATTN_Z_AXIS, restore
  raise ValueError(
      f"cannot find a feature axis in a value with axes {dict(shape)}; expected "
      "'embedding', 'attn_z', or head axes with 'projection'")


def features(x: NamedArray) -> NamedArray:
  """``x`` with its single feature axis (see ``to_features``)."""
  return to_features(x)[0]


# ------------------------------------------------------------- dictionary layers


def plain(x: NamedArray) -> tuple[jax.Array, Callable[[jax.Array], NamedArray]]:
  """A site's value as a plain array ``(..., seq, d)`` and the map back to x's axes.

  The leading axes are x's other named axes (e.g. ``batch``), in x's order; ``d`` is the
  single feature axis of ``to_features``. The map back restores attn_z's head axes.
  """
  flat, axis, restore = to_features(x)
  lead = tuple(a for a in flat.named_shape if a not in ("seq", axis))
  names = (*lead, "seq", axis)
  return flat.unwrap(*names), lambda y: restore(pz.nx.wrap(y).tag(*names))


class _DictionaryLayer(pz.nn.Layer):
  """A dictionary over a named feature axis: encode, decode and forward call the core."""

  def encode(self, x: NamedArray) -> NamedArray:
    """Latent activations (float32) on axis ``latents``, from x with one feature axis."""
    flat, axis, _ = to_features(x)
    return pz.nx.nmap(
        lambda v: dictlearn.encode(self.dictionary, v, compute_dtype=self.compute_dtype)
    )(flat.untag(axis)).tag(LATENTS)

  def decode(self, f: NamedArray, x: NamedArray | None = None,
             axis: str = "embedding") -> NamedArray:
    """Output (float32) on feature axis ``axis`` from latents on ``latents``; an affine
    transcoder also needs its input ``x`` for the skip term."""
    fn = lambda fv, xv=None: dictlearn.decode(  # noqa: E731
        self.dictionary, fv, xv, compute_dtype=self.compute_dtype)
    if x is None:
      return pz.nx.nmap(fn)(f.untag(LATENTS)).tag(axis)
    flat, in_axis, _ = to_features(x)
    return pz.nx.nmap(fn)(f.untag(LATENTS), flat.untag(in_axis)).tag(axis)

  def forward(self, x: NamedArray, axis: str | None = None) -> NamedArray:
    """Output (float32) through the fused ``dictlearn.encode_decode``, on ``axis``
    (default: x's own feature axis for an SAE, ``embedding`` for a transcoder)."""
    flat, in_axis, _ = to_features(x)
    axis = axis or (in_axis if isinstance(self, SAELayer) else "embedding")
    lead = tuple(a for a in flat.named_shape if a != in_axis)
    y, _ = dictlearn.encode_decode(self.dictionary, flat.unwrap(*lead, in_axis),
                                   compute_dtype=self.compute_dtype)
    return pz.nx.wrap(y).tag(*lead, axis)

  @property
  def width(self) -> int:
    return self.dictionary.width

  @property
  def meta(self):
    return self.dictionary.meta

  def treescope_color(self):
    return "#d9a3ff"


@pz.pytree_dataclass
class SAELayer(_DictionaryLayer):
  """A JumpReLU SAE as a penzai layer: ``x -> reconstruction`` over a named feature axis.

  Attributes:
    dictionary: a ``dictlearn.JumpReLUSAE`` (weights are pytree leaves, meta static).
    compute_dtype: matmul operand dtype passed to the core (float32 accumulation).
  """

  dictionary: dictlearn.JumpReLUSAE
  compute_dtype: Any = dataclasses.field(default=jnp.float32,
                                         metadata={"pytree_node": False})

  def __call__(self, x: NamedArray, **side_inputs) -> NamedArray:
    """Reconstruction in x's own axes and dtype (attn_z keeps its head axes)."""
    _, _, restore = to_features(x)
    return restore(self.forward(x)).astype(x.dtype)


@pz.pytree_dataclass
class TranscoderLayer(_DictionaryLayer):
  """A JumpReLU transcoder as a penzai layer: reads x (d_in), predicts y (d_out).

  ``__call__(x)`` gives the prediction on axis ``embedding``; ``decode(f, x)`` needs x
  when the transcoder is affine (``w_skip``).
  """

  dictionary: dictlearn.Transcoder
  compute_dtype: Any = dataclasses.field(default=jnp.float32,
                                         metadata={"pytree_node": False})

  def __call__(self, x: NamedArray, **side_inputs) -> NamedArray:
    return self.forward(x).astype(x.dtype)


def dictionary_layer(dictionary, compute_dtype=jnp.float32) -> SAELayer | TranscoderLayer:
  """Wraps a core dictionary in the matching penzai layer (layers pass through)."""
  if isinstance(dictionary, _DictionaryLayer):
    return dictionary
  if isinstance(dictionary, dictlearn.Transcoder):
    return TranscoderLayer(dictionary=dictionary, compute_dtype=compute_dtype)
  if isinstance(dictionary, dictlearn.JumpReLUSAE):
    return SAELayer(dictionary=dictionary, compute_dtype=compute_dtype)
  raise TypeError(f"expected a dictlearn JumpReLUSAE or Transcoder, got "
                  f"{type(dictionary).__name__}")


def core_dictionary(dictionary):
  """The core pytree of a dictionary or of its penzai layer."""
  return dictionary.dictionary if isinstance(dictionary, _DictionaryLayer) else dictionary


# ------------------------------------------------------------- where to intervene


def position_mask(x: NamedArray, side_inputs: dict, skip_bos: bool) -> jax.Array:
  """``interventions.active_positions`` as a plain (..., seq) mask matching ``plain(x)``.

  Positions come from the ``token_positions`` side input (0 is BOS, -1 padding), or count
  from 0 along seq without one; a KV-cached decode step continues at position > 0, so
  steering applies to every generated token.
  """
  positions = side_inputs.get("token_positions")
  if positions is None:
    positions = pz.nx.arange("seq", x.named_shape["seq"])
  flat, axis, _ = to_features(x)
  lead = tuple(a for a in flat.named_shape if a not in ("seq", axis))
  shape = {a: flat.named_shape[a] for a in (*lead, "seq")}
  mask = pz.nx.nmap(lambda p: interventions.active_positions(p, skip_bos))(positions)
  return mask.broadcast_to(named_shape=shape).unwrap(*lead, "seq")


class SiteHook(pz.nn.Layer):
  """Marker base class of every layer a hook inserts after a HookPoint."""

  def treescope_color(self):
    return "#ffb86b"


@pz.pytree_dataclass(has_implicitly_inherited_fields=True)  # pytype: disable=wrong-keyword-args
class SiteHooks(pz.nn.Sequential):
  """The hooks at one site, run in the order they were added (right after the HookPoint)."""

  site: Site = dataclasses.field(default=None, metadata={"pytree_node": False})

  def treescope_color(self):
    return "#ffb86b"


@pz.pytree_dataclass
class Capture(SiteHook):
  """Records the value flowing through a site (feature axis flattened) in ``slot``."""

  slot: pz.StateVariable
  site: Site = dataclasses.field(metadata={"pytree_node": False})

  def __call__(self, x: NamedArray, **side_inputs) -> NamedArray:
    self.slot.value = features(x)
    return x


@pz.pytree_dataclass
class Stash(SiteHook):
  """Hands a site's value to a later hook (a transcoder's input) through ``slot``.

  The reader empties the slot again, so between calls it always holds None: a model
  carrying it keeps the same state structure in every step of a decoding loop.
  """

  slot: pz.StateVariable
  site: Site = dataclasses.field(metadata={"pytree_node": False})

  def __call__(self, x: NamedArray, **side_inputs) -> NamedArray:
    self.slot.value = x
    return x


def _take_stash(slot: pz.StateVariable | None, site: Site, x: NamedArray) -> NamedArray:
  if slot is None:
    return x
  value = slot.value
  if value is None:
    raise ValueError(
        f"the transcoder hook at {site} found no input: its reading hook did not run "
        "first in this call (was the Stash layer removed?)")
  slot.value = None
  return value


@pz.pytree_dataclass
class Splice(SiteHook):
  """Replaces a site's value with the dictionary's output (``interventions.splice``).

  For an SAE the output is its reconstruction of the value itself; for a transcoder
  (``input_slot`` set) it is the prediction from the value stashed at its input site.
  """

  layer: SAELayer | TranscoderLayer
  input_slot: pz.StateVariable | None
  site: Site = dataclasses.field(metadata={"pytree_node": False})
  skip_bos: bool = dataclasses.field(default=True, metadata={"pytree_node": False})

  def __call__(self, x: NamedArray, **side_inputs) -> NamedArray:
    target, back = plain(x)
    x_in = plain(_take_stash(self.input_slot, self.site, x))[0]
    return back(interventions.splice(
        self.layer.dictionary, x_in, target, position_mask(x, side_inputs, self.skip_bos),
        compute_dtype=self.layer.compute_dtype))


@pz.pytree_dataclass
class Steer(SiteHook):
  """Adds a direction at every (non-BOS) position (``interventions.steer``), in prefill
  and in each decode step.

  ``direction`` is a NamedArray on the site's feature axis; ``coeff`` is a leaf, so new
  coefficients reuse the compiled model.
  """

  direction: NamedArray
  coeff: jax.Array
  site: Site = dataclasses.field(metadata={"pytree_node": False})
  scale: str = dataclasses.field(default="norm", metadata={"pytree_node": False})
  skip_bos: bool = dataclasses.field(default=True, metadata={"pytree_node": False})

  def __call__(self, x: NamedArray, **side_inputs) -> NamedArray:
    value, back = plain(x)
    direction = self.direction.unwrap(*self.direction.named_shape)
    return back(interventions.steer(value, direction, self.coeff,
                                    position_mask(x, side_inputs, self.skip_bos), self.scale))


@pz.pytree_dataclass
class EditLatents(SiteHook):
  """Ablates or clamps chosen latents, keeping the reconstruction error
  (``interventions.edit_latents``).

  ``ablate`` and ``clamp_latents`` are static; ``clamp_values`` (one per clamped latent)
  is a leaf, so new values reuse the compiled model. For a transcoder the latents are
  read from the value stashed at its input site and the edit lands on its output site.
  """

  layer: SAELayer | TranscoderLayer
  clamp_values: jax.Array | None
  input_slot: pz.StateVariable | None
  ablate: tuple[int, ...] = dataclasses.field(metadata={"pytree_node": False})
  clamp_latents: tuple[int, ...] = dataclasses.field(metadata={"pytree_node": False})
  site: Site = dataclasses.field(metadata={"pytree_node": False})
  skip_bos: bool = dataclasses.field(default=True, metadata={"pytree_node": False})

  def __call__(self, x: NamedArray, **side_inputs) -> NamedArray:
    target, back = plain(x)
    x_in = plain(_take_stash(self.input_slot, self.site, x))[0]
    clamp = {i: self.clamp_values[j] for j, i in enumerate(self.clamp_latents)}
    return back(interventions.edit_latents(
        self.layer.dictionary, x_in, target, ablate=self.ablate, clamp=clamp,
        mask=position_mask(x, side_inputs, self.skip_bos),
        compute_dtype=self.layer.compute_dtype))


@pz.pytree_dataclass
class CrossLayerRead(SiteHook):
  """At layer i's mlp_in: encodes the CLT's layer-i latents and adds what they write into
  every later MLP output to ``slot`` (the running sums, and this layer's input)."""

  clt: dictlearn.CrossLayerTranscoder
  slot: pz.StateVariable
  layer: int = dataclasses.field(metadata={"pytree_node": False})
  site: Site = dataclasses.field(metadata={"pytree_node": False})

  def __call__(self, x: NamedArray, **side_inputs) -> NamedArray:
    v, _ = plain(x)
    f = crosslayer.encode_layer(self.clt, self.layer, v)
    writes = crosslayer.writes_of(self.clt, self.layer, f)
    held = self.slot.value
    self.slot.value = dict(writes=writes if held is None else held["writes"] + writes, x=v)
    return x


@pz.pytree_dataclass
class CrossLayerWrite(SiteHook):
  """At layer j's mlp_out: the CLT's output there (all layers' writes so far, bias, skip)
  in place of the MLP's, except at BOS; the last layer empties ``slot``."""

  clt: dictlearn.CrossLayerTranscoder
  slot: pz.StateVariable
  layer: int = dataclasses.field(metadata={"pytree_node": False})
  site: Site = dataclasses.field(metadata={"pytree_node": False})
  skip_bos: bool = dataclasses.field(default=True, metadata={"pytree_node": False})

  def __call__(self, x: NamedArray, **side_inputs) -> NamedArray:
    target, back = plain(x)
    held = self.slot.value
    if held is None:
      raise ValueError(f"the cross-layer transcoder hook at {self.site} found no latents: "
                       "its reading hook at mlp_in did not run first in this call")
    y = crosslayer.output_of(self.clt, self.layer, held["writes"][self.layer], held["x"])
    if self.layer == self.clt.n_layers - 1:
      self.slot.value = None
    mask = position_mask(x, side_inputs, self.skip_bos)[..., None]
    return back(jnp.where(mask, y, target.astype(jnp.float32)).astype(target.dtype))


def direction_array(direction, axis: str, size: int | None = None) -> NamedArray:
  """A steering direction (d,) as a float32 NamedArray on ``axis``; checks its length.

  Accepts a plain vector or a NamedArray with a single axis of any name (e.g. a row of
  a decoder on ``embedding``).
  """
  if isinstance(direction, pz.nx.NamedArrayBase):
    names = tuple(direction.named_shape)
    if len(names) + len(direction.positional_shape) != 1:
      raise ValueError(f"a direction must have one axis, got {dict(direction.named_shape)} "
                       f"and positional {direction.positional_shape}")
    direction = direction.unwrap(*names)
  arr = jnp.asarray(direction, jnp.float32)
  if arr.ndim != 1:
    raise ValueError(f"a direction must be a vector (d,), got shape {tuple(arr.shape)}")
  if size is not None and arr.shape[0] != size:
    raise ValueError(f"the direction has {arr.shape[0]} entries but the site carries {size}")
  return pz.nx.wrap(arr).tag(axis)
