"""Gemma 3 text models as penzai ``TransformerLM``s, built from the canonical param tree.

Built from penzai parts (``pz.nn.Attention``, ``Linear``, ``RMSLayerNorm``,
``NamedEinsum``, causal and sliding-window masks, ``EmbeddingLookup``/``EmbeddingDecode``
on one shared table), so ``KVCachingTransformerLM.from_uncached`` converts it to KV-cached
sampling mode unchanged. Two small layers are added: RoPE with a linear scale factor
(global layers of 4B+) and a head merge before o_proj (so ``attn_z`` has one ``heads`` axis
whatever the attention grouping).

One block, with the HookPoints (``dictlearn.sites.KINDS``) where they sit::

  HookPoint(resid_pre)                             [batch, seq, embedding]
  Residual(                                        attention sub-block
    pre_attention_norm
    Attention(q: Linear, query_norm, RoPE, scale | k: Linear, key_norm, RoPE | v: Linear
              q.k -> causal or sliding-window mask -> softmax -> . v
              -> MergeHeads -> HookPoint(attn_z) [batch, seq, heads, projection] -> o_proj)
    post_attention_norm
    HookPoint(attn_out))                           [batch, seq, embedding]
  HookPoint(resid_mid)
  Residual(pre_ffw_norm, HookPoint(mlp_in), GeGLU MLP, post_ffw_norm, HookPoint(mlp_out))
  HookPoint(resid_post)

Side inputs (``token_positions``, and in sampling mode ``kv_token_positions`` and
``cache_end_index``) reach every layer: ``Sequential`` and ``Residual`` forward them all.
Axis names follow penzai's transformer conventions (``model_parts`` docstring); queries
and keys use penzai's head layout (``heads``; or ``query_heads`` for one kv head; or
``head_groups`` x ``query_heads`` for grouped-query attention).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models.transformer import model_parts

from dictlearn_gemma.config import Gemma3Config
from dictlearn_gemma.params import (
    PREFIX, check_params, layer_prefix, normalize_gemma_params, resolve_config)
from dictlearn_penzai.hookpoint import HookPoint

# The flax reference's K_MASK: large but finite, so fully masked rows (padding) stay finite.
_MASKED_OUT = -2.3819763e38


@dataclasses.dataclass
class Gemma3Metadata(model_parts.TransformerMetadata):
  """penzai's transformer metadata plus the Gemma 3 config it was built from."""

  config: Gemma3Config | None = None


def model_config(model: Any) -> Gemma3Config:
  """The ``Gemma3Config`` of a model built here (plain or KV-cached); for a Gemma 2 from
  ``from_gemma2_params``, its ``Gemma2Config``."""
  metadata = getattr(model, "metadata", None)
  config = getattr(metadata, "config", None)
  if config is None:
    raise ValueError("this model was not built by dictlearn_penzai.from_gemma_params "
                     "(or from_gemma2_params)")
  return config


@pz.pytree_dataclass
class ApplyScaledRoPE(pz.nn.Layer):
  """Rotary position embedding with linear position scaling (``positions / scale_factor``).

  Same rotation as ``pz.nn.ApplyRoPE`` (first half / second half pairs, as Gemma and
  transformers' ``rotate_half``); the scale factor is Gemma 3's ``rope_scale_factor`` on
  global layers of 4B+ (transformers: ``rope_scaling={"rope_type": "linear", "factor": 8}``).

  Input: NamedArray with ``embedding_axis`` (head_dim) and the axes of the positions side
  input (int, e.g. batch, seq). Output: same axes and dtype.
  """

  embedding_axis: str = dataclasses.field(metadata={"pytree_node": False})
  max_wavelength: float = dataclasses.field(metadata={"pytree_node": False})
  scale_factor: float = dataclasses.field(metadata={"pytree_node": False})
  positions_input_name: str = dataclasses.field(metadata={"pytree_node": False})

  def __call__(self, inputs: pz.nx.NamedArray, **side_inputs) -> pz.nx.NamedArray:
    positions = side_inputs[self.positions_input_name]
    head_dim = inputs.named_shape[self.embedding_axis]
    fraction = 2 * jnp.arange(head_dim // 2, dtype=jnp.float32) / head_dim
    timescale = self.max_wavelength ** fraction

    def rotate(x, position):
      angle = position.astype(jnp.float32) / timescale / self.scale_factor
      sin, cos = jnp.sin(angle), jnp.cos(angle)
      first, second = jnp.split(x, 2)
      return jnp.concatenate([first * cos - second * sin, second * cos + first * sin])

    out = pz.nx.nmap(rotate)(inputs.untag(self.embedding_axis), positions)
    return out.tag(self.embedding_axis).astype(inputs.dtype)


@pz.pytree_dataclass
class MergeHeads(pz.nn.Layer):
  """Flattens penzai's grouped head axes into one ``heads`` axis (group-major).

  ``{head_groups: K, query_heads: N/K, ...} -> {heads: N, ...}``: head ``h = g * (N/K) + q``,
  the order of the checkpoints' ``attn_vec_einsum`` and of transformers' o_proj input.
  """

  source_axes: tuple[str, ...] = dataclasses.field(metadata={"pytree_node": False})

  def __call__(self, x: pz.nx.NamedArray, **_unused_side_inputs) -> pz.nx.NamedArray:
    return pz.nx.nmap(jnp.reshape)(x.untag(*self.source_axes), (-1,)).tag("heads")


def gelu_tanh(x):
  """Approximate (tanh) GELU: flax's ``nn.gelu`` default, transformers' gelu_pytorch_tanh.

  A module-level function, not a fresh ``functools.partial`` per model: the layer holding it
  is static pytree data, and equal models must compare equal so jit reuses compilations.
  """
  return jax.nn.gelu(x, approximate=True)


def _head_axes(config: Gemma3Config):
  """(axes shared by q/k/v, axes of q only), in penzai's naming."""
  k, m = config.num_kv_heads, config.queries_per_kv_head
  if m == 1:
    return {"heads": k}, {}
  if k == 1:
    return {}, {"query_heads": m}
  return {"head_groups": k}, {"query_heads": m}


def _param(label: str, value, axes: tuple[str, ...], dtype) -> pz.Parameter:
  return pz.Parameter(value=pz.nx.wrap(jnp.asarray(value, dtype=dtype)).tag(*axes), label=label)


def _linear(label, value, axes, in_axes, out_axes, dtype) -> pz.nn.Linear:
  return pz.nn.Linear(weights=_param(f"{label}.weights", value, axes, dtype),
                      in_axis_names=tuple(in_axes), out_axis_names=tuple(out_axes))


def _rms_norm(label, scale, axis: str, eps: float, dtype) -> pz.nn.RMSLayerNorm:
  # Gemma applies (1 + scale); adding the 1 in float32 before the cast rounds once, exactly
  # as the reference does when it adds 1 to a bfloat16 scale.
  weight = 1.0 + np.asarray(scale, dtype=np.float32)
  return pz.nn.RMSLayerNorm([
      pz.nn.RMSStandardize(across=(axis,), epsilon=jnp.asarray(eps, dtype=dtype)),
      pz.nn.Linear(weights=_param(f"{label}/scale.weights", weight, (axis,), dtype),
                   in_axis_names=(), out_axis_names=()),
  ])


def _split_heads(w: np.ndarray, config: Gemma3Config, tail: tuple[str, ...]):
  """(N, *rest) query-side weight -> (array, axis names) in penzai's head layout."""
  common, q_only = _head_axes(config)
  shape = (*common.values(), *q_only.values(), *w.shape[1:])
  return w.reshape(shape), (*common, *q_only, *tail)


def qkv_weights(p: Mapping[str, Any], pre: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(q, k, v) einsum weights of the attention under ``pre`` (".../attn/"): one stacked
  ``qkv_einsum`` (multi-head checkpoints) or ``q_einsum`` + ``kv_einsum``."""
  if pre + "qkv_einsum/w" in p:
    qkv = np.asarray(p[pre + "qkv_einsum/w"])
    return qkv[0], qkv[1], qkv[2]
  kv = np.asarray(p[pre + "kv_einsum/w"])
  return np.asarray(p[pre + "q_einsum/w"]), kv[0], kv[1]


def _attention(i: int, p: Mapping[str, Any], config: Gemma3Config, dt, act, norm_dt):
  name = f"transformer/block_{i}/attention"
  pre = layer_prefix(i) + "attn/"
  common, q_only = _head_axes(config)
  k = config.num_kv_heads
  wq, wk, wv = qkv_weights(p, pre)
  wq, q_axes = _split_heads(wq, config, ("embedding", "projection"))
  if k == 1:
    wk, wv, kv_axes = wk[0], wv[0], ("embedding", "projection")
  else:
    kv_axes = (*common, "embedding", "projection")
  wo = p[pre + "attn_vec_einsum/w"]  # (N, H, D): o_proj reads the merged heads axis.
  base, scale = config.rope(i)
  rope = ApplyScaledRoPE(embedding_axis="projection", max_wavelength=base, scale_factor=scale,
                         positions_input_name="token_positions")
  eps = config.rms_norm_eps
  letters = {"heads": "h", "head_groups": "hg", "query_heads": "hq"}
  common_e = {a: letters[a] for a in common}
  q_e = {a: letters[a] for a in q_only}
  masked = jnp.array(_MASKED_OUT, dtype=act)
  if config.is_global(i):
    mask = pz.nn.ApplyCausalAttentionMask(masked_out_value=masked)
  else:
    mask = pz.nn.ApplyCausalSlidingWindowAttentionMask(
        masked_out_value=masked, sliding_window_size=config.sliding_window)
  merge = [] if list(common) == ["heads"] else [MergeHeads(source_axes=(*common, *q_only))]
  return pz.nn.Attention(
      input_to_query=pz.nn.Sequential([
          _linear(f"{name}/query", wq, q_axes, ("embedding",), (*common, *q_only, "projection"),
                  dt),
          _rms_norm(f"{name}/query_norm", p[pre + "_query_norm/scale"], "projection", eps, norm_dt),
          rope,
          pz.nn.ConstantRescale(by=jnp.array(config.query_scale, dtype=act)),
      ]),
      input_to_key=pz.nn.Sequential([
          _linear(f"{name}/key", wk, kv_axes, ("embedding",), (*common, "projection"), dt),
          _rms_norm(f"{name}/key_norm", p[pre + "_key_norm/scale"], "projection", eps, norm_dt),
          rope,
      ]),
      input_to_value=pz.nn.Sequential([
          _linear(f"{name}/value", wv, kv_axes, ("embedding",), (*common, "projection"), dt),
      ]),
      query_key_to_attn=pz.nn.Sequential([
          pz.nn.NamedEinsum(
              ({"seq": "tq", **common_e, **q_e, "projection": "p"},
               {"seq": "tkv", **common_e, "projection": "p"}),
              {"seq": "tq", **common_e, **q_e, "kv_seq": "tkv"}),
          mask,
          pz.nn.Softmax("kv_seq"),
      ]),
      attn_value_to_output=pz.nn.Sequential([
          pz.nn.NamedEinsum(
              ({"seq": "tq", **common_e, **q_e, "kv_seq": "tkv"},
               {"seq": "tkv", **common_e, "projection": "p"}),
              {"seq": "tq", **common_e, **q_e, "projection": "p"}),
          *merge,
          HookPoint("attn_z", i),
          _linear(f"{name}/output", wo, ("heads", "projection", "embedding"),
                  ("heads", "projection"), ("embedding",), dt),
      ]),
  )


def _mlp(i: int, p: Mapping[str, Any], config: Gemma3Config, dt):
  name = f"transformer/block_{i}/mlp"
  gating = np.asarray(p[layer_prefix(i) + "mlp/gating_einsum/w"])
  if gating.shape[1:] == (config.d_model, config.hidden_dim) and (
      config.d_model != config.hidden_dim):
    gating = gating.transpose(0, 2, 1)  # Pre-Gemma-3 (2, D, F) layout.
  return model_parts.TransformerFeedForward([
      pz.nn.BranchAndMultiplyTogether(branches=[
          pz.nn.NamedGroup("gate", [
              _linear(f"{name}/gating_linear", gating[0], ("neurons", "embedding"),
                      ("embedding",), ("neurons",), dt),
              pz.nn.Elementwise(gelu_tanh),
          ]),
          _linear(f"{name}/value_linear", gating[1], ("neurons", "embedding"), ("embedding",),
                  ("neurons",), dt),
      ]),
      _linear(f"{name}/out_linear", p[layer_prefix(i) + "mlp/linear/w"], ("neurons", "embedding"),
              ("neurons",), ("embedding",), dt),
  ])


def _block(i: int, p: Mapping[str, Any], config: Gemma3Config, dt, act, norm_dt):
  pre, eps, name = layer_prefix(i), config.rms_norm_eps, f"transformer/block_{i}"
  norm = lambda which: _rms_norm(f"{name}/{which}", p[pre + f"{which}/scale"], "embedding", eps,
                                 norm_dt)
  return model_parts.TransformerBlock([
      HookPoint("resid_pre", i),
      pz.nn.Residual(pz.nn.Sequential([
          norm("pre_attention_norm"),
          _attention(i, p, config, dt, act, norm_dt),
          norm("post_attention_norm"),
          HookPoint("attn_out", i),
      ])),
      HookPoint("resid_mid", i),
      pz.nn.Residual(pz.nn.Sequential([
          norm("pre_ffw_norm"),
          HookPoint("mlp_in", i),
          _mlp(i, p, config, dt),
          norm("post_ffw_norm"),
          HookPoint("mlp_out", i),
      ])),
      HookPoint("resid_post", i),
  ])


def from_gemma_params(params: Mapping, *, preset: str | Gemma3Config = "auto",
                      dtype: Any = jnp.float32, activation_dtype: Any = jnp.float32
                      ) -> model_parts.TransformerLM:
  """Builds the penzai Gemma 3 model from a Gemma flax parameter tree.

  Args:
    params: the canonical flat tree (see ``dictlearn_gemma.params``) or any Gemma flax layout
      (Kaggle FLAT, ``model.init()`` NESTED, with or without the ``transformer`` root).
    preset: "auto" (infer the size from the shapes), a preset name ("270m", "1b", "4b",
      "12b", "27b", "tiny"), or a ``Gemma3Config``.
    dtype: parameter dtype (e.g. ``jnp.bfloat16``); None keeps the checkpoint's.
    activation_dtype: activation and KV-cache dtype; None means the parameter dtype.
      float32 with bfloat16 parameters is the tutorial's upcast mode.

  Returns:
    A ``TransformerLM``: call it as ``model(tokens, token_positions=...)`` with NamedArray
    tokens (axes batch..., seq) to get logits (axes batch..., seq, vocabulary), or use
    ``dictlearn_penzai.forward_logits``.

  Raises:
    ValueError: not a Gemma 3 tree, missing tensors (named), wrong shapes, or a preset that
      does not match the shapes.
  """
  p = normalize_gemma_params(params)
  config = resolve_config(p, preset)
  check_params(p, config)
  if dtype is None:
    dtype = p[layer_prefix(0) + "attn/attn_vec_einsum/w"].dtype
  act = jnp.dtype(dtype if activation_dtype is None else activation_dtype)
  dt = jnp.dtype(dtype)
  # Norm scales are tiny; keeping them in the wider of the two dtypes loses nothing.
  norm_dt = jnp.promote_types(dt, act)

  table = pz.nn.EmbeddingTable(
      embeddings=_param("transformer/embedder.embeddings", p[PREFIX + "embedder/input_embedding"],
                        ("vocabulary", "embedding"), dt),
      vocabulary_axis="vocabulary")
  layers = [pz.nn.EmbeddingLookup(table)]
  if act != dt:
    layers.append(pz.nn.CastToDType(act))
  # Gemma scales embeddings by sqrt(d_model) rounded to the activation dtype.
  layers.append(pz.nn.ConstantRescale(by=jnp.sqrt(config.d_model).astype(act)))
  layers += [_block(i, p, config, dt, act, norm_dt) for i in range(config.num_layers)]
  layers.append(_rms_norm("transformer/final_norm", p[PREFIX + "final_norm/scale"], "embedding",
                          config.rms_norm_eps, norm_dt))
  layers.append(pz.nn.EmbeddingDecode(table))  # Tied unembedding; Gemma 3 has no soft-cap.

  common, q_only = _head_axes(config)
  metadata = Gemma3Metadata(
      common_head_axes=common, query_only_head_axes=q_only, embedding_dim=config.d_model,
      projection_dim=config.head_dim, mlp_hidden_dim=config.hidden_dim,
      vocab_size=config.vocab_size, activation_dtype=act, config=config)
  return model_parts.TransformerLM(body=pz.nn.Sequential(layers), metadata=metadata)


def hook_points(model: Any) -> list[tuple[str, int]]:
  """(kind, layer) of every HookPoint in ``model``, in order (for checks and listings)."""
  return [(h.kind, h.layer) for h in pz.select(model).at_instances_of(HookPoint).get_sequence()]


__all__ = ["ApplyScaledRoPE", "Gemma3Metadata", "MergeHeads", "from_gemma_params",
           "gelu_tanh", "hook_points", "model_config"]
