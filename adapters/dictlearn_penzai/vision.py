"""Images in the penzai Gemma 3 (4B, 12B, 27B): soft tokens stitched into the text, and the
attention mask transformers uses for them.

A vision-language Gemma 3 is the text model of ``from_gemma_params`` with two changes
(``attach_vision``), so sites, hooks, dictionaries and analyses work unchanged:

- ``StitchImages`` right after the embedding scale: it holds the SigLIP encoder and
  projector weights (``dictlearn_gemma.vision``) and, when the ``image_features`` and
  ``image_index`` side inputs are given, puts the image soft tokens at the image-token
  positions. As in transformers, they replace the embeddings *after* the sqrt(d_model) scale
  (soft tokens are not scaled).
- each attention mask is wrapped in ``ImageAttentionMask``: with the ``image_blocks`` side
  input, tokens of one image attend to each other both ways; everything else stays causal,
  and on sliding-window layers the window still applies (transformers 5.x
  ``create_masks_for_vision_model``: global ``causal OR same image``, local
  ``(causal OR same image) AND kv > q - window``).

Without those side inputs both layers do exactly what the text model did, so text-only
calls give identical results. The 270M and 1B have no vision weights and are never wrapped.

Usage::

  model, tok = dictlearn_penzai.load_gemma("gemma-3-4b-it/")      # vision attached
  inputs = vision.prepare(model, tok, "<start_of_image>What is this?", ["cat.png"])
  logits, cache = hooks.run_with_cache(model, inputs.tokens, ["resid_post.20"],
                                       **inputs.side_inputs)
  top = analysis.top_latents(sae, cache["resid_post.20"], mask=inputs.image_positions)

Side inputs (all NamedArrays): ``image_features`` (``image_tokens``, ``embedding``): the soft
tokens of every image in order; ``image_index`` (batch, seq) int: the row of
``image_features`` at each image token, -1 elsewhere; ``image_blocks`` (batch, seq) int: the
image each image token belongs to, -1 elsewhere; in a KV-cached prefill also
``kv_image_blocks`` (batch, cache length), the same for the whole cache (``generate_greedy``
does this; decode steps are text and need none).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from dictlearn_gemma.image_preprocess import preprocess_images
from dictlearn_gemma.load_vision import VisionCheckpoint
from dictlearn_gemma.vision import SiglipConfig, encode_images

BOI_TEXT = "<start_of_image>"
EOI_TEXT = "<end_of_image>"


@pz.pytree_dataclass
class StitchImages(pz.nn.Layer):
  """Puts image soft tokens at the image-token positions of the scaled text embeddings.

  Input and output: NamedArray (batch..., seq, embedding). Side inputs ``image_features``
  and ``image_index`` (see the module doc); without them the input is returned unchanged.

  Attributes:
    vision_params: the canonical SigLIP + projector tree (``dictlearn_gemma.vision``).
    vision_config: its sizes.
    boi_id, eoi_id, image_id: ``<start_of_image>``, ``<end_of_image>``, ``<image_soft_token>``.
  """

  vision_params: dict[str, jax.Array]
  vision_config: SiglipConfig = dataclasses.field(metadata={"pytree_node": False})
  boi_id: int = dataclasses.field(metadata={"pytree_node": False})
  eoi_id: int = dataclasses.field(metadata={"pytree_node": False})
  image_id: int = dataclasses.field(metadata={"pytree_node": False})

  def __call__(self, x: pz.nx.NamedArray, **side_inputs) -> pz.nx.NamedArray:
    features = side_inputs.get("image_features")
    index = side_inputs.get("image_index")
    if features is None or index is None:
      return x
    rows = features.untag("image_tokens")
    picked = pz.nx.nmap(lambda f, i: f[jnp.maximum(i, 0)])(rows, index)
    return pz.nx.nmap(jnp.where)(index >= 0, picked.astype(x.dtype), x)

  def encode(self, pixels) -> jax.Array:
    """Pixels ``(n, S, S, 3)`` -> soft tokens ``(n, mm_tokens_per_image, d_model)``.

    One image at a time (one compilation): SigLIP's attention scores alone are 1 GB per
    896 px image in float32 (16 heads x 4096 x 4096).
    """
    return jnp.concatenate([encode_images(self.vision_params, pixels[i:i + 1],
                                          self.vision_config) for i in range(len(pixels))])


@pz.pytree_dataclass
class ImageAttentionMask(pz.nn.Layer):
  """An attention mask layer that also lets the tokens of one image see each other.

  Wraps penzai's causal (``sliding_window`` None) or sliding-window mask, which runs alone
  when there is no ``image_blocks`` side input. With it: attend where
  ``(q >= kv or same image block) and kv >= 0`` and, on sliding layers,
  ``q - kv < window`` (transformers' ``kv > q - window``), by token positions.
  """

  base: pz.nn.Layer
  sliding_window: int | None = dataclasses.field(metadata={"pytree_node": False})

  def __call__(self, x: pz.nx.NamedArray, **side_inputs) -> pz.nx.NamedArray:
    blocks = side_inputs.get("image_blocks")
    if blocks is None:
      return self.base(x, **side_inputs)
    b = self.base
    q = side_inputs[b.query_positions_input_name]
    kv_positions = side_inputs[b.kv_positions_input_name]
    # KV-cached prefill: the keys are the whole cache, whose blocks come separately.
    kv_blocks = side_inputs.get("kv_image_blocks", blocks)
    if kv_positions.named_shape[b.seq_axis] != kv_blocks.named_shape[b.seq_axis]:
      raise ValueError("a KV-cached model needs the image blocks of the whole cache "
                       "(kv_image_blocks): use dictlearn_penzai.vision.generate_greedy")
    kv = kv_positions.untag(b.seq_axis).tag(b.kv_seq_axis)
    kv_blocks = kv_blocks.untag(b.seq_axis).tag(b.kv_seq_axis)
    allowed = ((q >= kv) | ((blocks == kv_blocks) & (blocks >= 0))) & (kv >= 0)
    if self.sliding_window is not None:
      allowed = allowed & (q - kv < self.sliding_window)
    return pz.nx.nmap(jnp.where)(allowed, x, b.masked_out_value)


def attach_vision(model, vision: VisionCheckpoint, dtype: Any = None):
  """``model`` (a Gemma 3 from ``from_gemma_params``) with ``vision`` attached.

  Args:
    model: the text model; its width must be the projector's output width.
    vision: from ``dictlearn_gemma.load_vision``.
    dtype: the vision weights' dtype (None: as loaded).

  Raises:
    ValueError: the model already has vision, or the widths differ.
  """
  if pz.select(model).at_instances_of(StitchImages).count():
    raise ValueError("this model already has a vision tower attached")
  d_model = model.metadata.embedding_dim
  if vision.d_model != d_model:
    raise ValueError(f"the vision projector writes {vision.d_model} features but the text "
                     f"model's width is {d_model}: the weights come from different models")
  params = {k: jnp.asarray(v, dtype) for k, v in vision.params.items()}
  stitch = StitchImages(vision_params=params, vision_config=vision.config,
                        boi_id=vision.boi_id, eoi_id=vision.eoi_id, image_id=vision.image_id)
  # The embedding scale is the first ConstantRescale of the body (before any block).
  body = model.body.sublayers
  at = next(i for i, layer in enumerate(body) if isinstance(layer, pz.nn.ConstantRescale))
  model = dataclasses.replace(model, body=dataclasses.replace(
      model.body, sublayers=[*body[:at + 1], stitch, *body[at + 1:]]))
  causal = pz.nn.ApplyCausalAttentionMask | pz.nn.ApplyCausalSlidingWindowAttentionMask
  return pz.select(model).at_instances_of(causal).apply(
      lambda m: ImageAttentionMask(base=m, sliding_window=getattr(m, "sliding_window_size",
                                                                  None)))


def vision_of(model) -> StitchImages:
  """The ``StitchImages`` layer of a model with vision.

  Raises:
    ValueError: the model has none (a text-only Gemma 3: 270M, 1B, or loaded without it).
  """
  found = pz.select(model).at_instances_of(StitchImages).get_sequence()
  if not found:
    raise ValueError("this model has no vision tower: images need a Gemma 3 4B, 12B or 27B "
                     "checkpoint with its vision weights, loaded with "
                     "dictlearn_penzai.load_gemma (the 270M and 1B read text only)")
  return found[0]


@dataclasses.dataclass
class VisionInputs:
  """A prompt with images, ready for ``hooks.call`` / ``run_with_cache`` / analyses.

  Attributes:
    tokens: (batch, seq) int32 ids, BOS first (left-padded with the pad id in a batch),
      each image as ``\\n\\n <start_of_image>``, mm_tokens_per_image image tokens,
      ``<end_of_image> \\n\\n`` (Gemma3Processor's layout).
    image_positions: (batch, seq) bool, True at the image soft tokens.
    image_index: (batch, seq) int32, the row of ``features`` (flattened to (n_images *
      mm_tokens_per_image, d_model)) at image tokens, -1 elsewhere.
    image_blocks: (batch, seq) int32, which image of its row each image token belongs to
      (0, 1, ...), -1 elsewhere.
    pixels: (n_images, S, S, 3) float32 preprocessed images, all rows' in order.
    features: (n_images, mm_tokens_per_image, d_model) soft tokens.
  """

  tokens: np.ndarray
  image_positions: np.ndarray
  image_index: np.ndarray
  image_blocks: np.ndarray
  pixels: np.ndarray
  features: jax.Array

  @property
  def side_inputs(self) -> dict[str, pz.nx.NamedArray]:
    """``image_features``, ``image_index``, ``image_blocks`` for ``model(tokens, **...)``."""
    n, t, d = self.features.shape
    return {"image_features": pz.nx.wrap(jnp.reshape(self.features, (n * t, d))).tag(
                "image_tokens", "embedding"),
            "image_index": pz.nx.wrap(jnp.asarray(self.image_index)).tag("batch", "seq"),
            "image_blocks": pz.nx.wrap(jnp.asarray(self.image_blocks)).tag("batch", "seq")}

  def token_strings(self, tokenizer, row: int = 0) -> list[str]:
    """One display string per token of ``row``; image soft tokens as ``<img k>`` (k = the
    feature row)."""
    return token_strings(tokenizer, self.tokens[row], self.image_index[row])


def token_strings(tokenizer, ids, image_index=None) -> list[str]:
  """``analysis.token_strings`` with image soft tokens shown as ``<img k>``."""
  ids = np.asarray(ids).reshape(-1)
  index = np.full(ids.shape, -1) if image_index is None else np.asarray(image_index).reshape(-1)
  return [f"<img {int(k)}>" if k >= 0 else tokenizer.decode([int(i)])
          for i, k in zip(ids.tolist(), index.tolist())]


def image_blocks_of(is_image: np.ndarray) -> np.ndarray:
  """transformers' block ids: each run of consecutive image tokens is one block (0, 1, ...
  per row), -1 elsewhere. ``is_image`` (batch, seq) bool -> (batch, seq) int32."""
  is_image = np.asarray(is_image, bool)
  starts = is_image & ~np.pad(is_image, ((0, 0), (1, 0)))[:, :-1]
  return np.where(is_image, np.cumsum(starts, axis=1) - 1, -1).astype(np.int32)


def expand_prompt(tokenizer, prompt: str, n_images: int, *, boi_id: int, eoi_id: int,
                  image_id: int, tokens_per_image: int) -> np.ndarray:
  """Token ids of ``prompt`` with each ``<start_of_image>`` expanded as Gemma3Processor does.

  A prompt without placeholders gets the images at its start. BOS first.

  Raises:
    ValueError: as many placeholders as images are needed; the tokenizer's image markers must
      be the model's.
  """
  count = prompt.count(BOI_TEXT)
  if count == 0:
    prompt, count = BOI_TEXT * n_images + prompt, n_images
  if count != n_images:
    raise ValueError(f"the prompt has {count} {BOI_TEXT} placeholder(s) but {n_images} "
                     "image(s) were given: put one placeholder where each image goes")
  for text, want in ((BOI_TEXT, boi_id), (EOI_TEXT, eoi_id)):
    got = tokenizer.encode(text, add_bos=False)
    if got != [want]:
      raise ValueError(f"the tokenizer spells {text} as {got}, the model expects [{want}]: "
                       "use the tokenizer that came with this model")
  # The processor replaces each placeholder by "\n\n<boi>" + image tokens + "<eoi>\n\n" and
  # tokenizes the whole string; the markers are special tokens, so encoding the text with
  # <boi><eoi> and inserting the image tokens after each <boi> gives the same ids.
  ids = tokenizer.encode(prompt.replace(BOI_TEXT, f"\n\n{BOI_TEXT}{EOI_TEXT}\n\n"), add_bos=True)
  out = []
  for i in ids:
    out.append(i)
    if i == boi_id:
      out.extend([image_id] * tokens_per_image)
  return np.asarray(out, np.int32)[None]


def prepare(model, tokenizer, prompt: str | Sequence[str], images: Any | Sequence[Any], *,
            pad_id: int = 0) -> VisionInputs:
  """Tokens and side inputs for a prompt with images, or a batch of them.

  Args:
    model: a Gemma 3 with vision (``load_gemma`` of a 4B+ folder, or ``attach_vision``).
    tokenizer: its tokenizer (``<start_of_image>`` and ``<end_of_image>`` must be its
      special tokens, as in Gemma 3's).
    prompt: text with one ``<start_of_image>`` where each image goes (none: the images go
      first), e.g. ``format_chat("<start_of_image>Describe this image.")``; or a list of
      such texts (a batch, left-padded with ``pad_id`` as ``sampling.pad_batch`` does).
    images: for one prompt, one image or a list (PIL images, paths, uint8 / float arrays;
      see ``dictlearn_gemma.image_preprocess``); for a batch, one list per prompt (an
      empty list for a prompt without images).

  Returns:
    ``VisionInputs``: ``tokens`` and ``side_inputs`` for ``hooks.call`` / ``run_with_cache``
    (positions come from the padding there), ``image_positions`` for
    ``analysis.top_latents(..., mask=...)``.

  Raises:
    ValueError: placeholders and images do not match, no image at all, bad images.
  """
  from dictlearn_penzai.sampling import pad_batch

  stitch = vision_of(model)
  config = stitch.vision_config
  batched = not isinstance(prompt, str)
  prompts = list(prompt) if batched else [prompt]
  per_prompt = list(images) if batched else [images]
  if len(per_prompt) != len(prompts):
    raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} image lists: give one "
                     "list of images per prompt (an empty one for none)")
  rows, pixels = [], []
  for text, imgs in zip(prompts, per_prompt):
    imgs = list(imgs) if isinstance(imgs, (list, tuple)) else [imgs]
    px = (preprocess_images(imgs, config.image_size) if imgs
          else np.zeros((0, config.image_size, config.image_size, 3), np.float32))
    rows.append(expand_prompt(tokenizer, text, len(px), boi_id=stitch.boi_id,
                              eoi_id=stitch.eoi_id, image_id=stitch.image_id,
                              tokens_per_image=config.mm_tokens_per_image)[0])
    pixels.append(px)
  pixels = np.concatenate(pixels)
  if not len(pixels):
    raise ValueError("no images given: call the model without vision side inputs")
  tokens = pad_batch(rows, pad_id=pad_id, side="left")
  is_image = tokens == stitch.image_id
  # Feature rows follow the images in order, row after row.
  flat = np.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1
  index = np.where(is_image, flat, -1).astype(np.int32)
  return VisionInputs(tokens=tokens, image_positions=is_image, image_index=index,
                      image_blocks=image_blocks_of(is_image), pixels=pixels,
                      features=stitch.encode(pixels))


def extend(inputs: VisionInputs, new_ids) -> VisionInputs:
  """``inputs`` with text tokens appended: ``new_ids`` (k,) for every row, or (batch, k)."""
  b = inputs.tokens.shape[0]
  new = np.asarray(new_ids, np.int32)
  new = np.broadcast_to(new, (b, new.shape[0])) if new.ndim == 1 else new
  if new.shape[0] != b:
    raise ValueError(f"new ids for {new.shape[0]} rows, the batch has {b}")
  pad = lambda a, v: np.concatenate([a, np.full(new.shape, v, a.dtype)], axis=1)
  return dataclasses.replace(
      inputs, tokens=np.concatenate([inputs.tokens, new], 1),
      image_positions=pad(inputs.image_positions, False), image_index=pad(inputs.image_index, -1),
      image_blocks=pad(inputs.image_blocks, -1))


def generate_greedy(model, inputs: VisionInputs, max_new_tokens: int, *,
                    stop_ids: Sequence[int] = (), pad_id: int = 0,
                    cached: bool = True) -> np.ndarray:
  """Greedy continuation of one prompt with images: ``(n,)`` new ids (the stop id included).

  ``cached`` (default): penzai's KV-cached model; the prefill carries the images (and the
  image blocks of the whole cache, ``kv_image_blocks``), the decode steps are text. Else an
  uncached loop, each step running the whole sequence again, padded on the right to its
  final length (position -1, masked out) so all steps share one compilation. The pad id is
  never picked (as ``sampling.generate_tokens``).
  """
  from dictlearn_penzai import hooks
  from dictlearn_penzai.sampling import make_kv_cached

  if inputs.tokens.shape[0] != 1:
    raise ValueError(f"generate_greedy continues one prompt; got a batch of "
                     f"{inputs.tokens.shape[0]}")
  n = inputs.tokens.shape[1]

  def pick(logits, at):
    last = np.array(logits.unwrap("batch", "seq", "vocabulary")[0, at], np.float32)
    if pad_id is not None:
      last[pad_id] = -np.inf
    return int(np.argmax(last))

  new = []
  if cached:
    kv_model = make_kv_cached(model, batch_size=1, cache_len=n + max_new_tokens, pad_id=pad_id)
    side = inputs.side_inputs
    side["kv_image_blocks"] = pz.nx.wrap(jnp.asarray(extend(
        inputs, [pad_id] * max_new_tokens).image_blocks)).tag("batch", "seq")
    logits = hooks.call(kv_model, inputs.tokens, **side)
    for step in range(max_new_tokens):
      new.append(pick(logits, -1))
      if new[-1] in stop_ids or step == max_new_tokens - 1:
        break
      logits = hooks.call(kv_model, np.asarray([[new[-1]]], np.int32))
    return np.asarray(new, np.int32)
  full = extend(inputs, [pad_id] * max_new_tokens)
  tokens = full.tokens.copy()
  positions = np.where(np.arange(n + max_new_tokens) < n, np.arange(n + max_new_tokens), -1)
  side = full.side_inputs
  for step in range(max_new_tokens):
    logits = hooks.call(model, tokens, token_positions=pz.nx.wrap(
        jnp.asarray(positions[None], jnp.int32)).tag("batch", "seq"), **side)
    new.append(pick(logits, n + step - 1))
    if new[-1] in stop_ids:
      break
    tokens[0, n + step] = new[-1]
    positions[n + step] = n + step
  return np.asarray(new, np.int32)


__all__ = ["ImageAttentionMask", "StitchImages", "VisionInputs", "attach_vision",
           "expand_prompt", "extend", "generate_greedy", "image_blocks_of", "prepare",
           "token_strings", "vision_of"]
