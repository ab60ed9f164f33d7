"""``TrainConfig``: every setting of a training run, its default, and the derived defaults.

A config as written by a user leaves the derived settings at ``None``;
:meth:`TrainConfig.resolve` validates it against the data source and fills them in, once,
so the resolved config is what the step, the logs and the checkpoints all read.

Fields marked ``metadata={"step": False}`` only decide the initialisation or the data
order; every other field decides the compiled training step and is part of its cache key
(:meth:`TrainConfig.step_key`). A new field is in the key unless it is marked otherwise,
so forgetting the mark costs a compilation, never a wrong executable. Of those, the ones
also marked ``"start_only"`` decide nothing but the starting state, which a resumed run
reads from its checkpoint instead.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax.numpy as jnp

from dictlearn.train import objective


def _init_only(default, *, start_only: bool = False):
  """A field that does not change the compiled step (initialisation, data order);
  ``start_only``: one that decides only the starting state."""
  return dataclasses.field(default=default, metadata={"step": False, "start_only": start_only})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that decides a run's result (recorded in checkpoints).

  ``None`` marks a derived default, filled by :meth:`resolve`; ``width``, ``steps``,
  ``batch_size`` and ``learning_rate`` must be given.

  Attributes:
    kind: "sae" (reconstruct x) or "transcoder" (predict targets y from x).
    width: number of latents (required).
    steps: optimiser steps (required).
    batch_size: rows per step (required).
    learning_rate: peak Adam learning rate of the encoder, decoder and biases (required).
      1e-3 suits runs of a few thousand steps (``dictlearn train``'s default); at 3e-4
      such runs on the 270M's residual reconstruct its massive-norm tokens badly or miss
      the target L0 (benchmarks/RESULTS.md).
    seed: initialisation and data order; the run is a function of it.
    target_l0: train towards this mean L0 with the quadratic target penalty
      ``coeff * (L0 / target_l0 - 1)^2``.
    sparsity_coeff: the L0 penalty coefficient; with target_l0, the target penalty's.
      None: d_out / 4 (the reconstruction loss sums d_out coordinates of unit scale, so the
      pull towards more latents grows with d_out; a coefficient growing alike keeps the
      L0 overshoot about the same at every width of the residual stream).
    affine: transcoders only: learn a skip ``x @ w_skip`` (resolved to False for SAEs).
    matryoshka: nested prefix widths, e.g. (256, 1024); resolved to the increasing widths
      ending at ``width``.
    bandwidth: epsilon of the pseudo-derivatives' rectangle kernel, in normalised units.
      None: 0.1 * encoder_scale. Inputs are normalised to E||x||^2 = d_in and encoder
      columns start at norm encoder_scale, so initial pre-activations have RMS
      encoder_scale; the kernel spans a tenth of it. (The paper's 0.001 is for runs of
      100k+ steps: a narrow kernel sees few rows near each threshold, so its gradient
      estimate needs many steps to average.)
    threshold_init: a single initial threshold (normalised units) for every latent. None:
      per-latent thresholds from the data: each latent's threshold starts at the quantile
      of its initial pre-activations (over ``init_samples`` rows) at which it fires at the
      rate ``init_firing_rate``.
    init_firing_rate: with threshold_init None, the fraction of rows each latent fires on
      at step 0. None: ``min(0.5, 10 * target_l0 / width)`` (a mean L0 of 10 * target_l0
      at the start, which the sparsity warm-up brings down; 2 * target_l0 with
      ``encoder_center``, an SAE's default), or 0.05 without a target.
    encoder_scale: w_enc starts as decoder^T (SAE) or unit columns (transcoder) times
      this.
    encoder_center: the encoder reads ``x - c`` during training, ``c`` the geometric
      median of the (normalised) input sample, held fixed and folded into ``b_enc`` at
      the end. Read raw, every firing row's encoder gradient carries the inputs' common
      part (on the 270M's layer-9 residual the mean is 97% of a row's norm), which pulls
      encoders onto that direction. There it leaves a third fewer latents silent and
      reconstructs the rare massive-norm tokens 4-10x better, at about the same FVU on
      the rest (benchmarks/RESULTS.md). None: on for SAEs, off for transcoders (on the
      demo transcoder's normed MLP input it did worse: more silent latents, L0 under the
      target). Its start fires at 2x the target L0, not 10x (``init_firing_rate``): from
      10x the thresholds ended near a row's norm there, and the FVU at 4.
    dec_init: "data": decoder rows start at distinct rows of the init sample (targets less
      b_dec, unit-normed; a transcoder's encoder columns at the matching centred inputs),
      refined by a few k-means-like rounds where the host work is small (see
      :mod:`dictlearn.train.init`), so every latent starts on a direction the data uses;
      latents beyond ``init_samples`` start random. "random": random unit rows (the
      paper's start).
    warmup_steps: learning-rate warm-up. None: 5% of steps, at most 1000.
    decay: "cosine", "linear" (over the last 20%) or "constant"; to
      ``learning_rate * final_lr_fraction``.
    final_lr_fraction: the learning rate at the end, relative to the peak.
    threshold_learning_rate: peak learning rate of the log-thresholds (same schedule).
      None: ``max(learning_rate, 10 / steps)``. A log-threshold moves about its learning
      rate per step, so this lets thresholds move by O(1) (a factor e^10 at most) over a
      run of any length; long runs (100k+ steps at the paper's 3e-4 and more) keep the
      shared learning rate.
    sparsity_warmup_steps: the penalty coefficient ramps up linearly over these steps.
      None: 10% of steps.
    loss_norm_cap: a row whose target norm is above this multiple of the data's RMS norm
      weighs in the reconstruction loss (and in resampling's draw) as a row of that norm
      would: its squared error times (cap * rms / ||y||)^2. A few massive tokens (on the
      270M's layer-9 residual, 0.02% of tokens at 7-10x the median norm) then draw fewer
      latents from the rest (2 there: benchmarks/RESULTS.md). None: every row's squared
      error counts in full.
    grad_clip: global gradient-norm clip (None: off).
    adam_b1: Adam's beta1 (the paper's 0).
    adam_b2: Adam's beta2.
    log_every: history granularity in steps (each entry averages its window). None:
      steps / 50, between 1 and 100.
    dead_window_tokens: a latent silent for this many tokens counts as dead (the logged
      ``dead_fraction``). None: 10M (Anthropic's window), but at most a tenth of the
      run's tokens, so a short run's log can show latents dying.
    resample_every: steps between resamplings of rarely firing latents (0: never). At each,
      every latent that fired on fewer than ``resample_below`` times the mean firing rate
      (``target_l0 / width``, or the observed L0 / width without a target) of the rows
      since the last one is restarted on the direction of a badly reconstructed row of the
      current batch (see :mod:`dictlearn.train.resample`). None: ``steps / 20``, but at
      least the steps in which a latent at the mean rate fires ``10 / resample_below``
      times (so "rare" is measured, not noise).
    resample_until: no resampling after this step. None: half the run (the second half
      lets the restarted latents settle).
    resample_below: the firing rate, relative to the mean, under which a latent is
      resampled.
    normalize: scale inputs and targets to E||x||^2 = d (folded back into the result).
    b_dec_init: "median" (geometric median), "mean" or "zeros".
    skip_init: affine transcoders: the skip starts at "zeros" or "lstsq" (least squares).
    skip_hold_steps: affine transcoders: the skip is held at its start for these steps.
      None: half the run (see :mod:`dictlearn.train.loop`).
    init_samples: rows used to estimate the scales, initial biases and thresholds.
    shuffle_buffer: rows held by the shuffle buffer of a streamed source.
    compute_dtype: matmul operand dtype ("float32", or "bfloat16" for speed on GPUs).
    d_in: input width; filled from the data by resolve.
    d_out: output width (d_in for an SAE); filled from the data by resolve.
  """

  kind: str = "sae"
  width: int | None = None
  steps: int | None = None
  batch_size: int | None = None
  learning_rate: float | None = None
  seed: int = _init_only(0)
  target_l0: float | None = None
  sparsity_coeff: float | None = None
  affine: bool = True
  matryoshka: tuple[int, ...] = ()
  bandwidth: float | None = None
  threshold_init: float | None = _init_only(None, start_only=True)
  init_firing_rate: float | None = _init_only(None, start_only=True)
  encoder_scale: float = _init_only(1.0)
  encoder_center: bool | None = _init_only(None, start_only=True)
  dec_init: str = _init_only("data", start_only=True)
  warmup_steps: int | None = None
  decay: str = "cosine"
  final_lr_fraction: float = 0.0
  threshold_learning_rate: float | None = None
  sparsity_warmup_steps: int | None = None
  loss_norm_cap: float | None = None
  grad_clip: float | None = 1.0
  adam_b1: float = 0.0
  adam_b2: float = 0.999
  log_every: int | None = None
  dead_window_tokens: int | None = None
  resample_every: int | None = None
  resample_until: int | None = None
  resample_below: float = 0.1
  normalize: bool = _init_only(True, start_only=True)
  b_dec_init: str = _init_only("median", start_only=True)
  skip_init: str = _init_only("zeros", start_only=True)
  skip_hold_steps: int | None = None
  init_samples: int = _init_only(16384, start_only=True)
  shuffle_buffer: int = _init_only(65536)
  compute_dtype: str = "float32"
  d_in: int | None = None
  d_out: int | None = None

  # Changing these makes a checkpoint unusable (different shapes or a different model).
  STRUCTURAL: ClassVar[tuple[str, ...]] = ("kind", "width", "d_in", "d_out", "affine",
                                           "matryoshka")

  @classmethod
  def field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))

  def replace(self, **changes) -> "TrainConfig":
    """A copy with ``changes``; an unknown name is a TypeError naming the valid ones."""
    unknown = sorted(set(changes) - set(self.field_names()))
    if unknown:
      raise TypeError(f"unknown training setting(s) {', '.join(map(repr, unknown))}; the "
                      f"settings are {', '.join(self.field_names())}")
    return dataclasses.replace(self, **changes)

  def resolve(self, source=None) -> "TrainConfig":
    """This config validated against ``source`` (anything with ``d_in`` and ``d_out``,
    d_out None for x-only data, such as :func:`dictlearn.activation_data.as_source`'s
    result), with every derived default filled in. Without a source, the config's own
    ``d_in`` and ``d_out`` (None for an SAE) describe the data.

    Resolving a resolved config changes nothing.
    """
    kind = self.kind
    if source is None:
      if self.d_in is None:
        raise ValueError("resolve needs a data source, or d_in (and d_out) in the config")
      source = _Widths(self.d_in, self.d_out if kind == "transcoder" else None)
    if kind not in ("sae", "transcoder"):
      raise ValueError(f"kind must be 'sae' or 'transcoder', not {kind!r}")
    for name in ("width", "steps", "batch_size"):
      v = getattr(self, name)
      if v is None or isinstance(v, bool) or int(v) != v or v <= 0:
        raise ValueError(f"{name} must be a positive integer, not {v!r}")
    if self.learning_rate is None or not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be positive, not {self.learning_rate!r}")
    if self.target_l0 is None and self.sparsity_coeff is None:
      raise ValueError("give target_l0 (train towards an L0) or sparsity_coeff (fixed "
                       "penalty)")
    if self.target_l0 is not None and not self.target_l0 > 0:
      raise ValueError(f"target_l0 must be positive, not {self.target_l0}")
    if kind == "transcoder" and source.d_out is None:
      raise ValueError("a transcoder needs targets (or (x, y) batches)")
    if kind == "sae" and source.d_out is not None:
      raise ValueError("an SAE's batches are x alone; (x, y) pairs are for transcoders")
    if self.decay not in ("cosine", "linear", "constant"):
      raise ValueError(f"decay must be 'cosine', 'linear' or 'constant', not {self.decay!r}")
    if self.b_dec_init not in ("median", "mean", "zeros"):
      raise ValueError(f"b_dec_init must be 'median', 'mean' or 'zeros', not "
                       f"{self.b_dec_init!r}")
    if self.skip_init not in ("zeros", "lstsq"):
      raise ValueError(f"skip_init must be 'lstsq' or 'zeros', not {self.skip_init!r}")
    if self.dec_init not in ("data", "random"):
      raise ValueError(f"dec_init must be 'data' or 'random', not {self.dec_init!r}")
    if self.loss_norm_cap is not None and not self.loss_norm_cap > 0:
      raise ValueError(f"loss_norm_cap must be positive (or None: off), not "
                       f"{self.loss_norm_cap}")
    if self.dead_window_tokens is not None and not (
        int(self.dead_window_tokens) == self.dead_window_tokens > 0):
      raise ValueError(f"dead_window_tokens must be a positive integer (or None: a tenth "
                       f"of the run, at most 10M), not {self.dead_window_tokens!r}")
    if self.threshold_init is not None and not self.threshold_init > 0:
      raise ValueError(f"threshold_init must be positive, not {self.threshold_init}")
    if self.resample_every is not None and (int(self.resample_every) != self.resample_every
                                            or self.resample_every < 0):
      raise ValueError(f"resample_every must be a non-negative integer (0: off), not "
                       f"{self.resample_every!r}")
    if not 0 <= self.resample_below < 1:
      raise ValueError(f"resample_below must lie in [0, 1), not {self.resample_below}")
    if self.init_firing_rate is not None and not 0 < self.init_firing_rate < 1:
      raise ValueError(f"init_firing_rate must lie in (0, 1), not {self.init_firing_rate}")

    width, steps = int(self.width), int(self.steps)
    d_in = int(source.d_in)
    d_out = int(source.d_out if kind == "transcoder" else d_in)
    target = None if self.target_l0 is None else float(self.target_l0)
    lr = float(self.learning_rate)

    def pick(value, default):
      return default if value is None else value

    center = kind == "sae" if self.encoder_center is None else bool(self.encoder_center)
    rate = self.init_firing_rate
    if rate is None:
      start = 2.0 if center else 10.0
      rate = min(0.5, start * target / width) if target is not None else 0.05
    every = self.resample_every
    if every is None:
      # The mean firing rate: the target's, or (no target) the start's.
      mean_rate = target / width if target is not None else rate
      fires_per_step = mean_rate * int(self.batch_size)
      below = max(float(self.resample_below), 1e-3)
      every = max(steps // 20, math.ceil(10.0 / below / max(fires_per_step, 1e-12)))
    return dataclasses.replace(
        self, width=width, steps=steps, batch_size=int(self.batch_size), learning_rate=lr,
        seed=int(self.seed), target_l0=target, d_in=d_in, d_out=d_out,
        sparsity_coeff=float(pick(self.sparsity_coeff, d_out / 4.0)),
        affine=bool(self.affine and kind == "transcoder"),
        matryoshka=objective.prefix_bounds(width, self.matryoshka),
        bandwidth=float(pick(self.bandwidth, 0.1 * self.encoder_scale)),
        threshold_init=None if self.threshold_init is None else float(self.threshold_init),
        init_firing_rate=float(rate), encoder_scale=float(self.encoder_scale),
        encoder_center=center,
        warmup_steps=int(pick(self.warmup_steps, min(1000, steps // 20))),
        final_lr_fraction=float(self.final_lr_fraction),
        threshold_learning_rate=float(pick(self.threshold_learning_rate,
                                           max(lr, 10.0 / steps))),
        sparsity_warmup_steps=int(pick(self.sparsity_warmup_steps, steps // 10)),
        loss_norm_cap=None if self.loss_norm_cap is None else float(self.loss_norm_cap),
        grad_clip=None if self.grad_clip is None else float(self.grad_clip),
        adam_b1=float(self.adam_b1), adam_b2=float(self.adam_b2),
        log_every=int(self.log_every or max(1, min(100, steps // 50))),
        dead_window_tokens=int(pick(self.dead_window_tokens, min(
            10_000_000, max(1, steps * int(self.batch_size) // 10)))),
        resample_every=int(every),
        resample_until=int(pick(self.resample_until, steps // 2)),
        resample_below=float(self.resample_below), normalize=bool(self.normalize),
        skip_hold_steps=int(pick(self.skip_hold_steps, steps // 2)),
        init_samples=int(self.init_samples), shuffle_buffer=int(self.shuffle_buffer),
        compute_dtype=jnp.dtype(self.compute_dtype).name)

  def step_key(self) -> "TrainConfig":
    """This config with the fields marked ``step: False`` at their defaults: runs that
    differ only in those share a compiled step (use it as the cache key)."""
    return dataclasses.replace(self, **{
        f.name: f.default for f in dataclasses.fields(self)
        if not f.metadata.get("step", True)})

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["matryoshka"] = list(d["matryoshka"])
    return d


@dataclasses.dataclass(frozen=True)
class _Widths:
  d_in: int
  d_out: int | None


def check_resume(cfg: TrainConfig, saved: dict, folder) -> tuple[list[str], list[str]]:
  """Raises if ``saved`` (a checkpoint's config) has another shape; returns the names of
  the other settings that changed: those that change the rest of the run, and those that
  decide only the start (which the resumed run takes from the checkpoint)."""
  now = cfg.to_json()
  bad = [k for k in TrainConfig.STRUCTURAL if saved.get(k) != now[k]]
  if bad:
    raise ValueError(
        f"{folder} was trained with a different {', '.join(bad)} "
        f"({', '.join(f'{k}={saved.get(k)!r}' for k in bad)}); use a fresh checkpoint_dir")
  changed = [k for k in now if k not in TrainConfig.STRUCTURAL and saved.get(k) != now[k]]
  start = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("start_only")}
  return [k for k in changed if k not in start], [k for k in changed if k in start]


