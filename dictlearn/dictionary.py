"""JumpReLU dictionaries as pytrees, and the plain functions that run them.

A dictionary is a registered dataclass whose array fields are pytree leaves and whose
``meta`` (where it reads and writes, which model, where it came from) is static. All
math is in plain functions over those pytrees, so they compose with ``jax.jit``,
``jax.vmap`` and ``jax.grad`` and with any framework that can hand over arrays.

Shapes (``...`` is any leading batch shape)::

    w_enc (d_in, width)    b_enc (width,)    threshold (width,)
    w_dec (width, d_out)   b_dec (d_out,)    w_skip (d_in, d_out) | None

    encode: x (..., d_in)  -> f (..., width)
    decode: f (..., width) -> y (..., d_out)      (x needed when w_skip is set)

JumpReLU follows Gemma Scope 2 and SAELens: ``pre = x @ w_enc + b_enc`` and
``f = pre * (pre > threshold)``, so a pre-activation at or below its threshold gives
exactly 0. (SAELens also applies a ReLU first; that only differs for negative
thresholds, which no released dictionary has.)

Precision: weights may be stored in bfloat16. ``compute_dtype`` picks the dtype of the
matmul operands; accumulation and everything after the matmul is always float32. The
default, float32, is exact math on whatever is stored; ``jnp.bfloat16`` keeps bf16
operands (faster, the input is rounded to bf16).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_TENSORS = ("w_enc", "b_enc", "threshold", "w_dec", "b_dec", "w_skip")


def check_values(d, check_finite: bool) -> None:
  """Every tensor of ``d`` a floating dtype and, with ``check_finite``, free of NaN/inf.

  Raises:
    ValueError: naming the tensor.
  """
  for name in _TENSORS:
    w = getattr(d, name, None)
    if w is None:
      continue
    if not jnp.issubdtype(w.dtype, jnp.floating):
      raise ValueError(f"{name} must be a floating dtype but is {w.dtype}")
    if check_finite and not bool(np.isfinite(np.asarray(w, np.float32)).all()):
      raise ValueError(f"{name} has non-finite values (NaN or inf)")


@dataclasses.dataclass(frozen=True)
class DictMeta:
  """Static facts about a dictionary; never traced, hashable, safe as jit static data.

  Attributes:
    kind: "sae" or "transcoder".
    site: the site name it reads, e.g. "resid_post" (None if unknown).
    layer: the layer index of that site (None if unknown).
    site_out: the site it writes (transcoders: "mlp_out"); equals ``site`` for SAEs.
    model_name: e.g. "gemma-v3-1b-pt" as written in config.json.
    hook_point_in / hook_point_out: the Gemma Scope 2 ``hf_hook_point_in/out`` strings.
    l0: the target or measured L0 recorded with the dictionary (may be a label like
      "medium" for hub dictionaries whose config does not give a number).
    source: where it was loaded from (path or hub reference).
    extra: other config.json entries, kept so a save/load round trip loses nothing.
  """

  kind: str = "sae"
  site: str | None = None
  layer: int | None = None
  site_out: str | None = None
  model_name: str | None = None
  hook_point_in: str | None = None
  hook_point_out: str | None = None
  l0: float | str | None = None
  source: str | None = None
  extra: tuple[tuple[str, Any], ...] = ()

  def replace(self, **changes) -> "DictMeta":
    return dataclasses.replace(self, **changes)


def _check_2d(name, w, rows, cols):
  if w.ndim != 2 or (rows is not None and w.shape[0] != rows) or (
      cols is not None and w.shape[1] != cols):
    raise ValueError(
        f"{name} must have shape ({rows if rows is not None else 'any'}, "
        f"{cols if cols is not None else 'any'}) but has {tuple(w.shape)}")


def _check_1d(name, b, n):
  if b.ndim != 1 or b.shape[0] != n:
    raise ValueError(f"{name} must have shape ({n},) but has {tuple(b.shape)}")


class _DictionaryBase:
  """Shape properties and validation shared by both dictionary kinds."""

  @property
  def d_in(self) -> int:
    return self.w_enc.shape[0]

  @property
  def width(self) -> int:
    return self.w_enc.shape[1]

  @property
  def d_out(self) -> int:
    return self.w_dec.shape[1]

  @property
  def dtype(self):
    return self.w_enc.dtype

  def validate(self, *, check_finite: bool = False):
    """Checks shapes (always) and finiteness (if asked); returns self.

    Raises:
      ValueError: naming the tensor and the shape it should have.
    """
    if not hasattr(self.w_enc, "ndim") or isinstance(self.w_enc, jax.core.Tracer):
      return self  # Called under tracing with abstract leaves: shapes were checked.
    _check_2d("w_enc", self.w_enc, None, None)
    d_in, width = self.w_enc.shape
    _check_1d("b_enc", self.b_enc, width)
    _check_1d("threshold", self.threshold, width)
    _check_2d("w_dec", self.w_dec, width, None)
    d_out = self.w_dec.shape[1]
    _check_1d("b_dec", self.b_dec, d_out)
    w_skip = getattr(self, "w_skip", None)
    if w_skip is not None:
      _check_2d("w_skip", w_skip, d_in, d_out)
    if isinstance(self, JumpReLUSAE) and d_out != d_in:
      raise ValueError(
          f"an SAE reconstructs its input, so w_dec must be (width, d_in={d_in}) "
          f"but has {tuple(self.w_dec.shape)}; use dictlearn.Transcoder for d_out != d_in")
    check_values(self, check_finite)
    return self

  def astype(self, dtype):
    """Returns a copy with every weight cast to ``dtype`` (e.g. jnp.bfloat16)."""
    return jax.tree_util.tree_map(lambda w: w.astype(dtype), self)

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class JumpReLUSAE(_DictionaryBase):
  """A JumpReLU sparse autoencoder: encode x (..., d_in) into width latents, decode back."""

  w_enc: Array
  b_enc: Array
  threshold: Array
  w_dec: Array
  b_dec: Array
  meta: DictMeta = DictMeta()

  kind = "sae"
  w_skip = None


@dataclasses.dataclass(frozen=True)
class Transcoder(_DictionaryBase):
  """A JumpReLU transcoder: reads x (..., d_in), predicts y (..., d_out).

  With ``w_skip`` set it is an affine (skip) transcoder: ``y = f @ w_dec + b_dec + x @ w_skip``.
  """

  w_enc: Array
  b_enc: Array
  threshold: Array
  w_dec: Array
  b_dec: Array
  w_skip: Array | None = None
  meta: DictMeta = DictMeta(kind="transcoder")

  kind = "transcoder"


jax.tree_util.register_dataclass(
    JumpReLUSAE,
    data_fields=["w_enc", "b_enc", "threshold", "w_dec", "b_dec"],
    meta_fields=["meta"])
jax.tree_util.register_dataclass(
    Transcoder,
    data_fields=["w_enc", "b_enc", "threshold", "w_dec", "b_dec", "w_skip"],
    meta_fields=["meta"])

Dictionary = JumpReLUSAE | Transcoder


# ----------------------------------------------------------------------------- math


def matmul(x: Array, w: Array, compute_dtype=jnp.float32) -> Array:
  """``x @ w`` with operands in ``compute_dtype`` and float32 accumulation/result."""
  dt = jnp.dtype(compute_dtype)
  return jnp.matmul(x.astype(dt), w.astype(dt), preferred_element_type=jnp.float32)


# XLA:CPU has no bfloat16 matmul on processors without AVX512-BF16/AMX: it converts bf16
# weights to a float32 copy inside every call (measured on a 2-core EPYC at d_in 1152,
# width 65k: 13x slower than float32 weights at one token, plus a float32 copy of the
# weights in temporary memory). Small dictionaries do not notice; big ones get a warning.
_CPU_BF16_WARN_BYTES = 64 << 20


def check_input(d: Dictionary, x: Array, what: str = "x", *, bf16_ok: bool = False) -> None:
  """Raises a clear ValueError when x's last axis is not the dictionary's d_in.

  Also warns (once per call site) when big bfloat16 weights are used on CPU, unless the
  caller reads them without XLA's conversion (``bf16_ok``: encode_decode's CPU kernels).
  """
  if x.ndim == 0 or x.shape[-1] != d.d_in:
    where = f" (site {d.meta.site}({d.meta.layer}))" if d.meta.site else ""
    raise ValueError(
        f"{type(d).__name__}{where} expects {what} with last axis d_in={d.d_in} but got "
        f"shape {tuple(x.shape)}")
  w = d.w_enc
  if (not bf16_ok and w.dtype == jnp.bfloat16 and 2 * w.size >= _CPU_BF16_WARN_BYTES
      and jax.default_backend() == "cpu"):
    warnings.warn(
        "bfloat16 dictionary weights on CPU: XLA:CPU converts them to float32 inside every "
        "call (much slower, and a float32 copy in memory). Convert once with "
        "d = d.astype(jnp.float32), use dictlearn.encode_decode (it reads bf16 blocks "
        "directly on CPU), or run on GPU/TPU where bf16 is the fast path.",
        stacklevel=3)


def check_skip_input(d: Dictionary, x: Array | None, call: str) -> None:
  """Affine transcoders need x for the skip term: a clear error naming the call to make."""
  if d.w_skip is None:
    return
  if x is None:
    raise ValueError(
        "this transcoder has an affine skip connection (w_skip), so the input is needed "
        f"too: {call}")
  check_input(d, x)


def pre_activations(d: Dictionary, x: Array, *, compute_dtype=jnp.float32) -> Array:
  """``x @ w_enc + b_enc`` in float32: (..., d_in) -> (..., width)."""
  check_input(d, x)
  return matmul(x, d.w_enc, compute_dtype) + d.b_enc.astype(jnp.float32)


def jumprelu(pre: Array, threshold: Array) -> Array:
  """``pre * (pre > threshold)``: exactly 0 at or below the threshold."""
  return jnp.where(pre > threshold.astype(pre.dtype), pre, jnp.zeros_like(pre))


def encode(d: Dictionary, x: Array, *, compute_dtype=jnp.float32) -> Array:
  """Latent activations f (..., width), float32, from inputs x (..., d_in)."""
  return jumprelu(pre_activations(d, x, compute_dtype=compute_dtype), d.threshold)


def decode(d: Dictionary, f: Array, x: Array | None = None, *,
           compute_dtype=jnp.float32) -> Array:
  """Output y (..., d_out), float32, from latents f (..., width).

  For an affine transcoder ``x`` (..., d_in) is required: the skip term reads it.
  """
  if f.shape[-1] != d.width:
    raise ValueError(
        f"decode expects latents with last axis width={d.width} but got {tuple(f.shape)}")
  check_skip_input(d, x, "decode(d, f, x)")
  return add_bias_and_skip(d, matmul(f, d.w_dec, compute_dtype), x, compute_dtype)


def add_bias_and_skip(d: Dictionary, y: Array, x: Array | None,
                      compute_dtype=jnp.float32) -> Array:
  """``y + b_dec`` (``+ x @ w_skip`` for affine transcoders): the decoder's affine part.

  y (..., d_out) is the latents' float32 contribution (``f @ w_dec``, or the fused pass's
  sparse decode); x (..., d_in) is read only when d has a skip connection.
  """
  y = y + d.b_dec.astype(jnp.float32)
  if d.w_skip is not None:
    y = y + matmul(x, d.w_skip, compute_dtype)
  return y


def forward(d: Dictionary, x: Array, *, compute_dtype=jnp.float32) -> Array:
  """Reconstruction (SAE) or prediction (transcoder), (..., d_in) -> (..., d_out)."""
  return decode(d, encode(d, x, compute_dtype=compute_dtype), x, compute_dtype=compute_dtype)


# ------------------------------------------------------------------------- builders


def random_dictionary(key, d_in: int, width: int, *, kind: str = "sae",
                      d_out: int | None = None, affine: bool = False,
                      threshold: float = 0.0, dtype=jnp.float32,
                      meta: DictMeta | None = None) -> Dictionary:
  """A randomly initialised dictionary (unit-norm decoder rows, encoder = decoder.T).

  Useful for tests and as a training start. ``threshold`` sets every latent's threshold.
  """
  d_out = d_in if d_out is None else d_out
  k_dec, k_skip = jax.random.split(key)
  w_dec = jax.random.normal(k_dec, (width, d_out), jnp.float32)
  w_dec = w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)
  w_enc = w_dec.T if d_out == d_in else jax.random.normal(
      k_skip, (d_in, width), jnp.float32) / np.sqrt(d_in)
  common = dict(w_enc=w_enc.astype(dtype), b_enc=jnp.zeros((width,), dtype),
                threshold=jnp.full((width,), threshold, dtype),
                w_dec=w_dec.astype(dtype), b_dec=jnp.zeros((d_out,), dtype))
  if kind == "sae":
    if d_out != d_in or affine:
      raise ValueError("an SAE has d_out == d_in and no skip; use kind='transcoder'")
    return JumpReLUSAE(**common, meta=meta or DictMeta())
  if kind != "transcoder":
    raise ValueError(f"kind must be 'sae' or 'transcoder', not {kind!r}")
  w_skip = jnp.zeros((d_in, d_out), dtype) if affine else None
  return Transcoder(**common, w_skip=w_skip, meta=meta or DictMeta(kind="transcoder"))
