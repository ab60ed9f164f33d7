"""The canonical Gemma 3 parameter tree: names, shapes, checks, size inference, random init.

Every loader (flax/orbax, HF safetensors, GGUF) converts to ONE flat dict in the naming of
the Gemma flax checkpoints (``gemma.gm.nn.Transformer``), with the ``transformer/`` prefix
and the leaf name joined by ``/``. Shapes, for N query heads, K kv heads, head_dim H,
d_model D, hidden F, vocabulary V:

  transformer/embedder/input_embedding              (V, D)
  transformer/final_norm/scale                      (D,)
  transformer/layer_{i}/attn/q_einsum/w             (N, D, H)     (K < N)
  transformer/layer_{i}/attn/kv_einsum/w            (2, K, D, H)  [k, v]
  transformer/layer_{i}/attn/qkv_einsum/w           (3, N, D, H)  (only when K == N)
  transformer/layer_{i}/attn/attn_vec_einsum/w      (N, H, D)
  transformer/layer_{i}/attn/_query_norm/scale      (H,)
  transformer/layer_{i}/attn/_key_norm/scale        (H,)
  transformer/layer_{i}/{pre,post}_attention_norm/scale, {pre,post}_ffw_norm/scale  (D,)
  transformer/layer_{i}/mlp/gating_einsum/w         (2, F, D)     [gate, up]
  transformer/layer_{i}/mlp/linear/w                (F, D)

``gating_einsum`` is in the "transposed" layout every Gemma 3 checkpoint uses
(``transpose_gating_einsum=True`` in ``gemma.gm.nn._gemma``); the older (2, D, F) layout is
accepted and transposed. Norm scales are stored as ``scale`` and applied as ``1 + scale``.
Head index h of the flat (N*H) HF layout is ``h = kv_head * (N // K) + j``, as in both the
flax reference (reshape to (K, N//K)) and transformers (``repeat_kv``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from dictlearn_gemma.config import (
    GEMMA2_PRESETS, PRESETS, Gemma2Config, Gemma3Config, gemma2_preset_for, get_gemma2_preset,
    get_preset)

PREFIX = "transformer/"
_NORMS = ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm")
# Multimodal parts of the 4B+ checkpoints, ignored by a text model.
_MULTIMODAL = re.compile(r"(^|/)(vision_encoder|SigLiPFromPatches_0|mm_[a-z_]+|audio_[a-z_]+)(/|$)")


def layer_prefix(i: int) -> str:
  return f"{PREFIX}layer_{i}/"


def expected_shapes(config: Gemma3Config | Gemma2Config) -> dict[str, tuple[int, ...]]:
  """Every tensor a checkpoint of ``config`` must hold, with its shape (vocab left as -1)."""
  n, k, h, d, f = (config.num_heads, config.num_kv_heads, config.head_dim, config.d_model,
                   config.hidden_dim)
  shapes = {f"{PREFIX}embedder/input_embedding": (-1, d), f"{PREFIX}final_norm/scale": (d,)}
  for i in range(config.num_layers):
    p = layer_prefix(i)
    if k == n:
      shapes[p + "attn/qkv_einsum/w"] = (3, n, d, h)
    else:
      shapes[p + "attn/q_einsum/w"] = (n, d, h)
      shapes[p + "attn/kv_einsum/w"] = (2, k, d, h)
    shapes[p + "attn/attn_vec_einsum/w"] = (n, h, d)
    if not isinstance(config, Gemma2Config):  # Gemma 2 has no QK-norm.
      shapes[p + "attn/_query_norm/scale"] = (h,)
      shapes[p + "attn/_key_norm/scale"] = (h,)
    for norm in _NORMS:
      shapes[p + f"{norm}/scale"] = (d,)
    shapes[p + "mlp/gating_einsum/w"] = (2, f, d)
    shapes[p + "mlp/linear/w"] = (f, d)
  return shapes


def flatten_tree(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """``{"a/b/c": leaf}`` from a nested mapping (the gemma package's flax layouts)."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten_tree(value, path + "/"))
    else:
      out[path] = value
  return out


def normalize_gemma_params(params: Mapping) -> dict[str, Any]:
  """Any Gemma flax param layout -> the canonical flat dict (arrays untouched).

  Accepts the layouts ``gemma.gm.ckpts`` knows: FLAT (the released Kaggle checkpoints,
  ``{"transformer/layer_0/attn/q_einsum": {"w": ...}}``), NESTED (``model.init()``
  params, ``{"layer_0": {"attn": ...}, "mlp": {"gating_einsum": array}}``, with or
  without a ``transformer`` root), a Kauldron state (``{"params": ...}``), or the canonical
  flat dict itself. Multimodal (vision/audio) tensors are dropped.
  """
  if not isinstance(params, Mapping):
    raise ValueError(f"expected a dict of Gemma parameters, got {type(params).__name__}")
  if set(params) >= {"params", "step"} or set(params) == {"params"}:
    params = params["params"]
  flat = flatten_tree(params)
  if any(k.startswith("transformer/stacked_layers") for k in flat):
    raise ValueError("stacked-layer Gemma checkpoints (transformer/stacked_layers/...) are not "
                     "supported; convert them to the per-layer layout with gemma.gm.ckpts first")
  out = {}
  for key, value in flat.items():
    if _MULTIMODAL.search(key):
      continue
    if not key.startswith(PREFIX):
      key = PREFIX + key
    # NESTED layout stores the MLP weights without the "w" leaf (gemma's param_remapper).
    if key.endswith(("/mlp/gating_einsum", "/mlp/linear")):
      key += "/w"
    out[key] = value
  return out


def num_layers_in(params: Mapping[str, Any]) -> int:
  layers = {int(m.group(1)) for k in params
            if (m := re.match(r"transformer/layer_(\d+)/", k))}
  return max(layers) + 1 if layers else 0


def infer_config(params: Mapping[str, Any]) -> Gemma3Config:
  """Reads the model size off the canonical tree's shapes (name "custom" if no preset fits).

  Raises:
    ValueError: when the tree lacks the tensors the sizes are read from, or does not look
      like a Gemma 3 model at all (no QK-norm: Gemma 1/2).
  """
  def get(key):
    if key not in params:
      raise ValueError(
          f"not a Gemma 3 checkpoint: missing {key!r} (have e.g. {sorted(params)[:5]})")
    return params[key]

  emb = get(f"{PREFIX}embedder/input_embedding")
  num_layers = num_layers_in(params)
  if num_layers == 0:
    raise ValueError("not a Gemma checkpoint: no transformer/layer_{i}/ tensors found")
  p = layer_prefix(0)
  if p + "attn/_query_norm/scale" not in params:
    raise ValueError("not a Gemma 3 checkpoint: layer 0 has no QK-norm (attn/_query_norm); "
                     "Gemma 1 and 2 are in penzai.models.transformer.variants.gemma")
  n, h, d = get(p + "attn/attn_vec_einsum/w").shape
  if p + "attn/qkv_einsum/w" in params:
    k = n
  else:
    k = get(p + "attn/kv_einsum/w").shape[1]
  f = get(p + "mlp/linear/w").shape[0]
  sizes = dict(num_layers=num_layers, d_model=d, num_heads=n, num_kv_heads=k, head_dim=h,
               hidden_dim=f)
  for preset in PRESETS.values():
    if preset.shape_signature() == sizes:
      return preset.replace(vocab_size=emb.shape[0])
  known = ", ".join(f"{name} ({c.num_layers} layers, d_model {c.d_model})"
                    for name, c in PRESETS.items())
  raise ValueError(f"these Gemma 3 shapes match no preset: {sizes}; the presets are {known}. "
                   "Pass preset=Gemma3Config(...) to load a custom size.")


def resolve_config(params: Mapping[str, Any], preset: str | Gemma3Config = "auto"
                   ) -> Gemma3Config:
  """The config to build: inferred from shapes ("auto") or a preset checked against them."""
  if isinstance(preset, str) and preset.lower() == "auto":
    return infer_config(params)
  config = get_preset(preset)
  emb_key = f"{PREFIX}embedder/input_embedding"
  if emb_key in params:
    config = config.replace(vocab_size=params[emb_key].shape[0])
  try:
    found = infer_config(params).shape_signature()
  except ValueError:
    found = None
  if found is not None and found != config.shape_signature():
    diff = ", ".join(f"{k}={v} (checkpoint has {found[k]})"
                     for k, v in config.shape_signature().items() if found[k] != v)
    raise ValueError(f"preset {config.name!r} does not match the checkpoint: {diff}. "
                     "Use preset='auto' to infer the size from the shapes.")
  return config


def name_some(names: list[str], limit: int = 12) -> str:
  """The first ``limit`` names, comma-separated, and how many more."""
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def check_params(params: Mapping[str, Any], config: Gemma3Config | Gemma2Config) -> None:
  """Raises ValueError naming every missing tensor and every wrong shape."""
  want = expected_shapes(config)
  family = "Gemma 2" if isinstance(config, Gemma2Config) else "Gemma 3"
  missing = [k for k in want if k not in params]
  if missing:
    raise ValueError(f"the {family} {config.name} checkpoint is missing {len(missing)} "
                     f"tensor(s): {name_some(missing)}")
  bad = []
  for key, shape in want.items():
    got = tuple(params[key].shape)
    if key.endswith("mlp/gating_einsum/w") and got == (2, config.d_model, config.hidden_dim):
      continue  # Older non-transposed layout; from_gemma_params transposes it.
    if len(got) != len(shape) or any(s not in (-1, g) for s, g in zip(shape, got)):
      bad.append(f"{key}: {got}, expected {shape}")
  if bad:
    raise ValueError(f"wrong tensor shapes for {family} {config.name}: " + "; ".join(bad[:12]))


# ------------------------------------------------------------------ Gemma 2


def architecture_of(params: Mapping[str, Any]) -> str:
  """"gemma3" (QK-norm), "gemma2" (post-attention norm, no QK-norm) or "gemma1" (neither),
  read off a canonical tree's layer 0."""
  p = layer_prefix(0)
  if p + "attn/_query_norm/scale" in params:
    return "gemma3"
  if p + "post_attention_norm/scale" in params:
    return "gemma2"
  return "gemma1"


def _sizes(params: Mapping[str, Any]) -> dict[str, int]:
  p = layer_prefix(0)
  for key in (p + "attn/attn_vec_einsum/w", p + "mlp/linear/w"):
    if key not in params:
      raise ValueError(f"not a Gemma checkpoint: missing {key!r} (have e.g. {sorted(params)[:5]})")
  n, h, d = params[p + "attn/attn_vec_einsum/w"].shape
  k = n if p + "attn/qkv_einsum/w" in params else params[p + "attn/kv_einsum/w"].shape[1]
  return dict(num_layers=num_layers_in(params), d_model=d, num_heads=n, num_kv_heads=k,
              head_dim=h, hidden_dim=params[p + "mlp/linear/w"].shape[0])


def resolve_gemma2_config(params: Mapping[str, Any], config: str | Gemma2Config | None = None
                          ) -> Gemma2Config:
  """The Gemma 2 config of a canonical tree, checked against its shapes.

  ``config`` None (or "auto"): the preset whose sizes the shapes give (the flax tree carries
  no soft-caps or window, so a custom size needs its config, e.g. from config.json); a
  preset name ("2b", "9b", "27b"); or a ``Gemma2Config``. The vocabulary comes from the
  embedding table.

  Raises:
    ValueError: not a Gemma 2 tree, no preset of these sizes, or a config that disagrees
      with the shapes.
  """
  arch = architecture_of(params)
  if arch != "gemma2":
    raise ValueError(f"not a Gemma 2 checkpoint: layer 0 looks like {arch} "
                     "(Gemma 2 has post-attention norms and no QK-norm)")
  sizes = _sizes(params)
  if config is None or (isinstance(config, str) and config.lower() == "auto"):
    config = gemma2_preset_for(sizes)
    if config is None:
      known = ", ".join(f"{n} ({c.num_layers} layers, d_model {c.d_model})"
                        for n, c in GEMMA2_PRESETS.items())
      raise ValueError(f"these Gemma 2 shapes match no preset: {sizes}; the presets are "
                       f"{known}. Pass config=Gemma2Config(...) for a custom size.")
  config = get_gemma2_preset(config)
  if config.shape_signature() != sizes:
    diff = ", ".join(f"{k}={v} (checkpoint has {sizes[k]})"
                     for k, v in config.shape_signature().items() if sizes[k] != v)
    raise ValueError(f"Gemma 2 config {config.name!r} does not match the checkpoint: {diff}")
  emb = params.get(f"{PREFIX}embedder/input_embedding")
  if emb is not None:
    config = config.replace(vocab_size=emb.shape[0])
  check_params(params, config)
  return config


def init_gemma_params(config: Gemma3Config, seed: int = 0, dtype=np.float32
                      ) -> dict[str, np.ndarray]:
  """A random canonical tree for ``config`` (tests): weights ~ N(0, 1/fan_in), norms ~ N(0, 0.1)."""
  rng = np.random.default_rng(seed)
  d = config.d_model
  out = {}
  for key, shape in expected_shapes(config).items():
    shape = tuple(config.vocab_size if s == -1 else s for s in shape)
    if key.endswith("/scale"):
      value = 0.1 * rng.standard_normal(shape)
    elif key.endswith("input_embedding"):
      value = rng.standard_normal(shape) / np.sqrt(d)
    else:
      fan_in = config.hidden_dim if key.endswith("mlp/linear/w") else (
          config.num_heads * config.head_dim if "attn_vec" in key else d)
      value = rng.standard_normal(shape) / np.sqrt(fan_in)
    out[key] = value.astype(dtype)
  return out
