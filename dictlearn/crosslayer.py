"""Cross-layer transcoders (CLTs): one JumpReLU encoder per layer, decoders into every later MLP.

A CLT replaces all of a model's MLPs at once. Layer ``i``'s latents read that layer's MLP
input and write into the MLP outputs of layers ``i, i+1, ..., n_layers-1``, so a latent can
stand for computation that spans several MLPs. Gemma Scope 2 ships them for the 270M and 1B
as ``clt/<name>/params_layer_{i}.safetensors``, one file per encoder layer.

Shapes (``L`` = n_layers, leading axis = the encoder layer ``i``)::

    w_enc (L, d_in, width)   b_enc (L, width)   threshold (L, width)
    w_dec (L, width, L, d_out)   only [i, :, j] with j >= i is used (the file's layout)
    b_dec (L, d_out) | None      the bias of layer i's output
    w_skip (L, d_in, d_out) | None   layer i's affine skip, x_i @ w_skip[i]

    encode: x (L, ..., d_in) -> f (L, ..., width)      (layer axis first)
    decode: f (L, ..., width) -> y (L, ..., d_out)     (x needed when w_skip is set)

The output at layer ``j`` is ``sum_{i<=j} f_i @ w_dec[i, :, j] + b_dec[j] + x_j @ w_skip[j]``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn.dictionary import DictMeta, check_values, jumprelu, matmul

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class CrossLayerTranscoder:
  """A JumpReLU cross-layer transcoder (see the module docstring for shapes)."""

  w_enc: Array
  b_enc: Array
  threshold: Array
  w_dec: Array
  b_dec: Array | None = None
  w_skip: Array | None = None
  meta: DictMeta = DictMeta(kind="clt", site="mlp_in", site_out="mlp_out")

  kind = "clt"

  @property
  def n_layers(self) -> int:
    return self.w_enc.shape[0]

  @property
  def d_in(self) -> int:
    return self.w_enc.shape[1]

  @property
  def width(self) -> int:
    return self.w_enc.shape[2]

  @property
  def d_out(self) -> int:
    return self.w_dec.shape[3]

  @property
  def dtype(self):
    return self.w_enc.dtype

  def validate(self, *, check_finite: bool = False) -> "CrossLayerTranscoder":
    """Checks shapes (always) and finiteness (if asked); returns self.

    Raises:
      ValueError: naming the tensor and the shape it should have.
    """
    if isinstance(self.w_enc, jax.core.Tracer) or not hasattr(self.w_enc, "ndim"):
      return self
    if self.w_enc.ndim != 3:
      raise ValueError(f"w_enc must be (n_layers, d_in, width) but has {tuple(self.w_enc.shape)}")
    n, d_in, width = self.w_enc.shape
    d_out = self.w_dec.shape[-1] if self.w_dec.ndim == 4 else None
    want = {"b_enc": (n, width), "threshold": (n, width), "w_dec": (n, width, n, d_out),
            "b_dec": (n, d_out), "w_skip": (n, d_in, d_out)}
    for name, shape in want.items():
      w = getattr(self, name)
      if w is not None and tuple(w.shape) != shape:
        names = {"b_enc": "(n_layers, width)", "threshold": "(n_layers, width)",
                 "w_dec": "(n_layers, width, n_layers, d_out)", "b_dec": "(n_layers, d_out)",
                 "w_skip": "(n_layers, d_in, d_out)"}[name]
        raise ValueError(f"{name} must be {names} = {shape} but has {tuple(w.shape)}")
    check_values(self, check_finite)
    return self

  def astype(self, dtype) -> "CrossLayerTranscoder":
    return jax.tree_util.tree_map(lambda w: w.astype(dtype), self)

  def replace(self, **changes) -> "CrossLayerTranscoder":
    return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(
    CrossLayerTranscoder,
    data_fields=["w_enc", "b_enc", "threshold", "w_dec", "b_dec", "w_skip"],
    meta_fields=["meta"])


def _check_layers(c: CrossLayerTranscoder, x: Array, what: str, last: int):
  if x.ndim < 2 or x.shape[0] != c.n_layers or x.shape[-1] != last:
    raise ValueError(
        f"a cross-layer transcoder with {c.n_layers} layers expects {what} of shape "
        f"(n_layers={c.n_layers}, ..., {last}) but got {tuple(x.shape)}")


def pre_activations(c: CrossLayerTranscoder, x: Array, *, compute_dtype=jnp.float32) -> Array:
  """``x_i @ w_enc[i] + b_enc[i]`` for every layer: (L, ..., d_in) -> (L, ..., width)."""
  _check_layers(c, x, "MLP inputs x", c.d_in)
  lead = (slice(None),) + (None,) * (x.ndim - 2)
  pre = jax.vmap(lambda xi, w: matmul(xi, w, compute_dtype))(x, c.w_enc)
  return pre + c.b_enc.astype(jnp.float32)[lead]


def encode(c: CrossLayerTranscoder, x: Array, *, compute_dtype=jnp.float32) -> Array:
  """Latent activations f (L, ..., width), float32, from MLP inputs x (L, ..., d_in)."""
  lead = (slice(None),) + (None,) * (x.ndim - 2)
  return jumprelu(pre_activations(c, x, compute_dtype=compute_dtype), c.threshold[lead])


def decode(c: CrossLayerTranscoder, f: Array, x: Array | None = None, *,
           compute_dtype=jnp.float32) -> Array:
  """MLP outputs y (L, ..., d_out), float32, from latents f (L, ..., width).

  ``x`` (L, ..., d_in), the MLP inputs, is required when the CLT has skip connections.
  """
  _check_layers(c, f, "latents f", c.width)
  if c.w_skip is not None and x is None:
    raise ValueError("this cross-layer transcoder has skip connections (w_skip), so the MLP "
                     "inputs are needed too: decode(c, f, x)")
  # Only source layers i <= j feed output j: mask the rest of the stored decoder.
  causal = jnp.tril(jnp.ones((c.n_layers, c.n_layers), jnp.float32))  # [j, i]
  dt = jnp.dtype(compute_dtype)
  y = jnp.einsum("i...w,iwjd,ji->j...d", f.astype(dt), c.w_dec.astype(dt), causal.astype(dt),
                 preferred_element_type=jnp.float32)
  lead = (slice(None),) + (None,) * (f.ndim - 2)
  if c.b_dec is not None:
    y = y + c.b_dec.astype(jnp.float32)[lead]
  if c.w_skip is not None:
    _check_layers(c, x, "MLP inputs x", c.d_in)
    y = y + jax.vmap(lambda xi, w: matmul(xi, w, compute_dtype))(x, c.w_skip)
  return y


def forward(c: CrossLayerTranscoder, x: Array, *, compute_dtype=jnp.float32) -> Array:
  """Every layer's predicted MLP output (L, ..., d_out) from every MLP input (L, ..., d_in)."""
  return decode(c, encode(c, x, compute_dtype=compute_dtype), x, compute_dtype=compute_dtype)


def random_clt(key, n_layers: int, d_in: int, width: int, *, d_out: int | None = None,
               skip: bool = False, threshold: float = 0.0, dtype=jnp.float32,
               meta: DictMeta | None = None) -> CrossLayerTranscoder:
  """A random CLT (unit-norm decoder rows, zero biases) for tests and as a training start."""
  d_out = d_in if d_out is None else d_out
  k_enc, k_dec, k_skip = jax.random.split(key, 3)
  w_enc = jax.random.normal(k_enc, (n_layers, d_in, width)) / np.sqrt(d_in)
  w_dec = jax.random.normal(k_dec, (n_layers, width, n_layers, d_out))
  w_dec = w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True) / np.sqrt(n_layers)
  w_dec = w_dec * jnp.tril(jnp.ones((n_layers, n_layers))).T[:, None, :, None]
  w_skip = (jax.random.normal(k_skip, (n_layers, d_in, d_out)) * 0.1 / np.sqrt(d_in)
            if skip else None)
  c = CrossLayerTranscoder(
      w_enc=w_enc, b_enc=jnp.zeros((n_layers, width)),
      threshold=jnp.full((n_layers, width), threshold), w_dec=w_dec,
      b_dec=jnp.zeros((n_layers, d_out)), w_skip=w_skip,
      meta=meta or DictMeta(kind="clt", site="mlp_in", site_out="mlp_out"))
  return c.astype(dtype)


# ------------------------------------------------ layer by layer (hooks in a running model)


def encode_layer(c: CrossLayerTranscoder, layer: int, x: Array, *,
                 compute_dtype=jnp.float32) -> Array:
  """Layer ``layer``'s latents f (..., width) from its MLP input x (..., d_in)."""
  pre = matmul(x, c.w_enc[layer], compute_dtype) + c.b_enc[layer].astype(jnp.float32)
  return jumprelu(pre, c.threshold[layer])


def writes_of(c: CrossLayerTranscoder, layer: int, f: Array, *,
              compute_dtype=jnp.float32) -> Array:
  """What layer ``layer``'s latents f (..., width) add to every MLP output: (L, ..., d_out),
  zero for the layers before it."""
  dt = jnp.dtype(compute_dtype)
  later = (jnp.arange(c.n_layers) >= layer).astype(dt)
  return jnp.einsum("...w,wjd,j->j...d", f.astype(dt), c.w_dec[layer].astype(dt), later,
                    preferred_element_type=jnp.float32)


def output_of(c: CrossLayerTranscoder, layer: int, writes: Array, x: Array | None = None, *,
              compute_dtype=jnp.float32) -> Array:
  """MLP output of ``layer`` (..., d_out) from the summed writes of layers <= it
  (``sum_i writes_of(c, i, f_i)[layer]``) and, with skips, its MLP input x."""
  y = writes
  if c.b_dec is not None:
    y = y + c.b_dec[layer].astype(jnp.float32)
  if c.w_skip is not None:
    y = y + matmul(x, c.w_skip[layer], compute_dtype)
  return y
