"""What Gemma Scope 2 (and 1) publish, and the Gemma 3 (and 2) sizes they were trained on.

``MODELS`` is the repository's one table of Gemma 3 architecture numbers (``ModelFacts``
per size: layers, widths, heads, window, RoPE, ...); ``dictlearn_gemma.config.PRESETS``
builds its configs from it, and ``ref``/``find`` check layers against it.

Gemma Scope 2 has one hub repository per Gemma 3 model: ``google/gemma-scope-2-<size>-<pt|it>``.
Inside, one folder per site family:

* ``resid_post``, ``attn_out``, ``mlp_out``, ``transcoder``: four layers per model (at
  25%, 50%, 65% and 85% depth) with a sweep of widths (16k, 65k, 262k, and 1m for the
  residual stream) and three target L0 buckets (``small`` 10-20, ``medium`` 30-60,
  ``big`` 90-150);
* ``resid_post_all``, ``attn_out_all``, ``mlp_out_all``, ``transcoder_all``: every layer,
  widths 16k and 262k, L0 ``small`` and ``big``;
* ``clt``: cross-layer transcoders (270m and 1b; not read by dictlearn yet).

Folder names are ``layer_<L>_width_<W>_l0_<bucket>``; transcoders add ``_affine`` for the
skip-connection variant. The four depths are rounded to layers here (depth * n_layers, half
up), which reproduces the published examples (1b layer 22, 270m layer 9); when online,
``list_remote`` reads the actual folders from the hub.
"""

from __future__ import annotations

import dataclasses

VARIANTS = ("pt", "it")
SITES = ("resid_post", "attn_out", "mlp_out", "transcoder")
L0_BUCKETS = ("small", "medium", "big")
ALL_LAYER_L0_BUCKETS = ("small", "big")
WIDTHS = {"16k": 16_384, "65k": 65_536, "262k": 262_144, "1m": 1_048_576}
DEPTHS = (0.25, 0.50, 0.65, 0.85)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockShape:
  """The sizes of a Gemma text model's blocks, shared by ``ModelFacts`` and ``Gemma2Facts``.

  Attributes:
    num_layers: transformer blocks.
    d_model: residual-stream width.
    num_heads: query heads.
    num_kv_heads: key/value heads (1 = multi-query; < num_heads = grouped-query).
    head_dim: per-head width.
    hidden_dim: GeGLU width.
  """

  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  hidden_dim: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelFacts(BlockShape):
  """The architecture of one Gemma 3 text model: every number its weights and dictionaries obey.

  This is the one table of Gemma 3 sizes in the repository; ``dictlearn_gemma.config``
  builds its presets from it. The numbers come from the Gemma reference implementation
  (``gemma.gm.nn._gemma``: ``Gemma3_270M`` ... ``Gemma3_27B``) and agree with transformers'
  ``Gemma3TextConfig`` files on the hub.

  Attributes (with ``BlockShape``'s sizes):
    vocab_size: rows of the (tied) embedding table (the multimodal hub checkpoints of 4B+
      carry 262208 rows; the loaders keep whatever the checkpoint has).
    sliding_window: tokens a local layer sees, itself included.
    local_rope_base, global_rope_base: RoPE max wavelengths.
    global_rope_scale: linear RoPE scaling factor on global layers (positions / scale).
    query_pre_attn_scalar: queries are multiplied by ``query_pre_attn_scalar ** -0.5``
      (None: head_dim).
    global_every: layer ``i`` is global when ``(i + 1) % global_every == 0`` (5 local : 1).
    rms_norm_eps: RMSNorm epsilon.
  """

  vocab_size: int = 262_144
  sliding_window: int = 512
  local_rope_base: float = 10_000.0
  global_rope_base: float = 1_000_000.0
  global_rope_scale: float = 1.0
  query_pre_attn_scalar: float | None = None
  global_every: int = 6
  rms_norm_eps: float = 1e-6


# Gemma 3 sizes. Every size: vocabulary 262144, RoPE base 10k local / 1M global, RMSNorm eps
# 1e-6, 5 local layers then 1 global; queries scaled by head_dim ** -0.5 except 27B
# (d_model / heads = 168).
MODELS: dict[str, ModelFacts] = {
    "270m": ModelFacts(num_layers=18, d_model=640, num_heads=4, num_kv_heads=1, head_dim=256,
                       hidden_dim=2048, sliding_window=512, global_rope_scale=1.0),
    "1b": ModelFacts(num_layers=26, d_model=1152, num_heads=4, num_kv_heads=1, head_dim=256,
                     hidden_dim=6912, sliding_window=512, global_rope_scale=1.0),
    "4b": ModelFacts(num_layers=34, d_model=2560, num_heads=8, num_kv_heads=4, head_dim=256,
                     hidden_dim=10240, sliding_window=1024, global_rope_scale=8.0),
    "12b": ModelFacts(num_layers=48, d_model=3840, num_heads=16, num_kv_heads=8, head_dim=256,
                      hidden_dim=15360, sliding_window=1024, global_rope_scale=8.0),
    "27b": ModelFacts(num_layers=62, d_model=5376, num_heads=32, num_kv_heads=16,
                      head_dim=128, hidden_dim=21504, sliding_window=1024,
                      global_rope_scale=8.0, query_pre_attn_scalar=5376 // 32),
}
SIZES = tuple(MODELS)  # Gemma Scope 2 has a release for every size.


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma2Facts(BlockShape):
  """The architecture of one Gemma 2 text model (the models Gemma Scope 1 was trained on).

  The numbers are those of penzai's Gemma 2 presets
  (``penzai.models.transformer.variants.gemma``: ``gemma2_2b`` ... ``gemma2_27b``), which
  follow the Gemma reference implementation. Layers alternate: even layers attend within a
  sliding window, odd layers globally. No QK-norm; instead attention logits and final logits
  are soft-capped (``cap * tanh(x / cap)``).

  Attributes (with ``BlockShape``'s sizes):
    vocab_size: transformers' 256000 (the flax checkpoints carry 256128 rows; the loaders
      keep whatever the checkpoint has).
    sliding_window: tokens a local (even) layer sees, itself included.
    rope_base: RoPE max wavelength (every layer).
    query_pre_attn_scalar: queries are multiplied by ``query_pre_attn_scalar ** -0.5``
      (None: head_dim).
    attn_logit_softcap, final_logit_softcap: the tanh soft-caps (None: no cap).
    rms_norm_eps: RMSNorm epsilon.
  """

  vocab_size: int = 256_000
  sliding_window: int = 4096
  rope_base: float = 10_000.0
  query_pre_attn_scalar: float | None = None
  attn_logit_softcap: float | None = 50.0
  final_logit_softcap: float | None = 30.0
  rms_norm_eps: float = 1e-6


# Gemma 2 sizes; queries scaled by head_dim ** -0.5 except 27B (d_model / heads = 144).
GEMMA2_MODELS: dict[str, Gemma2Facts] = {
    "2b": Gemma2Facts(num_layers=26, d_model=2304, num_heads=8, num_kv_heads=4, head_dim=256,
                      hidden_dim=9216),
    "9b": Gemma2Facts(num_layers=42, d_model=3584, num_heads=16, num_kv_heads=8, head_dim=256,
                      hidden_dim=14336),
    "27b": Gemma2Facts(num_layers=46, d_model=4608, num_heads=32, num_kv_heads=16,
                       head_dim=128, hidden_dim=36864, query_pre_attn_scalar=4608 // 32),
}


def repo_id(size: str, variant: str = "pt") -> str:
  """``("1b", "pt")`` -> ``"google/gemma-scope-2-1b-pt"``."""
  _check(size, SIZES, "size")
  _check(variant, VARIANTS, "variant")
  return f"google/gemma-scope-2-{size}-{variant}"


def releases() -> list[str]:
  """Every Gemma Scope 2 repository id."""
  return [repo_id(s, v) for s in SIZES for v in VARIANTS]


def sweep_layers(size: str) -> tuple[int, ...]:
  """The four layers that have the full width and L0 sweep."""
  n = MODELS[_check(size, SIZES, "size")].num_layers
  return tuple(int(f * n + 0.5) for f in DEPTHS)


def widths(site: str, all_layers: bool = False) -> tuple[str, ...]:
  _check(site, SITES, "site")
  if all_layers:
    return ("16k", "262k")
  return ("16k", "65k", "262k", "1m") if site == "resid_post" else ("16k", "65k", "262k")


def ref(size: str, site: str, layer: int, width: str = "16k", l0: str = "small", *,
        variant: str = "pt", affine: bool = True, all_layers: bool | None = None) -> str:
  """A hub reference for ``dictlearn.load``.

  ``all_layers=None`` picks the sweep folder for the four sweep layers, else ``*_all``.

  Raises:
    ValueError: for a combination Gemma Scope 2 does not publish, naming what exists.
  """
  _check(site, SITES, "site")
  n = MODELS[_check(size, SIZES, "size")].num_layers
  if not 0 <= layer < n:
    raise ValueError(f"layer {layer} is out of range: Gemma 3 {size} has {n} layers (0-{n - 1})")
  if all_layers is None:
    all_layers = layer not in sweep_layers(size)
  elif not all_layers and layer not in sweep_layers(size):
    raise ValueError(
        f"layer {layer} has no sweep folder for {size}; sweep layers are "
        f"{sweep_layers(size)} (use all_layers=True for the others)")
  _check(width, widths(site, all_layers), "width")
  _check(l0, ALL_LAYER_L0_BUCKETS if all_layers else L0_BUCKETS, "l0")
  folder = site + ("_all" if all_layers else "")
  name = f"layer_{layer}_width_{width}_l0_{l0}"
  if site == "transcoder" and affine:
    name += "_affine"
  return f"{repo_id(size, variant)}/{folder}/{name}"


def find(size: str, site: str, *, variant: str = "pt", layer: int | None = None,
         width: str | None = None, l0: str | None = None) -> list[str]:
  """Every published reference matching the filters (sweep folders and ``*_all``)."""
  out = []
  layers = range(MODELS[_check(size, SIZES, "size")].num_layers) if layer is None else [layer]
  for L in layers:
    for all_layers in (False, True):
      if not all_layers and L not in sweep_layers(size):
        continue
      for w in widths(site, all_layers):
        for b in ALL_LAYER_L0_BUCKETS if all_layers else L0_BUCKETS:
          if (width is None or w == width) and (l0 is None or b == l0):
            for affine in ((False, True) if site == "transcoder" else (False,)):
              out.append(ref(size, site, L, w, b, variant=variant, affine=affine,
                             all_layers=all_layers))
  return out


def list_remote(size: str, variant: str = "pt", *, revision: str | None = None) -> list[str]:
  """The dictionary folders actually on the hub (needs the network)."""
  from huggingface_hub import HfApi

  rid = repo_id(size, variant)
  files = HfApi().list_repo_files(rid, revision=revision)
  return sorted({f"{rid}/{f.rsplit('/', 1)[0]}" for f in files if f.endswith("params.safetensors")})


# ------------------------------------------------------------------ Gemma Scope 1
#
# Gemma Scope 1 (arXiv 2408.05147) holds JumpReLU SAEs for the Gemma 2 sizes of
# ``GEMMA2_MODELS``, one hub repository per (size, site family):
# ``google/gemma-scope-<size>-pt-<res|mlp|att>``. Folders are
# ``layer_<L>/width_<W>/average_l0_<N>/params.npz``, with N the measured average L0 (so a
# reference needs the exact number: ``gs1_list_remote`` reads them from the hub). Which
# widths exist differs by repository and layer; the hub is the authority.

GS1_SITES = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_z"}  # as dictlearn.io reads them
GS1_RELEASES: dict[str, tuple[str, ...]] = {
    "2b": ("res", "mlp", "att"), "9b": ("res", "mlp", "att"), "27b": ("res",)}
GS1_WIDTHS = {"16k": 2 ** 14, "32k": 2 ** 15, "65k": 2 ** 16, "131k": 2 ** 17,
              "262k": 2 ** 18, "524k": 2 ** 19, "1m": 2 ** 20}


def gs1_repo_id(size: str, site: str = "res") -> str:
  """``("2b", "res")`` -> ``"google/gemma-scope-2b-pt-res"``."""
  _check(size, tuple(GS1_RELEASES), "Gemma 2 size")
  _check(site, GS1_RELEASES[size], f"Gemma Scope 1 site family for {size}")
  return f"google/gemma-scope-{size}-pt-{site}"


def gs1_releases() -> list[str]:
  """Every Gemma Scope 1 repository id listed here (``GS1_RELEASES``)."""
  return [gs1_repo_id(size, site) for size, sites in GS1_RELEASES.items() for site in sites]


def gs1_ref(size: str, site: str, layer: int, width: str, average_l0: int) -> str:
  """A hub reference for ``dictlearn.load``:
  ``google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71``.

  Raises:
    ValueError: an unknown size, site family or width name, or a layer out of range.
  """
  rid = gs1_repo_id(size, site)
  n = GEMMA2_MODELS[size].num_layers
  if not 0 <= layer < n:
    raise ValueError(f"layer {layer} is out of range: Gemma 2 {size} has {n} layers (0-{n - 1})")
  _check(width, tuple(GS1_WIDTHS), "width")
  return f"{rid}/layer_{layer}/width_{width}/average_l0_{int(average_l0)}"


def gs1_list_remote(size: str, site: str = "res", *, revision: str | None = None) -> list[str]:
  """The dictionary folders actually in a Gemma Scope 1 repository (needs the network)."""
  from huggingface_hub import HfApi

  rid = gs1_repo_id(size, site)
  files = HfApi().list_repo_files(rid, revision=revision)
  return sorted({f"{rid}/{f.rsplit('/', 1)[0]}" for f in files if f.endswith("params.npz")})


def _check(value, allowed, what):
  if value not in allowed:
    raise ValueError(f"{what} {value!r} is not one of {', '.join(map(str, allowed))}")
  return value
