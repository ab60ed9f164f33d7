"""Gemma 2 text models: penzai's own Gemma, with dictlearn's HookPoints placed in it.

The model is built by penzai's llama-like builder
(``penzai.models.transformer.variants.llamalike_common.build_llamalike_transformer``), with
the settings penzai's ``variants.gemma`` uses for its Gemma 2 presets: GeGLU (tanh GELU),
tied embeddings scaled by sqrt(d_model), pre and post norms around attention and MLP,
sliding-window attention on even layers and global on odd ones, tanh soft-caps on the
attention logits (before the mask) and on the final logits, and queries scaled by
``query_pre_attn_scalar ** -0.5``. ``variants.gemma.gemma_from_pretrained_checkpoint``
itself only builds its fixed presets from a nested flax tree; this module binds the same
parameter slots from the canonical tree of ``dictlearn_gemma.params`` (any size, any
checkpoint format) instead.

HookPoints are then inserted with ``pz.select`` at the sites the Gemma 3 model has (see
``dictlearn_penzai.gemma3_model``), so hooks, caches, dictionaries and KV-cached sampling
work unchanged::

  HookPoint(resid_pre)                               [batch, seq, embedding]
  Residual(pre_attention_norm, Attention(... -> HookPoint(attn_z) -> output),
           post_attention_norm, HookPoint(attn_out))
  HookPoint(resid_mid)
  Residual(pre_ffw_norm, HookPoint(mlp_in), MLP, post_ffw_norm, HookPoint(mlp_out))
  HookPoint(resid_post)

At attn_z the value keeps penzai's head axes (``heads``; ``query_heads`` with one kv head;
``head_groups`` x ``query_heads`` for grouped-query attention) plus ``projection``; the
adapter flattens them group-major, which is transformers' o_proj input order.

Gemma Scope 1's hook points for Gemma 2: residual SAEs read ``blocks.L.hook_resid_post``
(resid_post), MLP SAEs the MLP output after the post-feed-forward norm (mlp_out), attention
SAEs ``blocks.L.attn.hook_z`` (attn_z).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models.transformer import model_parts
from penzai.models.transformer.variants import llamalike_common as llc

from dictlearn_gemma.config import Gemma2Config
from dictlearn_gemma.params import (
    PREFIX, layer_prefix, normalize_gemma_params, resolve_gemma2_config)
from dictlearn_penzai.gemma3_model import qkv_weights
from dictlearn_penzai.hookpoint import HookPoint


@dataclasses.dataclass
class Gemma2Metadata(model_parts.TransformerMetadata):
  """penzai's transformer metadata plus the Gemma 2 config it was built from."""

  config: Gemma2Config | None = None


def penzai_config(config: Gemma2Config, dtype: Any = jnp.float32,
                  activation_dtype: Any = jnp.float32) -> llc.LlamalikeTransformerConfig:
  """penzai's ``LlamalikeTransformerConfig`` for a Gemma 2 config (as ``variants.gemma``)."""
  return llc.LlamalikeTransformerConfig(
      num_kv_heads=config.num_kv_heads, query_head_multiplier=config.queries_per_kv_head,
      embedding_dim=config.d_model, projection_dim=config.head_dim,
      mlp_hidden_dim=config.hidden_dim, num_decoder_blocks=config.num_layers,
      vocab_size=config.vocab_size, mlp_variant="geglu_approx", tie_embedder_and_logits=True,
      rope_wavelength=config.rope_base, rms_norm_eps=config.rms_norm_eps,
      # Cycled by block index: block 0 local, block 1 global, ... (Gemma2Config.is_global).
      attention_type=(llc.AttentionTypeSlidingWindowCausal(config.sliding_window),
                      llc.AttentionTypeGlobalCausal()),
      use_post_attn_norm=True, use_post_ffw_norm=True,
      final_logit_softcap=config.final_logit_softcap,
      attn_logits_soft_cap=config.attn_logit_softcap,
      query_scaling_factor=config.query_scale, parameter_dtype=dtype,
      activation_dtype=activation_dtype)


def _named(value, axes: tuple[str, ...], dtype) -> pz.nx.NamedArray:
  return pz.nx.wrap(jnp.asarray(value, dtype=dtype)).tag(*axes)


def _block_params(i: int, p: Mapping[str, Any], config: Gemma2Config, dt) -> dict:
  """Block i's values for penzai's parameter slots (names relative to ``block_{i}/``)."""
  pre = layer_prefix(i)
  k, m = config.num_kv_heads, config.queries_per_kv_head
  d, f, h = config.d_model, config.hidden_dim, config.head_dim
  out = {}
  for norm in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
    # penzai's RMSLayerNorm multiplies by its weight: store 1 + scale, added in float32 so
    # a bfloat16 checkpoint rounds once.
    out[f"{norm}/scale.weights"] = _named(
        1.0 + np.asarray(p[pre + f"{norm}/scale"], np.float32), ("embedding",), dt)
  gating = np.asarray(p[pre + "mlp/gating_einsum/w"])
  if gating.shape[1:] == (d, f) and d != f:
    gating = gating.transpose(0, 2, 1)  # The older (2, D, F) layout (gemma2-2b's flax).
  out["mlp/gating_linear.weights"] = _named(gating[0], ("neurons", "embedding"), dt)
  out["mlp/value_linear.weights"] = _named(gating[1], ("neurons", "embedding"), dt)
  out["mlp/out_linear.weights"] = _named(p[pre + "mlp/linear/w"], ("neurons", "embedding"), dt)

  wq, wk, wv = qkv_weights(p, pre + "attn/")
  wo = np.asarray(p[pre + "attn/attn_vec_einsum/w"])  # (N, H, D)
  # Query head n = g * m + q (kv group g): the flax reshape and transformers' repeat_kv.
  if m == 1:
    q_axes, kv_axes = ("heads",), ("heads",)
  elif k == 1:
    q_axes, kv_axes = ("query_heads",), ()
    wk, wv = wk[0], wv[0]
  else:
    q_axes, kv_axes = ("head_groups", "query_heads"), ("head_groups",)
    wq, wo = wq.reshape(k, m, d, h), wo.reshape(k, m, h, d)
  out["attention/query.weights"] = _named(wq, (*q_axes, "embedding", "projection"), dt)
  out["attention/key.weights"] = _named(wk, (*kv_axes, "embedding", "projection"), dt)
  out["attention/value.weights"] = _named(wv, (*kv_axes, "embedding", "projection"), dt)
  out["attention/output.weights"] = _named(wo, (*q_axes, "projection", "embedding"), dt)
  return out


def _norm_label(norm: pz.nn.RMSLayerNorm) -> str:
  params = pz.select(norm).at_instances_of(pz.Parameter).get_sequence()
  return params[0].label if params else ""


def _hook_block(block: model_parts.TransformerBlock, i: int) -> model_parts.TransformerBlock:
  """Block i with a HookPoint at each of its seven sites, placed by what penzai named."""
  block = (pz.select(block).at_instances_of(pz.nn.Attention)
           .at(lambda attn: attn.attn_value_to_output.sublayers[-1])  # the o_proj Linear
           .insert_before(HookPoint("attn_z", i)))
  for norm, kind in (("post_attention_norm", "attn_out"), ("pre_ffw_norm", "mlp_in"),
                     ("post_ffw_norm", "mlp_out")):
    block = (pz.select(block).at_instances_of(pz.nn.RMSLayerNorm)
             .where(lambda n, norm=norm: _norm_label(n).endswith(f"/{norm}/scale.weights"))
             .insert_after(HookPoint(kind, i)))
  attn, ffw = block.sublayers
  return dataclasses.replace(block, sublayers=[
      HookPoint("resid_pre", i), attn, HookPoint("resid_mid", i), ffw,
      HookPoint("resid_post", i)])


def from_gemma2_params(params: Mapping, config: str | Gemma2Config | None = None, *,
                       dtype: Any = jnp.float32, activation_dtype: Any = jnp.float32
                       ) -> model_parts.TransformerLM:
  """Builds penzai's Gemma 2 from a canonical (or any Gemma flax layout) parameter tree.

  Args:
    params: the canonical flat tree of ``dictlearn_gemma.params`` without QK-norms, or a
      Gemma 2 flax checkpoint's tree (FLAT or NESTED layouts).
    config: a ``Gemma2Config``, a preset name ("2b", "9b", "27b"), or None for the preset
      whose sizes the shapes give. Soft-caps, window and query scale are not in the tensors.
    dtype: parameter dtype; None keeps the checkpoint's.
    activation_dtype: activation and KV-cache dtype; None means the parameter dtype.

  Returns:
    A ``TransformerLM`` (penzai's llama-like Gemma 2 with HookPoints; metadata carries the
    config): ``model(tokens, token_positions=...)`` on NamedArray tokens (batch..., seq)
    gives soft-capped logits (batch..., seq, vocabulary).

  Raises:
    ValueError: not a Gemma 2 tree, missing tensors (named), wrong shapes, or a config that
      does not match them.
  """
  p = normalize_gemma_params(params)
  config = resolve_gemma2_config(p, config)
  if dtype is None:
    dtype = p[layer_prefix(0) + "attn/attn_vec_einsum/w"].dtype
  dt = jnp.dtype(dtype)
  act = jnp.dtype(dt if activation_dtype is None else activation_dtype)
  unbound = llc.build_llamalike_transformer(penzai_config(config, dt, act), init_base_rng=None,
                                            name="transformer")
  values = {"embedder.embeddings": _named(p[PREFIX + "embedder/input_embedding"],
                                          ("vocabulary", "embedding"), dt),
            "final_norm/scale.weights": _named(
                1.0 + np.asarray(p[PREFIX + "final_norm/scale"], np.float32), ("embedding",), dt)}
  for i in range(config.num_layers):
    values.update({f"block_{i}/{k}": v for k, v in _block_params(i, p, config, dt).items()})
  model = pz.bind_variables(
      unbound, [pz.Parameter(value=v, label=f"transformer/{k}") for k, v in values.items()])
  pz.nn.assert_no_parameter_slots(model)

  sublayers, n = [], 0
  for layer in model.body.sublayers:
    if isinstance(layer, model_parts.TransformerBlock):
      layer, n = _hook_block(layer, n), n + 1
    sublayers.append(layer)
  metadata = Gemma2Metadata(**{f.name: getattr(model.metadata, f.name)
                               for f in dataclasses.fields(model.metadata)}, config=config)
  return model_parts.TransformerLM(body=pz.nn.Sequential(sublayers), metadata=metadata)


__all__ = ["Gemma2Metadata", "from_gemma2_params", "penzai_config"]
