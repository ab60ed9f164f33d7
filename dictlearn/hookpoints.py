"""Site names, and the Gemma Scope hook-point strings that name them.

A *site* is a place in a Gemma 3 block where a dictionary reads or writes, named as
``(kind, layer)``. The kinds, in the order they occur inside block ``layer``:

  resid_pre   block input (the residual stream before the block)
  attn_z      o_proj input: every head's output, heads concatenated (heads * head_dim)
  attn_out    post-attention-norm output: what attention adds to the residual
  resid_mid   residual stream after the attention sub-block
  mlp_in      pre-feed-forward-norm output: what the MLP reads (transcoder input)
  mlp_out     post-feed-forward-norm output: what the MLP adds (transcoder target)
  resid_post  block output

This module is string handling only; the penzai adapter puts these sites in a model.
"""

from __future__ import annotations

import re

SITE_KINDS = ("resid_pre", "attn_z", "attn_out", "resid_mid", "mlp_in", "mlp_out",
              "resid_post")

# Gemma Scope 2 writes transformers' module paths; each maps to one site kind.
_HF_PATTERNS = (
    (re.compile(r"^model\.layers\.(\d+)\.output$"), "resid_post"),
    (re.compile(r"^model\.layers\.(\d+)$"), "resid_post"),
    (re.compile(r"^model\.layers\.(\d+)\.input$"), "resid_pre"),
    (re.compile(r"^model\.layers\.(\d+)\.self_attn\.o_proj\.input$"), "attn_z"),
    (re.compile(r"^model\.layers\.(\d+)\.post_attention_layernorm\.output$"), "attn_out"),
    (re.compile(r"^model\.layers\.(\d+)\.pre_feedforward_layernorm\.output$"), "mlp_in"),
    (re.compile(r"^model\.layers\.(\d+)\.post_feedforward_layernorm\.output$"), "mlp_out"),
    # Gemma Scope 1 / TransformerLens names, for dictionaries converted from SAELens.
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), "resid_post"),
    (re.compile(r"^blocks\.(\d+)\.hook_resid_pre$"), "resid_pre"),
    (re.compile(r"^blocks\.(\d+)\.hook_resid_mid$"), "resid_mid"),
    (re.compile(r"^blocks\.(\d+)\.attn\.hook_z$"), "attn_z"),
    (re.compile(r"^blocks\.(\d+)\.hook_attn_out$"), "attn_out"),
    (re.compile(r"^blocks\.(\d+)\.ln2\.hook_normalized$"), "mlp_in"),
    (re.compile(r"^blocks\.(\d+)\.hook_mlp_out$"), "mlp_out"),
)

_TO_HF = {
    "resid_post": "model.layers.{L}.output",
    "resid_pre": "model.layers.{L}.input",
    "attn_z": "model.layers.{L}.self_attn.o_proj.input",
    "attn_out": "model.layers.{L}.post_attention_layernorm.output",
    "mlp_in": "model.layers.{L}.pre_feedforward_layernorm.output",
    "mlp_out": "model.layers.{L}.post_feedforward_layernorm.output",
    "resid_mid": "model.layers.{L}.resid_mid",  # no transformers module; ours alone
}


def check_kind(kind: str) -> str:
  if kind not in SITE_KINDS:
    raise ValueError(f"unknown site {kind!r}; the sites are {', '.join(SITE_KINDS)}")
  return kind


def parse_hook_point(hook_point: str) -> tuple[str, int]:
  """``"model.layers.22.output"`` -> ``("resid_post", 22)``.

  Raises:
    ValueError: for a string that names no known site.
  """
  for pattern, kind in _HF_PATTERNS:
    m = pattern.match(hook_point.strip())
    if m:
      return kind, int(m.group(1))
  raise ValueError(
      f"hook point {hook_point!r} names no known site; expected one of "
      + ", ".join(p.replace("{L}", "L") for p in _TO_HF.values()))


def hook_point(kind: str, layer: int) -> str:
  """``("mlp_in", 9)`` -> ``"model.layers.9.pre_feedforward_layernorm.output"``."""
  return _TO_HF[check_kind(kind)].format(L=int(layer))
