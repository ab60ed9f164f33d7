"""Corpus-level evals of dictionaries: streamed sums, SAEBench core's metric layout.

An adapter runs the model per batch (one clean run, one zero-ablation run per write site,
one spliced run per dictionary) and hands the arrays it captured to the accumulators
here; ``CorpusEval.results()`` gives per-dictionary metrics in SAEBench core's
``eval_result_metrics`` layout. Only sums are kept (float64 on the host, per-feature
means and centred sums of squares merged exactly between batches), so memory is bounded
whatever the corpus size; per-latent fire counts come from ``SparseCodes`` (never a
(tokens x width) matrix).

Which positions count (``interventions.active_positions``: 0 is BOS, negative is padding):

- **patched**: a dictionary replaces its write site at every position but BOS and
  padding; zero-ablation sets the write site to 0 at those positions.
- **tokens** (``token_mask``): positions neither BOS nor padding. L0, L1, FVU, MSE,
  cosine, shrinkage and densities average over them.
- **predictions** (``prediction_mask``, shape (..., seq - 1)): the prediction made at
  position t of token t + 1 counts when t is a kept token (not BOS, not padding) and t + 1
  exists and is not padding. CE losses and KL average over them. (The prediction made at
  BOS is left out: it is the same with and without a patch.)

Definitions (p the next-token distribution, y the dictionary's output, x its target: the
clean value at its write site; means over kept tokens unless said):

- ``ce_loss_without_sae / with_sae / with_ablation``: mean -log p(next token) over
  predictions, clean / spliced / zero-ablated.
- ``ce_loss_score = (CE_ablation - CE_sae) / (CE_ablation - CE_clean)``;
  ``delta_loss = CE_sae - CE_clean``.
- ``kl_div_with_sae / with_ablation``: mean KL(p_clean || p_patched) over predictions;
  ``kl_div_score = (KL_ablation - KL_sae) / KL_ablation``.
- ``fvu = sum ||x - y||^2 / sum ||x - mean(x)||^2`` (the mean over all kept tokens, per
  feature, as ``metrics.fvu``); ``explained_variance = 1 - fvu``; ``mse`` the mean over
  tokens and features of (x - y)^2; ``cossim`` the mean of cos(x, y).
- ``l2_norm_in/out`` mean ||x|| and ||y||; ``l2_ratio`` mean ||y|| / ||x||;
  ``relative_reconstruction_bias = mean ||y||^2 / mean <x, y>`` (SAEBench's; 1 is
  unbiased, below 1 is shrinkage).
- ``l0`` mean active latents per token (exact: ``SparseCodes.count``); ``l1`` mean sum of
  |activations|.
- density of a latent: the fraction of kept tokens it fires on. ``dead_fraction``:
  latents that never fired; ``dense_fraction``: latents firing on more than
  ``dense_threshold`` (default 10%) of tokens; ``freq_over_1_percent`` /
  ``freq_over_10_percent`` as SAEBench. The histogram bins ``log10(density + 1e-10)``
  (dead latents land in the first bin, at -10).

A score is None when its denominator is 0 (e.g. an ablation that changes nothing).
Tokens whose codes overflowed their k slots (more active latents than slots) count in
L0 exactly but only their k largest latents reach the fire counts and L1;
``overflow_fraction`` says how many there were.

Shapes: logits (batch, seq, vocab); tokens, positions (batch, seq) int; target, y
(batch, seq, d); codes a ``SparseCodes`` with leading shape (batch, seq).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Hashable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn.interventions import active_positions
from dictlearn.sparse import SparseCodes

Array = jax.Array

DENSE_THRESHOLD = 0.1
HISTOGRAM_EDGES = np.linspace(-10.0, 0.0, 41)  # log10(density + 1e-10), 0.25 wide bins
_DENSITY_EPS = 1e-10


def token_mask(positions) -> Array:
  """(..., seq) bool: positions that are neither BOS nor padding."""
  return active_positions(positions, skip_bos=True)


def prediction_mask(positions) -> Array:
  """(..., seq - 1) bool: entry t counts the prediction of token t + 1 made at t.

  True when position t is a kept token (not BOS, not padding) and t + 1 is not padding.
  """
  positions = jnp.asarray(positions)
  return (positions[..., :-1] > 0) & (positions[..., 1:] >= 0)


def _check(name: str, a, shape: tuple, what: str):
  if tuple(a.shape) != tuple(shape):
    raise ValueError(f"{name} has shape {tuple(a.shape)}; expected {tuple(shape)} ({what})")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CleanLogits:
  """A batch's clean next-token distributions, computed once (``clean_predictions``), shared
  by every patched run of that batch. Shapes: logits (..., seq - 1, vocab) float32 (the
  predictions, the last position dropped) and their probabilities; lse, ce, keep
  (..., seq - 1); next_tokens (..., seq - 1, 1) int32."""

  logits: Array
  probs: Array
  lse: Array
  ce: Array
  keep: Array
  next_tokens: Array


@jax.jit
def clean_predictions(logits, tokens, positions) -> CleanLogits:
  """The ``CleanLogits`` of a batch: logits (..., seq, vocab), tokens and positions
  (..., seq)."""
  z = logits[..., :-1, :].astype(jnp.float32)
  lse = jax.nn.logsumexp(z, axis=-1)
  nxt = tokens[..., 1:, None].astype(jnp.int32)
  ce = lse - jnp.take_along_axis(z, nxt, axis=-1)[..., 0]
  return CleanLogits(logits=z, probs=jnp.exp(z - lse[..., None]), lse=lse, ce=ce,
                     keep=prediction_mask(positions), next_tokens=nxt)


@jax.jit
def _loss_batch(clean: CleanLogits, patched_logits):
  # KL(p || q) = sum p (z_p - z_q) + lse_q - lse_p (sum p = 1): one pass over the patched
  # logits besides its logsumexp, exactly 0 where they equal the clean ones.
  zq = patched_logits[..., :-1, :].astype(jnp.float32)
  lse = jax.nn.logsumexp(zq, axis=-1)
  ce = lse - jnp.take_along_axis(zq, clean.next_tokens, axis=-1)[..., 0]
  kl = jnp.sum(clean.probs * (clean.logits - zq), axis=-1) + lse - clean.lse
  total = lambda v: jnp.sum(jnp.where(clean.keep, v, 0.0))  # noqa: E731 (where: pads may be NaN)
  return total(clean.ce), total(ce), total(kl), jnp.sum(clean.keep)


class LossSums:
  """Streamed CE (clean and patched) and KL(clean || patched) over kept predictions."""

  def __init__(self):
    self.ce_clean = 0.0
    self.ce_patched = 0.0
    self.kl = 0.0
    self.n = 0

  def add(self, clean_logits, patched_logits, tokens, positions) -> None:
    """Adds one batch: logits (batch, seq, vocab) (the clean ones may be the batch's
    ``CleanLogits``, to share them between runs), tokens and positions (batch, seq)."""
    tokens = jnp.asarray(tokens)
    _check("positions", jnp.asarray(positions), tokens.shape, "the tokens' shape")
    _check("patched_logits", patched_logits, (*tokens.shape, patched_logits.shape[-1]),
           "tokens.shape + (vocab,)")
    if not isinstance(clean_logits, CleanLogits):
      _check("clean_logits", clean_logits, patched_logits.shape, "patched_logits' shape")
      clean_logits = clean_predictions(clean_logits, tokens, positions)
    _check("clean_logits", clean_logits.logits,
           (*tokens.shape[:-1], tokens.shape[-1] - 1, patched_logits.shape[-1]),
           "the clean logits of these tokens")
    c, p, kl, n = jax.device_get(_loss_batch(clean_logits, patched_logits))
    self.ce_clean += float(c)
    self.ce_patched += float(p)
    self.kl += float(kl)
    self.n += int(n)

  def means(self) -> tuple[float, float, float]:
    """(mean clean CE, mean patched CE, mean KL); NaN before any prediction counted."""
    if self.n == 0:
      return (float("nan"),) * 3
    return self.ce_clean / self.n, self.ce_patched / self.n, self.kl / self.n


@functools.partial(jax.jit, static_argnames=("width",))
def _reconstruction_batch(target, y, codes: SparseCodes, mask, width: int):
  d = target.shape[-1]
  x = target.reshape(-1, d).astype(jnp.float32)
  y = y.reshape(-1, d).astype(jnp.float32)
  m = mask.reshape(-1)
  n = jnp.sum(m)
  where = lambda v: jnp.where(m, v, 0.0)  # noqa: E731
  mean = jnp.sum(jnp.where(m[:, None], x, 0.0), axis=0) / jnp.maximum(n, 1)
  m2 = jnp.sum(jnp.where(m[:, None], jnp.square(x - mean), 0.0), axis=0)
  sq_err = jnp.sum(where(jnp.sum(jnp.square(x - y), axis=-1)))
  nx, ny = jnp.linalg.norm(x, axis=-1), jnp.linalg.norm(y, axis=-1)
  dot = jnp.sum(x * y, axis=-1)
  tiny = jnp.finfo(jnp.float32).tiny
  cos = dot / jnp.maximum(nx * ny, tiny)
  ratio = ny / jnp.maximum(nx, tiny)
  k = codes.values.shape[-1]
  values = codes.values.reshape(-1, k)
  indices = codes.indices.reshape(-1, k)
  count = codes.count.reshape(-1)
  filled = (jnp.arange(k) < jnp.minimum(count, k)[:, None]) & m[:, None]
  fires = jnp.zeros((width,), jnp.int32).at[indices].add(filled.astype(jnp.int32))
  return dict(
      n=n, mean=mean, m2=m2, sq_err=sq_err, cos=jnp.sum(where(cos)),
      ratio=jnp.sum(where(ratio)), norm_in=jnp.sum(where(nx)), norm_out=jnp.sum(where(ny)),
      y_sq=jnp.sum(where(ny * ny)), dot=jnp.sum(where(dot)),
      l0=jnp.sum(jnp.where(m, count, 0)),
      l1=jnp.sum(jnp.where(filled, jnp.abs(values), 0.0)),
      overflow=jnp.sum(m & codes.overflow.reshape(-1)), fires=fires)


class ReconstructionSums:
  """Streamed reconstruction, shrinkage and sparsity sums of one dictionary.

  ``fires`` (width,) int64: how many kept tokens each latent fired on.
  """

  _SCALARS = ("sq_err", "cos", "ratio", "norm_in", "norm_out", "y_sq", "dot", "l0", "l1")

  def __init__(self, width: int):
    if int(width) < 1:
      raise ValueError(f"width must be a positive int, got {width!r}")
    self.width = int(width)
    self.n = 0
    self.overflow = 0
    self.sums = {k: 0.0 for k in self._SCALARS}
    self.mean: np.ndarray | None = None   # (d,) float64 over kept tokens
    self.m2: np.ndarray | None = None     # (d,) float64, sum of squared deviations
    self.fires = np.zeros(self.width, np.int64)

  def add(self, target, y, codes: SparseCodes, mask) -> None:
    """Adds one batch: target, y (..., d); codes with leading shape (...); mask (...) bool."""
    lead = tuple(target.shape[:-1])
    _check("y", y, target.shape, "the target's shape")
    _check("mask", jnp.asarray(mask), lead, "the target's positions")
    _check("codes.count", codes.count, lead, "the target's positions")
    if self.mean is not None and target.shape[-1] != self.mean.shape[0]:
      raise ValueError(f"target has {target.shape[-1]} features; earlier batches had "
                       f"{self.mean.shape[0]}")
    b = jax.device_get(_reconstruction_batch(target, y, codes, jnp.asarray(mask, bool),
                                             self.width))
    nb = int(b["n"])
    if nb == 0:
      return
    mean_b, m2_b = np.asarray(b["mean"], np.float64), np.asarray(b["m2"], np.float64)
    if self.mean is None:
      self.mean, self.m2 = mean_b, m2_b
    else:  # Chan et al.'s pairwise merge: exact, no cancellation from raw moments.
      delta = mean_b - self.mean
      total = self.n + nb
      self.mean = self.mean + delta * (nb / total)
      self.m2 = self.m2 + m2_b + delta * delta * (self.n * nb / total)
    self.n += nb
    self.overflow += int(b["overflow"])
    for k in self._SCALARS:
      self.sums[k] += float(b[k])
    self.fires += np.asarray(b["fires"], np.int64)

  def densities(self) -> np.ndarray:
    """(width,) float64: the fraction of kept tokens each latent fired on."""
    return self.fires / max(self.n, 1)


def _ratio(num: float, den: float):
  return None if den == 0 or not np.isfinite(den) else float(num / den)


def eval_result_metrics(recon: ReconstructionSums, spliced: LossSums, ablated: LossSums, *,
                        dense_threshold: float = DENSE_THRESHOLD) -> dict:
  """One dictionary's metrics (SAEBench core's ``eval_result_metrics`` groups, plus
  ``misc_metrics`` and ``latent_density_histogram``) from its streamed sums.

  Raises:
    ValueError: when the spliced and ablated sums did not see the same predictions.
  """
  if spliced.n != ablated.n or spliced.ce_clean != ablated.ce_clean:
    raise ValueError(f"the spliced run counted {spliced.n} predictions and the ablation "
                     f"{ablated.n} (or their clean losses differ): add every batch to both")
  ce_clean, ce_sae, kl_sae = spliced.means()
  _, ce_abl, kl_abl = ablated.means()
  n = max(recon.n, 1)
  s = recon.sums
  total_var = float(np.sum(recon.m2)) if recon.m2 is not None else 0.0
  fvu = _ratio(s["sq_err"], total_var)
  d = 1 if recon.mean is None else recon.mean.shape[0]
  dens = recon.densities()
  hist, _ = np.histogram(np.clip(np.log10(dens + _DENSITY_EPS), HISTOGRAM_EDGES[0],
                                  HISTOGRAM_EDGES[-1]), bins=HISTOGRAM_EDGES)
  return {
      "model_behavior_preservation": {
          "kl_div_score": _ratio(kl_abl - kl_sae, kl_abl),
          "kl_div_with_ablation": kl_abl,
          "kl_div_with_sae": kl_sae,
      },
      "model_performance_preservation": {
          "ce_loss_score": _ratio(ce_abl - ce_sae, ce_abl - ce_clean),
          "ce_loss_with_ablation": ce_abl,
          "ce_loss_with_sae": ce_sae,
          "ce_loss_without_sae": ce_clean,
      },
      "reconstruction_quality": {
          "explained_variance": None if fvu is None else 1.0 - fvu,
          "mse": s["sq_err"] / (n * d),
          "cossim": s["cos"] / n,
      },
      "shrinkage": {
          "l2_norm_in": s["norm_in"] / n,
          "l2_norm_out": s["norm_out"] / n,
          "l2_ratio": s["ratio"] / n,
          "relative_reconstruction_bias": _ratio(s["y_sq"], s["dot"]),
      },
      "sparsity": {"l0": s["l0"] / n, "l1": s["l1"] / n},
      "token_stats": {
          "total_tokens_eval_reconstruction": recon.n,
          "total_predictions_eval_loss": spliced.n,
      },
      "misc_metrics": {
          "fvu": fvu,
          "delta_loss": ce_sae - ce_clean,
          "dead_fraction": float(np.mean(recon.fires == 0)),
          "dense_fraction": float(np.mean(dens > dense_threshold)),
          "dense_threshold": float(dense_threshold),
          "freq_over_1_percent": float(np.mean(dens > 0.01)),
          "freq_over_10_percent": float(np.mean(dens > 0.1)),
          "overflow_fraction": recon.overflow / n,
          "width": recon.width,
      },
      "latent_density_histogram": {
          "log10_density_edges": [float(e) for e in HISTOGRAM_EDGES],
          "counts": [int(c) for c in hist],
      },
  }


class CorpusEval:
  """Streams batches for several dictionaries at once.

  Args:
    widths: ``{name: width}`` of each dictionary.
    write_sites: ``{name: key}``, any hashable naming the site each writes (e.g.
      "mlp_out.9"); dictionaries sharing a key share one zero-ablation.
    dense_threshold: the density above which a latent counts as dense.

  Per batch: ``add_ablation(key, ...)`` once per write site, ``add_dictionary(name, ...)``
  once per dictionary; then ``results()``.
  """

  def __init__(self, widths: Mapping[str, int], write_sites: Mapping[str, Hashable], *,
               dense_threshold: float = DENSE_THRESHOLD):
    if set(widths) != set(write_sites):
      raise ValueError("widths and write_sites must name the same dictionaries")
    self.write_sites = dict(write_sites)
    self.dense_threshold = float(dense_threshold)
    self.recon = {name: ReconstructionSums(w) for name, w in widths.items()}
    self.spliced = {name: LossSums() for name in widths}
    self.ablated = {key: LossSums() for key in set(self.write_sites.values())}

  def add_ablation(self, key: Hashable, clean_logits, ablated_logits, tokens, positions):
    """One batch of the zero-ablation run at write site ``key``."""
    if key not in self.ablated:
      raise KeyError(f"no dictionary writes {key!r}; the write sites are "
                     f"{sorted(map(str, self.ablated))}")
    self.ablated[key].add(clean_logits, ablated_logits, tokens, positions)

  def add_dictionary(self, name: str, clean_logits, spliced_logits, tokens, positions,
                     target, y, codes: SparseCodes):
    """One batch of dictionary ``name``: its spliced run's logits, and its output ``y``
    and codes against ``target`` (the clean value at its write site)."""
    if name not in self.recon:
      raise KeyError(f"unknown dictionary {name!r}; known: {sorted(self.recon)}")
    self.spliced[name].add(clean_logits, spliced_logits, tokens, positions)
    self.recon[name].add(target, y, codes, token_mask(positions))

  def densities(self, name: str) -> np.ndarray:
    """(width,) fraction of kept tokens on which each latent of ``name`` fired."""
    return self.recon[name].densities()

  def results(self) -> dict[str, dict]:
    """``{name: eval_result_metrics(...)}``."""
    return {name: eval_result_metrics(self.recon[name], self.spliced[name],
                                      self.ablated[self.write_sites[name]],
                                      dense_threshold=self.dense_threshold)
            for name in self.recon}
