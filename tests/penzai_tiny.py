"""A tiny Gemma-like penzai model with a HookPoint at every site, for fast hook tests.

Built from penzai's llama-like parts (pre/post norms around attention and MLP, GeGLU,
tied embeddings, grouped-query attention so attn_z has two head axes), then HookPoints
inserted where the Gemma 3 model has them. Random weights; small enough to jit in a
second on a CPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models.transformer import model_parts
from penzai.models.transformer.variants import llamalike_common as llc

from dictlearn_penzai.hookpoint import HookPoint

VOCAB = 61
D_MODEL = 16


def _hooked_block(block, layer: int):
  attn_res, ffw_res = block.sublayers
  attn_seq = attn_res.delta.sublayers  # [pre_norm, attention, post_norm]
  attention = attn_seq[1]
  a2o = attention.attn_value_to_output.sublayers  # [einsum, o_proj]
  attention = dataclasses.replace(
      attention,
      attn_value_to_output=pz.nn.Sequential([a2o[0], HookPoint("attn_z", layer), a2o[1]]))
  attn_res = pz.nn.Residual(pz.nn.Sequential(
      [attn_seq[0], attention, attn_seq[2], HookPoint("attn_out", layer)]))
  ffw_seq = ffw_res.delta.sublayers  # [pre_norm, mlp, post_norm]
  ffw_res = pz.nn.Residual(pz.nn.Sequential(
      [ffw_seq[0], HookPoint("mlp_in", layer), ffw_seq[1], ffw_seq[2],
       HookPoint("mlp_out", layer)]))
  return model_parts.TransformerBlock(sublayers=[
      HookPoint("resid_pre", layer), attn_res, HookPoint("resid_mid", layer), ffw_res,
      HookPoint("resid_post", layer)])


def tiny_model(seed: int = 0, *, layers: int = 4, kv_heads: int = 2, q_per_kv: int = 2,
               head_dim: int = 4) -> model_parts.TransformerLM:
  """A random ``layers``-block model; d_model 16, vocab 61, attn_z width kv*q*head_dim."""
  config = llc.LlamalikeTransformerConfig(
      num_kv_heads=kv_heads, query_head_multiplier=q_per_kv, embedding_dim=D_MODEL,
      projection_dim=head_dim, mlp_hidden_dim=32, num_decoder_blocks=layers,
      vocab_size=VOCAB, mlp_variant="geglu_approx", tie_embedder_and_logits=True,
      attention_type=(llc.AttentionTypeSlidingWindowCausal(4), llc.AttentionTypeGlobalCausal()),
      use_post_attn_norm=True, use_post_ffw_norm=True, final_logit_softcap=30.0)
  # Built without an RNG (no eager init ops to compile: fast on a busy CPU), then bound
  # to numpy weights of the shapes the initialiser would give.
  unbound = llc.build_llamalike_transformer(config, init_base_rng=None)
  shapes = jax.eval_shape(lambda: {p.label: p.value for p in pz.unbind_params(
      llc.build_llamalike_transformer(config, init_base_rng=jax.random.key(0)))[1]})
  rng = np.random.default_rng(seed)
  params = []
  for label, v in sorted(shapes.items()):  # v: a NamedArray of ShapeDtypeStructs
    noise = rng.normal(size=v.data_array.shape).astype(np.float32)
    value = 1.0 + 0.3 * noise if "norm" in label else 0.25 * noise
    params.append(pz.Parameter(value=dataclasses.replace(v, data_array=jnp.asarray(value)),
                               label=label))
  model = pz.bind_variables(unbound, params)
  subs = list(model.body.sublayers)
  blocks = [i for i, s in enumerate(subs) if isinstance(s, model_parts.TransformerBlock)]
  for layer, i in enumerate(blocks):
    subs[i] = _hooked_block(subs[i], layer)
  return dataclasses.replace(model, body=pz.nn.Sequential(subs))
