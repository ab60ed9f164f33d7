"""Gemma 3 text-model sizes: ``Gemma3Config``, the five presets and a tiny test size.

The architecture numbers of the published sizes live in one table, ``dictlearn.catalog.MODELS``
(270m, 1b, 4b, 12b, 27b); ``PRESETS`` builds a ``Gemma3Config`` from each, and adds "tiny",
a size that exists only for tests.
"""

from __future__ import annotations

import dataclasses

from dictlearn.catalog import MODELS, ModelFacts


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma3Config(ModelFacts):
  """Architecture of one Gemma 3 text model: ``dictlearn.catalog.ModelFacts`` and a name.

  Every field is a keyword; see ``ModelFacts`` for what each number means.

  Attributes:
    name: preset name ("270m", ..., "tiny") or "custom".
  """

  name: str = "custom"

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

  @classmethod
  def from_facts(cls, facts: ModelFacts, name: str = "custom") -> "Gemma3Config":
    """The config of a ``dictlearn.catalog.ModelFacts`` entry."""
    return cls(name=name, **{f.name: getattr(facts, f.name) for f in dataclasses.fields(ModelFacts)})


PRESETS: dict[str, Gemma3Config] = {
    **{size: Gemma3Config.from_facts(facts, size) for size, facts in MODELS.items()},
    # For tests: grouped-query attention (2 kv heads x 2), both attention kinds within 7
    # layers, a window of 4 so short sequences already exercise it, a global RoPE scale so
    # that path runs too, and a vocabulary small enough to run anywhere.
    "tiny": Gemma3Config(name="tiny", num_layers=7, d_model=32, num_heads=4, num_kv_heads=2,
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
