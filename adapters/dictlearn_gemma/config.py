"""Gemma 3 text-model sizes: ``Gemma3Config``, the five presets and a tiny test size;
Gemma 2's: ``Gemma2Config`` and ``GEMMA2_PRESETS`` (2b, 9b, 27b).

The architecture numbers of the published sizes live in one table, ``dictlearn.catalog.MODELS``
(270m, 1b, 4b, 12b, 27b); ``PRESETS`` builds a ``Gemma3Config`` from each, and adds "tiny",
a size that exists only for tests.
"""

from __future__ import annotations

import dataclasses

from dictlearn.catalog import GEMMA2_MODELS, MODELS, BlockShape, Gemma2Facts, ModelFacts


class _Checked:
  """What both families' configs add to their facts: checks, derived sizes, ``replace``."""

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

  def shape_signature(self) -> dict[str, int]:
    """The sizes a checkpoint's tensor shapes determine (vocab excluded: it varies)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(BlockShape)}

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma3Config(_Checked, ModelFacts):
  """Architecture of one Gemma 3 text model: ``dictlearn.catalog.ModelFacts`` and a name.

  Every field is a keyword; see ``ModelFacts`` for what each number means.

  Attributes:
    name: preset name ("270m", ..., "tiny") or "custom".
  """

  name: str = "custom"

  def is_global(self, layer: int) -> bool:
    """Whether block ``layer`` uses global (full causal) attention."""
    return (layer + 1) % self.global_every == 0

  def rope(self, layer: int) -> tuple[float, float]:
    """(max wavelength, linear scale factor) of block ``layer``'s RoPE."""
    if self.is_global(layer):
      return self.global_rope_base, self.global_rope_scale
    return self.local_rope_base, 1.0

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


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma2Config(_Checked, Gemma2Facts):
  """Architecture of one Gemma 2 text model: ``dictlearn.catalog.Gemma2Facts`` and a name.

  Attributes:
    name: preset name ("2b", "9b", "27b") or "custom".
  """

  name: str = "custom"

  def is_global(self, layer: int) -> bool:
    """Whether block ``layer`` attends globally (odd layers; even ones use the window)."""
    return layer % 2 == 1

  @classmethod
  def from_hf_config(cls, hf: dict, source: str = "config.json") -> "Gemma2Config":
    """From a transformers ``Gemma2Config`` dict (``config.json``).

    Raises:
      ValueError: a size field missing, or settings this model does not implement (a
        layer pattern other than sliding/full alternating, another activation).
    """
    need = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
            "head_dim", "intermediate_size")
    missing = [k for k in need if k not in hf]
    if missing:
      raise ValueError(f"{source}: a Gemma 2 config needs {', '.join(missing)}")
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    want = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    if types is not None and list(types) != want:
      raise ValueError(f"{source}: layer_types {types} are not Gemma 2's alternation "
                       "(sliding on even layers, full on odd)")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
      raise ValueError(f"{source}: hidden activation {act!r}; Gemma 2 uses gelu_pytorch_tanh")
    rope = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10_000.0))
    return cls(num_layers=n, d_model=hf["hidden_size"], num_heads=hf["num_attention_heads"],
               num_kv_heads=hf["num_key_value_heads"], head_dim=hf["head_dim"],
               hidden_dim=hf["intermediate_size"], vocab_size=hf.get("vocab_size", 256_000),
               sliding_window=hf.get("sliding_window", 4096), rope_base=float(rope),
               query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
               attn_logit_softcap=hf.get("attn_logit_softcapping"),
               final_logit_softcap=hf.get("final_logit_softcapping"),
               rms_norm_eps=hf.get("rms_norm_eps", 1e-6))

  @classmethod
  def from_facts(cls, facts: Gemma2Facts, name: str = "custom") -> "Gemma2Config":
    fields = dataclasses.fields(Gemma2Facts)
    return cls(name=name, **{f.name: getattr(facts, f.name) for f in fields})


GEMMA2_PRESETS: dict[str, Gemma2Config] = {
    size: Gemma2Config.from_facts(facts, size) for size, facts in GEMMA2_MODELS.items()}


def gemma2_preset_for(sizes: dict[str, int]) -> Gemma2Config | None:
  """The Gemma 2 preset with these ``shape_signature`` sizes, or None."""
  return next((c for c in GEMMA2_PRESETS.values() if c.shape_signature() == sizes), None)


def get_gemma2_preset(name: str | Gemma2Config) -> Gemma2Config:
  """A Gemma 2 preset by name ("2b", "gemma2-9b", "27B"), or a config as is."""
  if isinstance(name, Gemma2Config):
    return name
  key = str(name).lower().removeprefix("gemma2-").removeprefix("gemma-2-").removeprefix("gemma2_")
  if key not in GEMMA2_PRESETS:
    raise ValueError(f"unknown Gemma 2 preset {name!r}; the presets are "
                     f"{', '.join(GEMMA2_PRESETS)}")
  return GEMMA2_PRESETS[key]
