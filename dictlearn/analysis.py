"""The tutorial's statistics from arrays and a mask: top latents, one latent's
activations, and reconstruction (FVU, L0, MSE, clean/spliced/delta loss).

The mask says which positions count (``interventions.active_positions``: no BOS, no
padding). Shapes: x (..., seq, d_in); target (..., seq, d_out); tokens (..., seq);
logits (..., seq, vocab); mask (..., seq) bool. Latents come from the fused
``encode_sparse``/``encode_decode`` path, so no (tokens x width) matrix is built.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn import metrics
from dictlearn.dictionary import Dictionary, check_input, jumprelu, matmul
from dictlearn.sparse import encode_decode, encode_sparse

Array = jax.Array


def _mask(mask, shape) -> Array:
  if mask is None:
    return jnp.ones(shape, bool)
  mask = jnp.asarray(mask, bool)
  if mask.shape != tuple(shape):
    raise ValueError(f"mask has shape {mask.shape}; expected {tuple(shape)} (the "
                     "activations' positions)")
  return mask


@dataclasses.dataclass(frozen=True)
class TopLatents:
  """Strongest latents per position and over each sequence.

  Attributes:
    values, indices: (batch, seq, k) per position, strongest first (every position;
      ``mask`` says which count). Slots past a position's active latents hold 0.
    prompt_values, prompt_indices: (batch, k) over each sequence's kept positions,
      pooled with ``reduce`` ("max" or "mean" activation).
    mask: (batch, seq) bool, the kept positions.
    reduce: how positions were pooled for the sequence ranking.
  """

  values: np.ndarray
  indices: np.ndarray
  prompt_values: np.ndarray
  prompt_indices: np.ndarray
  mask: np.ndarray
  reduce: str

  def table(self, batch_index: int = 0) -> str:
    """The sequence-level ranking as text: ``value | latent`` lines."""
    n = int(self.mask[batch_index].sum())
    rows = [f"{'value':>10} | latent ({self.reduce} over {n} tokens)"]
    rows += [f"{v:>10.3f} | {i}" for v, i in
             zip(self.prompt_values[batch_index], self.prompt_indices[batch_index])]
    return "\n".join(rows)

  def __str__(self):
    return self.table(0)


def top_latents(d: Dictionary, x: Array, k: int = 10, mask=None, *, reduce: str = "max",
                slots: int = 256) -> TopLatents:
  """The ``k`` strongest latents per position and over each sequence.

  Args:
    d: the dictionary; x (batch, seq, d_in) or (seq, d_in) at the site it reads.
    k: how many latents.
    mask: (batch, seq) bool of the positions that count in the sequence ranking.
    reduce: "max" or "mean" activation over the kept positions.
    slots: code slots per position of the sparse encoder (exact beyond it, slower).
  """
  if reduce not in ("max", "mean"):
    raise ValueError(f"reduce must be 'max' or 'mean', not {reduce!r}")
  x = jnp.asarray(x)
  if x.ndim == 2:
    x = x[None]
    mask = None if mask is None else jnp.asarray(mask)[None]
  if x.ndim != 3:
    raise ValueError(f"x must be (batch, seq, d_in) or (seq, d_in), got {tuple(x.shape)}")
  keep = _mask(mask, x.shape[:2])
  codes = encode_sparse(d, x, k=max(int(slots), int(k)))
  k = min(int(k), d.width)
  filled = jnp.arange(codes.k) < jnp.minimum(codes.count, codes.k)[..., None]
  order = jnp.argsort(jnp.where(filled, -codes.values, jnp.inf), axis=-1, stable=True)[..., :k]
  filled = jnp.take_along_axis(filled, order, axis=-1)
  values = jnp.where(filled, jnp.take_along_axis(codes.values, order, axis=-1), 0.0)
  indices = jnp.where(filled, jnp.take_along_axis(codes.indices, order, axis=-1), 0)
  # Pool per sequence by scattering the codes into (batch, width): never (tokens, width).
  b = x.shape[0]
  rows = jnp.broadcast_to(jnp.arange(b)[:, None, None], codes.values.shape)
  v = jnp.where(keep[..., None], codes.values, 0.0)
  if reduce == "max":
    pooled = jnp.zeros((b, d.width), jnp.float32).at[rows, codes.indices].max(v)
  else:
    total = jnp.zeros((b, d.width), jnp.float32).at[rows, codes.indices].add(v)
    pooled = total / jnp.maximum(keep.sum(axis=1, dtype=jnp.float32), 1.0)[:, None]
  p_values, p_indices = jax.lax.top_k(pooled, k)
  return TopLatents(np.asarray(values), np.asarray(indices), np.asarray(p_values),
                    np.asarray(p_indices), np.asarray(keep), reduce)


def latent_activations(d: Dictionary, x: Array, latent: int) -> np.ndarray:
  """One latent's activation at every position: x (..., d_in) -> (...)."""
  x = jnp.asarray(x)
  check_input(d, x, bf16_ok=True)
  if not 0 <= int(latent) < d.width:
    raise ValueError(f"latent {latent} is out of range: this dictionary has {d.width} "
                     f"(0-{d.width - 1})")
  i = int(latent)
  pre = matmul(x, d.w_enc[:, i:i + 1]) + d.b_enc[i:i + 1].astype(jnp.float32)
  return np.asarray(jumprelu(pre, d.threshold[i:i + 1])[..., 0])


@dataclasses.dataclass(frozen=True)
class Reconstruction:
  """How well a dictionary does at its site, over the kept positions.

  Attributes:
    fvu: fraction of variance unexplained of ``target``; l0: mean active latents per
      position; mse: mean squared error per feature; n_tokens: kept positions.
    clean_loss, spliced_loss, delta_loss: mean next-token loss without / with the
      dictionary spliced in, and their difference, over kept target tokens (None when
      no logits were given).
    clean_per_token, spliced_per_token: (..., seq - 1) losses, entry t predicting token
      t + 1 (None without logits); loss_mask: (..., seq - 1) the kept targets.
    site_in, site_out: where it read and wrote ("" if unknown).
  """

  fvu: float
  l0: float
  mse: float
  n_tokens: int
  clean_loss: float | None = None
  spliced_loss: float | None = None
  delta_loss: float | None = None
  clean_per_token: np.ndarray | None = None
  spliced_per_token: np.ndarray | None = None
  loss_mask: np.ndarray | None = None
  site_in: str = ""
  site_out: str = ""

  def __str__(self):
    where = self.site_in if self.site_in == self.site_out else f"{self.site_in} -> {self.site_out}"
    text = f"{where}: FVU {self.fvu:.2%}  L0 {self.l0:.1f}"
    if self.delta_loss is not None:
      text += (f"  delta loss {self.delta_loss:+.4f} (clean {self.clean_loss:.4f}, "
               f"spliced {self.spliced_loss:.4f}")
      return text + f"; {self.n_tokens} tokens)"
    return text + f" ({self.n_tokens} tokens)"


def reconstruction(d: Dictionary, x_in: Array, target: Array | None = None, mask=None, *,
                   tokens: Array | None = None, clean_logits: Array | None = None,
                   spliced_logits: Array | None = None, site_in: str = "",
                   site_out: str = "", k: int = 256) -> Reconstruction:
  """FVU, L0 and MSE of ``d`` on ``x_in`` against ``target`` (default x_in), over ``mask``;
  with ``tokens`` and both logits, also the clean, spliced and delta next-token loss.

  Loss counts a prediction when its target token is kept by ``mask`` (so BOS and padding
  are never targets).
  """
  x_in = jnp.asarray(x_in)
  target = x_in if target is None else jnp.asarray(target)
  keep = _mask(mask, x_in.shape[:-1])
  y, codes = encode_decode(d, x_in, k=k)
  m = keep.astype(jnp.float32)
  l0 = jnp.sum(codes.count * m) / jnp.maximum(m.sum(), 1.0)
  out = dict(fvu=float(metrics.fvu(target, y, keep)), l0=float(l0),
             mse=float(metrics.mse(target, y, keep)), n_tokens=int(keep.sum()),
             site_in=str(site_in), site_out=str(site_out))
  given = [a is not None for a in (tokens, clean_logits, spliced_logits)]
  if any(given) and not all(given):
    raise ValueError("losses need tokens, clean_logits and spliced_logits together")
  if all(given):
    clean = metrics.cross_entropy(clean_logits, tokens)
    spliced = metrics.cross_entropy(spliced_logits, tokens)
    lm = keep[..., 1:].astype(jnp.float32)
    mean = lambda ce: float(jnp.sum(ce * lm) / jnp.maximum(lm.sum(), 1.0))  # noqa: E731
    out.update(clean_loss=mean(clean), spliced_loss=mean(spliced),
               delta_loss=mean(spliced - clean), clean_per_token=np.asarray(clean),
               spliced_per_token=np.asarray(spliced), loss_mask=np.asarray(keep[..., 1:]))
  return Reconstruction(**out)
