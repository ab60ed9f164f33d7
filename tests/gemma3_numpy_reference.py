"""An independent float64 numpy Gemma 3 forward pass over the canonical param tree (tests only).

Written from the Gemma 3 description (transformers' Gemma3 / the flax reference), sharing
no code with the penzai model: RMSNorm (1 + scale), QK-norm before RoPE (rotate-half,
positions / scale on global layers), query scale, GQA by repeating kv heads, causal and
sliding-window masks, pre/post norms, tanh-GELU GeGLU, tied unembedding.
"""

import numpy as np


def _rms(x, scale, eps=1e-6):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * (1.0 + scale)


def _rope(x, pos, base, scale):
  """x (T, heads, H), pos (T,)."""
  half = x.shape[-1] // 2
  inv = 1.0 / base ** (np.arange(half) * 2.0 / x.shape[-1])
  angle = (pos[:, None] / scale) * inv[None]
  sin, cos = np.sin(angle)[:, None], np.cos(angle)[:, None]
  a, b = x[..., :half], x[..., half:]
  return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def reference_logits(params, config, tokens):
  """float64 (T, vocab) logits for one unpadded token sequence."""
  get = lambda key: np.asarray(params["transformer/" + key], np.float64)
  tokens = np.asarray(tokens)
  pos = np.arange(len(tokens))
  x = get("embedder/input_embedding")[tokens] * np.sqrt(config.d_model)
  n, k = config.num_heads, config.num_kv_heads
  for i in range(config.num_layers):
    layer = lambda key: get(f"layer_{i}/{key}")
    h = _rms(x, layer("pre_attention_norm/scale"))
    if n == k:
      wq, wk, wv = layer("attn/qkv_einsum/w")
    else:
      wq = layer("attn/q_einsum/w")
      wk, wv = layer("attn/kv_einsum/w")
    q = np.einsum("td,ndh->tnh", h, wq)
    kk = np.einsum("td,kdh->tkh", h, wk)
    v = np.einsum("td,kdh->tkh", h, wv)
    q = _rms(q, layer("attn/_query_norm/scale"))
    kk = _rms(kk, layer("attn/_key_norm/scale"))
    base, scale = config.rope(i)
    q = _rope(q, pos, base, scale) * config.query_scale
    kk = _rope(kk, pos, base, scale)
    kk, v = np.repeat(kk, n // k, axis=1), np.repeat(v, n // k, axis=1)
    scores = np.einsum("tnh,snh->nts", q, kk)
    allowed = pos[:, None] >= pos[None, :]
    if not config.is_global(i):
      allowed &= (pos[:, None] - pos[None, :]) < config.sliding_window
    scores = np.where(allowed[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    z = np.einsum("nts,snh->tnh", probs, v)
    attn = np.einsum("tnh,nhd->td", z, layer("attn/attn_vec_einsum/w"))
    x = x + _rms(attn, layer("post_attention_norm/scale"))
    h = _rms(x, layer("pre_ffw_norm/scale"))
    gate, up = layer("mlp/gating_einsum/w")
    mlp = (_gelu_tanh(h @ gate.T) * (h @ up.T)) @ layer("mlp/linear/w")
    x = x + _rms(mlp, layer("post_ffw_norm/scale"))
  x = _rms(x, get("final_norm/scale"))
  return x @ get("embedder/input_embedding").T
