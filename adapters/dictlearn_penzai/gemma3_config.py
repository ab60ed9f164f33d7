"""Gemma 3 text-model sizes: one frozen dataclass, five presets and a tiny test size.

The numbers come from the Gemma reference implementation (``gemma.gm.nn._gemma``:
``Gemma3_270M`` ... ``Gemma3_27B``) and agree with transformers' ``Gemma3TextConfig``
files on the hub:

  preset  layers  d_model  heads  kv  head_dim  hidden  window  global RoPE scale
  270m      18      640      4     1    256      2048     512        1
  1b        26     1152      4     1    256      6912     512        1
  4b        34     2560      8     4    256     10240    1024        8
  12b       48     3840     16     8    256     15360    1024        8
  27b       62     5376     32    16    128     21504    1024        8

Every size: vocabulary 262144 (the multimodal hub checkpoints of 4B+ carry 262208 rows;
the loaders keep whatever the checkpoint has), 5 local (sliding-window) layers then 1
global layer, RoPE base 10k on local layers and 1M on global ones, QK-norm, pre and post
norms around attention and MLP, RMSNorm eps 1e-6, queries scaled by
``query_pre_attn_scalar ** -0.5`` where the scalar is head_dim, except 27B where it is
d_model / heads = 168.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
  """Architecture of one Gemma 3 text model.

  Attributes:
    name: preset name ("270m", ..., "tiny") or "custom".
    num_layers: transformer blocks.
    d_model: residual-stream width ("embedding" axis).
    num_heads: query heads.
    num_kv_heads: key/value heads (1 = multi-query; < num_heads = grouped-query).
    head_dim: per-head width ("projection" axis).
    hidden_dim: GeGLU width ("neurons" axis).
    vocab_size: rows of the (tied) embedding table.
    sliding_window: tokens a local layer sees, itself included.
    local_rope_base, global_rope_base: RoPE max wavelengths.
    global_rope_scale: linear RoPE scaling factor on global layers (positions / scale).
    query_pre_attn_scalar: queries are multiplied by ``query_pre_attn_scalar ** -0.5``.
    global_every: layer ``i`` is global when ``(i + 1) % global_every == 0``.
    rms_norm_eps: RMSNorm epsilon.
  """

  name: str
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  hidden_dim: int
  vocab_size: int = 262_144
  sliding_window: int = 512
  local_rope_base: float = 10_000.0
  global_rope_base: float = 1_000_000.0
  global_rope_scale: float = 1.0
  query_pre_attn_scalar: float | None = None  # None: head_dim.
  global_every: int = 6
  rms_norm_eps: float = 1e-6

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

  @property
  def query_scale(self) -> float:
    """What queries are multiplied by before the q.k product."""
    scalar = self.head_dim if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar
    return float(scalar) ** -0.5

  @property
  def queries_per_kv_head(self) -> int:
    return self.num_heads // self.num_kv_heads

  def is_global(self, layer: int) -> bool:
    """Whether block ``layer`` uses global (full causal) attention."""
    return (layer + 1) % self.global_every == 0

  def rope(self, layer: int) -> tuple[float, float]:
    """(max wavelength, linear scale factor) of block ``layer``'s RoPE."""
    if self.is_global(layer):
      return self.global_rope_base, self.global_rope_scale
    return self.local_rope_base, 1.0

  def shape_signature(self) -> dict[str, int]:
    """The sizes a checkpoint's tensor shapes determine (vocab excluded: it varies)."""
    return dict(num_layers=self.num_layers, d_model=self.d_model, num_heads=self.num_heads,
                num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                hidden_dim=self.hidden_dim)

  def replace(self, **changes) -> "Gemma3Config":
    return dataclasses.replace(self, **changes)


PRESETS: dict[str, Gemma3Config] = {
    "270m": Gemma3Config("270m", num_layers=18, d_model=640, num_heads=4, num_kv_heads=1,
                         head_dim=256, hidden_dim=2048, sliding_window=512),
    "1b": Gemma3Config("1b", num_layers=26, d_model=1152, num_heads=4, num_kv_heads=1,
                       head_dim=256, hidden_dim=6912, sliding_window=512),
    "4b": Gemma3Config("4b", num_layers=34, d_model=2560, num_heads=8, num_kv_heads=4,
                       head_dim=256, hidden_dim=10240, sliding_window=1024,
                       global_rope_scale=8.0),
    "12b": Gemma3Config("12b", num_layers=48, d_model=3840, num_heads=16, num_kv_heads=8,
                        head_dim=256, hidden_dim=15360, sliding_window=1024,
                        global_rope_scale=8.0),
    "27b": Gemma3Config("27b", num_layers=62, d_model=5376, num_heads=32, num_kv_heads=16,
                        head_dim=128, hidden_dim=21504, sliding_window=1024,
                        global_rope_scale=8.0, query_pre_attn_scalar=5376 // 32),
    # For tests: grouped-query attention (2 kv heads x 2), both attention kinds within 7
    # layers, a window of 4 so short sequences already exercise it, a global RoPE scale so
    # that path runs too, and a vocabulary small enough to run anywhere.
    "tiny": Gemma3Config("tiny", num_layers=7, d_model=32, num_heads=4, num_kv_heads=2,
                         head_dim=16, hidden_dim=48, vocab_size=384, sliding_window=4,
                         global_rope_scale=8.0),
}


def get_preset(name: str | Gemma3Config) -> Gemma3Config:
  """A preset by name (case-insensitive, "gemma3-1b" and "1B" also work), or a config as is."""
  if isinstance(name, Gemma3Config):
    return name
  key = str(name).lower().removeprefix("gemma3-").removeprefix("gemma-3-").removeprefix("gemma3_")
  if key not in PRESETS:
    raise ValueError(f"unknown Gemma 3 preset {name!r}; the presets are "
                     f"{', '.join(PRESETS)} (or pass preset='auto' to infer it from the shapes)")
  return PRESETS[key]
