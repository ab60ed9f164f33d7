"""Gemma 3's vision encoder (SigLIP) and multimodal projector in pure JAX, over a params dict.

Gemma 3 4B, 12B and 27B read images: SigLIP (So400m/14 at 896 x 896) turns an image into
64 x 64 patch vectors, the projector average-pools them to 16 x 16 = 256 soft tokens,
RMS-normalises them (Gemma's ``1 + scale``) and projects them to the text width; those
vectors replace the embeddings of the ``<image_soft_token>`` positions of the prompt
(``dictlearn_penzai.vision`` does the stitching and the attention mask).

The canonical vision tree (flat, ``/``-joined) uses the names of the ``gemma`` package's
flax checkpoints, with ``E = "SigLiPFromPatches_0/siglip_encoder/"``; for width D, MLP F,
H heads of size K = D / H, P patches, patch side p, text width T:

  E + embedding/kernel                  (p, p, 3, D)   conv, HWIO
  E + embedding/bias                    (D,)
  E + pos_embedding                     (1, P, D)      learned, row-major patch order
  E + Transformer/encoderblock_{i}/LayerNorm_0/{scale,bias}         (D,)  before attention
  E + Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/{query,key,value}/kernel
                                        (D, H, K), bias (H, K)
  E + Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/out/kernel (H, K, D), bias (D,)
  E + Transformer/encoderblock_{i}/LayerNorm_1/{scale,bias}         (D,)  before the MLP
  E + Transformer/encoderblock_{i}/MlpBlock_0/Dense_0/kernel (D, F), bias (F,)
  E + Transformer/encoderblock_{i}/MlpBlock_0/Dense_1/kernel (F, D), bias (D,)
  E + Transformer/encoder_norm/{scale,bias}                         (D,)  post LayerNorm
  transformer/embedder/mm_soft_embedding_norm/scale                  (D,)  applied as 1 + scale
  transformer/embedder/mm_input_projection/w                         (D, T)

``dictlearn_gemma.load_vision`` reads it from transformers safetensors folders and the
``gemma`` package's orbax checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from dictlearn_gemma.params import name_some

ENCODER = "SigLiPFromPatches_0/siglip_encoder/"
BLOCK = ENCODER + "Transformer/encoderblock_{i}/"
ATTN = BLOCK + "MultiHeadDotProductAttention_0/"
SOFT_NORM = "transformer/embedder/mm_soft_embedding_norm/scale"
PROJECTION = "transformer/embedder/mm_input_projection/w"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SiglipConfig:
  """Sizes of Gemma 3's SigLIP encoder and projector.

  Attributes:
    image_size: input side in pixels (square images).
    patch_size: side of one patch (the conv's kernel and stride).
    hidden: SigLIP width D.
    intermediate: SigLIP MLP width F.
    layers: encoder blocks.
    heads: attention heads (D must be a multiple).
    layer_norm_eps: epsilon of every LayerNorm and of the projector's RMSNorm.
    mm_tokens_per_image: soft tokens per image after pooling (a square that divides the
      patch grid).
  """

  image_size: int = 896
  patch_size: int = 14
  hidden: int = 1152
  intermediate: int = 4304
  layers: int = 27
  heads: int = 16
  layer_norm_eps: float = 1e-6
  mm_tokens_per_image: int = 256

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                       f"{self.patch_size}")
    if self.hidden % self.heads:
      raise ValueError(f"hidden {self.hidden} is not a multiple of heads {self.heads}")
    side, tokens = self.patches_per_side, math.isqrt(self.mm_tokens_per_image)
    if tokens * tokens != self.mm_tokens_per_image or side % tokens:
      raise ValueError(f"mm_tokens_per_image {self.mm_tokens_per_image} must be a square whose "
                       f"side divides the {side} x {side} patch grid")

  @property
  def patches_per_side(self) -> int:
    return self.image_size // self.patch_size

  @property
  def head_dim(self) -> int:
    return self.hidden // self.heads

  @property
  def pool(self) -> int:
    """Side of the average-pooling window (4 for 64 x 64 patches -> 16 x 16 tokens)."""
    return self.patches_per_side // math.isqrt(self.mm_tokens_per_image)


# Gemma 3 4B, 12B and 27B share one vision tower.
GEMMA3_SIGLIP = SiglipConfig()


def expected_vision_shapes(config: SiglipConfig, d_model: int) -> dict[str, tuple[int, ...]]:
  """Every tensor of the canonical vision tree for ``config`` and text width ``d_model``."""
  p, d, f, h, k = (config.patch_size, config.hidden, config.intermediate, config.heads,
                   config.head_dim)
  shapes = {ENCODER + "embedding/kernel": (p, p, 3, d), ENCODER + "embedding/bias": (d,),
            ENCODER + "pos_embedding": (1, config.patches_per_side ** 2, d),
            ENCODER + "Transformer/encoder_norm/scale": (d,),
            ENCODER + "Transformer/encoder_norm/bias": (d,),
            SOFT_NORM: (d,), PROJECTION: (d, d_model)}
  for i in range(config.layers):
    b, a = BLOCK.format(i=i), ATTN.format(i=i)
    for norm in ("LayerNorm_0", "LayerNorm_1"):
      shapes[b + f"{norm}/scale"] = shapes[b + f"{norm}/bias"] = (d,)
    for name in ("query", "key", "value"):
      shapes[a + f"{name}/kernel"], shapes[a + f"{name}/bias"] = (d, h, k), (h, k)
    shapes[a + "out/kernel"], shapes[a + "out/bias"] = (h, k, d), (d,)
    shapes[b + "MlpBlock_0/Dense_0/kernel"], shapes[b + "MlpBlock_0/Dense_0/bias"] = (d, f), (f,)
    shapes[b + "MlpBlock_0/Dense_1/kernel"], shapes[b + "MlpBlock_0/Dense_1/bias"] = (f, d), (d,)
  return shapes


def infer_siglip_config(params: Mapping[str, Any], *, heads: int | None = None,
                        mm_tokens_per_image: int = 256, layer_norm_eps: float = 1e-6
                        ) -> SiglipConfig:
  """The ``SiglipConfig`` a canonical vision tree's shapes give.

  Heads come from the attention kernels' shapes; the pooled token count and epsilon are not
  in the weights (the defaults are Gemma 3's).

  Raises:
    ValueError: a tensor the sizes are read from is missing (named).
  """
  need = [ENCODER + "embedding/kernel", ENCODER + "pos_embedding",
          BLOCK.format(i=0) + "MlpBlock_0/Dense_0/kernel", ATTN.format(i=0) + "query/kernel"]
  missing = [k for k in need if k not in params]
  if missing:
    raise ValueError(f"not a Gemma 3 vision tree: missing {name_some(missing)}")
  kernel = params[ENCODER + "embedding/kernel"]
  patches = params[ENCODER + "pos_embedding"].shape[-2]
  side = math.isqrt(patches)
  if side * side != patches:
    raise ValueError(f"{ENCODER}pos_embedding holds {patches} positions, not a square grid")
  layers = {int(m.group(1)) for k in params
            if (m := re.match(re.escape(ENCODER) + r"Transformer/encoderblock_(\d+)/", k))}
  query = params[ATTN.format(i=0) + "query/kernel"]
  return SiglipConfig(
      image_size=side * kernel.shape[0], patch_size=kernel.shape[0], hidden=kernel.shape[-1],
      intermediate=params[BLOCK.format(i=0) + "MlpBlock_0/Dense_0/kernel"].shape[-1],
      layers=max(layers) + 1, heads=heads or query.shape[1], layer_norm_eps=layer_norm_eps,
      mm_tokens_per_image=mm_tokens_per_image)


def check_vision_params(params: Mapping[str, Any], config: SiglipConfig,
                        d_model: int | None = None, source: str = "checkpoint") -> None:
  """Raises ValueError naming every missing, unexpected or misshaped vision tensor."""
  if d_model is None:
    d_model = params[PROJECTION].shape[-1] if PROJECTION in params else -1
  want = expected_vision_shapes(config, d_model)
  missing = [k for k in want if k not in params]
  extra = sorted(k for k in params if k not in want)
  problems = []
  if missing:
    problems.append(f"missing {len(missing)} vision tensor(s): {name_some(missing)}")
  if extra:
    problems.append(f"{len(extra)} unexpected tensor(s): {name_some(extra)}")
  bad = [f"{k}: {tuple(params[k].shape)}, expected {s}" for k, s in want.items()
         if k in params and tuple(params[k].shape) != s]
  if bad:
    problems.append("wrong shapes: " + "; ".join(bad[:12]))
  if problems:
    raise ValueError(f"{source}: " + ". ".join(problems))


def _layer_norm(x, scale, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def _block(x, p: Mapping[str, jax.Array], i: int, config: SiglipConfig):
  b, a, eps = BLOCK.format(i=i), ATTN.format(i=i), config.layer_norm_eps
  y = _layer_norm(x, p[b + "LayerNorm_0/scale"], p[b + "LayerNorm_0/bias"], eps)
  q, k, v = (jnp.einsum("npd,dhk->nphk", y, p[a + f"{n}/kernel"]) + p[a + f"{n}/bias"]
             for n in ("query", "key", "value"))
  scores = jnp.einsum("nqhk,nshk->nhqs", q, k) * (config.head_dim ** -0.5)
  weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
  attn = jnp.einsum("nhqs,nshk->nqhk", weights, v)  # Bidirectional: every patch sees all.
  x = x + jnp.einsum("nqhk,hkd->nqd", attn, p[a + "out/kernel"]) + p[a + "out/bias"]
  y = _layer_norm(x, p[b + "LayerNorm_1/scale"], p[b + "LayerNorm_1/bias"], eps)
  y = jax.nn.gelu(y @ p[b + "MlpBlock_0/Dense_0/kernel"] + p[b + "MlpBlock_0/Dense_0/bias"],
                  approximate=True)
  return x + y @ p[b + "MlpBlock_0/Dense_1/kernel"] + p[b + "MlpBlock_0/Dense_1/bias"]


def siglip_encode(params: Mapping[str, jax.Array], pixels: jax.Array, config: SiglipConfig
                  ) -> jax.Array:
  """SigLIP: pixels ``(n, S, S, 3)`` (see ``image_preprocess``) -> ``(n, P, D)`` patch
  vectors after the post LayerNorm, patches in row-major order (P = (S / patch)^2)."""
  kernel = params[ENCODER + "embedding/kernel"]
  x = jax.lax.conv_general_dilated(
      pixels.astype(kernel.dtype), kernel, window_strides=(config.patch_size,) * 2,
      padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  n, h, w, d = x.shape
  x = x.reshape(n, h * w, d) + params[ENCODER + "embedding/bias"]
  x = x + params[ENCODER + "pos_embedding"][0]
  for i in range(config.layers):
    x = _block(x, params, i, config)
  return _layer_norm(x, params[ENCODER + "Transformer/encoder_norm/scale"],
                     params[ENCODER + "Transformer/encoder_norm/bias"], config.layer_norm_eps)


def project(params: Mapping[str, jax.Array], patches: jax.Array, config: SiglipConfig
            ) -> jax.Array:
  """The projector: ``(n, P, D)`` -> ``(n, mm_tokens_per_image, T)``.

  Average pool over ``pool x pool`` windows of the patch grid (row-major tokens), RMSNorm
  with ``1 + scale`` (in float32), then the projection to the text width.
  """
  n, _, d = patches.shape
  side, k = config.patches_per_side, config.pool
  grid = patches.reshape(n, side // k, k, side // k, k, d)
  pooled = grid.mean(axis=(2, 4)).reshape(n, -1, d)
  x = pooled.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + config.layer_norm_eps)
  x = (x * (1.0 + params[SOFT_NORM].astype(jnp.float32))).astype(patches.dtype)
  return x @ params[PROJECTION]


def encode_images(params: Mapping[str, jax.Array], pixels, config: SiglipConfig) -> jax.Array:
  """Images -> soft tokens: ``(n, S, S, 3)`` pixels -> ``(n, mm_tokens_per_image, d_model)``.

  ``pixels`` come from ``dictlearn_gemma.image_preprocess.preprocess_images`` (channels
  last, in [-1, 1]). The result is what replaces the embeddings at the image-token
  positions (not scaled by sqrt(d_model), unlike text embeddings).

  Raises:
    ValueError: pixels of the wrong shape.
  """
  pixels = jnp.asarray(pixels)
  want = (config.image_size, config.image_size, 3)
  if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want:
    raise ValueError(f"pixels must be (n, {want[0]}, {want[1]}, 3) (channels last, from "
                     f"preprocess_images), got {tuple(pixels.shape)}")
  return _encode_jit(dict(params), pixels, config)


def _encode(params, pixels, config):
  return project(params, siglip_encode(params, pixels, config), config)


_encode_jit = jax.jit(_encode, static_argnums=2)


__all__ = ["GEMMA3_SIGLIP", "PROJECTION", "SOFT_NORM", "SiglipConfig", "check_vision_params",
           "encode_images", "expected_vision_shapes", "infer_siglip_config", "project",
           "siglip_encode"]
