"""``fit``: train a JumpReLU SAE or transcoder on a stream of activations.

The recipe (details in :mod:`.objective`, :mod:`.optim`, :mod:`.ste`):

* JumpReLU with log-thresholds; straight-through pseudo-derivatives with a rectangle
  kernel of bandwidth ``bandwidth`` for the JumpReLU and for the Heaviside of the L0
  penalty (Rajamanoharan et al. 2024).
* Sparsity: ``sparsity_coeff * L0``, or with ``target_l0`` the quadratic target penalty
  ``coeff * (L0 / target_l0 - 1)^2`` (coefficient default d_out / 4). The coefficient warms up
  linearly over ``sparsity_warmup_steps``.
* Inputs (and transcoder targets) scaled so ``E||x||^2 = d``, estimated from
  ``init_samples`` rows; the scales are folded into the returned weights.
* Decoder rows held at unit norm (radial gradient removed, rows renormalised each step).
* Adam (beta1 = 0 by default, as in the paper; short runs do better with 0.9) after
  global-norm clipping, learning rate with linear warm-up then cosine (or linear) decay.
  Clipping matters beyond stability: while L0 is far above the target the penalty's
  threshold gradients dominate the global norm, which slows the encoder and decoder until
  the sparsity is roughly right (without it the synthetic benchmark learns a dense code
  and recovers nothing).
* Thresholds start at ``threshold_init`` and the kernel bandwidth is ``bandwidth``, both
  in normalised units; the defaults (0.001) are the paper's, for runs of 100k+ steps. A
  log-threshold moves about ``learning_rate`` per step, so a short run needs a larger
  start (the tests use 0.5 and bandwidth 0.05 with learning rate 0.01).
* Init: random unit decoder rows, encoder = decoder^T (SAE) or independent random unit
  columns (transcoder), ``b_dec`` = geometric median of the (skip-corrected) targets,
  thresholds at ``threshold_init``.
* Affine skip (transcoders): starts at zero and is held there for the first half of the
  run. The skip is dense and learns much faster than sparse latents; trained from step 0
  (or started at the least-squares fit) it absorbs the linear shadow of the features
  first, and the latents are left with an entangled residual that they never untangle (on
  the synthetic benchmark: FVU 0.23 and no feature recovered, against FVU 0.04 and 94-96%
  recovered with a half-run hold; a quarter-run hold gives 89%). Once the latents explain
  the sparse part, the skip learns what is left: the genuinely linear part.
* Matryoshka: nested prefix widths, reconstruction losses summed over the prefixes.
* Dead latents: a latent is dead once it has not fired in ``dead_window_tokens`` tokens.

State is a plain dict pytree ``{"params", "opt", "step", "since_fired", "acc"}``; data order
is a pure function of (seed, step) (random-access data) or a replayable stream, so a run
resumed from a checkpoint matches an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dictlearn.activation_data import (
    ArraySource, ShardFolder, as_source, prefetch, random_access_batches)
from dictlearn.dictionary import DictMeta
from dictlearn.train import checkpoint as ckpt
from dictlearn.train import objective, optim

_METRICS = ("loss", "mse", "l0", "fvu", "penalty")
HISTORY_KEYS = ("step", "loss", "mse", "l0", "fvu", "dead_fraction", "penalty",
                "learning_rate", "sparsity_coeff")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that decides a run's result (recorded in checkpoints)."""

  kind: str
  width: int
  d_in: int
  d_out: int
  steps: int
  batch_size: int
  learning_rate: float
  seed: int
  target_l0: float | None
  sparsity_coeff: float
  affine: bool
  matryoshka: tuple[int, ...]
  bandwidth: float
  threshold_init: float
  encoder_scale: float
  warmup_steps: int
  decay: str
  final_lr_fraction: float
  sparsity_warmup_steps: int
  grad_clip: float | None
  adam_b1: float
  adam_b2: float
  log_every: int
  dead_window_tokens: int
  normalize: bool
  b_dec_init: str
  skip_init: str
  skip_hold_steps: int
  init_samples: int
  shuffle_buffer: int
  compute_dtype: str

  # Changing these makes a checkpoint unusable (different shapes or a different model).
  STRUCTURAL = ("kind", "width", "d_in", "d_out", "affine", "matryoshka")


def fit(data, *, kind: str = "sae", width: int, target_l0: float | None = None,
        sparsity_coeff: float | None = None, steps: int, batch_size: int,
        learning_rate: float, seed: int = 0, targets=None, affine: bool = True,
        mesh: jax.sharding.Mesh | None = None, checkpoint_dir=None,
        checkpoint_every: int = 5000, progress: bool = True, matryoshka=None,
        meta: DictMeta | None = None, bandwidth: float = 0.001,
        threshold_init: float = 0.001, encoder_scale: float = 1.0,
        warmup_steps: int | None = None, decay: str = "cosine",
        final_lr_fraction: float = 0.0, sparsity_warmup_steps: int | None = None,
        grad_clip: float | None = 1.0, adam_b1: float = 0.0, adam_b2: float = 0.999,
        log_every: int | None = None, dead_window_tokens: int = 10_000_000,
        normalize: bool = True, b_dec_init: str = "median", skip_init: str = "zeros",
        skip_hold_steps: int | None = None,
        init_samples: int = 16384, shuffle_buffer: int = 65536, data_axis: str = "data",
        width_axis: str | None = None, keep_checkpoints: int = 2,
        compute_dtype=jnp.float32):
  """Trains a JumpReLU dictionary; returns ``(dictionary, history)``.

  Args:
    data: inputs x: an array or np.memmap (N, d_in); a shard folder path (see
      :mod:`dictlearn.activation_data`); an iterator of batches ``x`` / ``(x, y)`` (rows,
      d); or a zero-argument callable returning such an iterator (replayable: exact resume
      and several epochs).
    kind: "sae" (reconstruct x) or "transcoder" (predict targets y from x).
    width: number of latents.
    target_l0: train towards this mean L0 with the quadratic target penalty.
    sparsity_coeff: the L0 penalty coefficient; with target_l0, the target penalty's
      (default d_out / 4).
    steps, batch_size, learning_rate, seed: as named; the run is a function of them.
    targets: transcoder outputs y (N, d_out) paired row by row with data (array, memmap or
      shard folder).
    affine: transcoders only: learn a skip ``x @ w_skip``, started at ``skip_init``
      ("zeros" or "lstsq") and held there for the first ``skip_hold_steps`` steps
      (default: half the run), see the module docstring.
    mesh: a device mesh for data-parallel training: the batch is split along
      ``data_axis``; the dictionary is replicated, or split along its width over
      ``width_axis`` when given. batch_size must divide by the data axis size.
    checkpoint_dir: write checkpoints there every ``checkpoint_every`` steps and at the end
      (keeping ``keep_checkpoints``), and resume from the newest one found.
    progress: show a tqdm bar.
    matryoshka: nested prefix widths, e.g. (256, 1024); the full width is added.
    meta: the DictMeta to give the dictionary (site, layer, model name...); taken from a
      shard folder's meta.json when not given.
    bandwidth: epsilon of the pseudo-derivatives' rectangle kernel (normalised units).
    threshold_init: initial threshold (normalised units).
    encoder_scale: w_enc starts as decoder^T times this.
    warmup_steps: learning-rate warm-up (default: 5% of steps, at most 1000).
    decay: "cosine", "linear" (over the last 20%) or "constant"; to
      ``learning_rate * final_lr_fraction``.
    sparsity_warmup_steps: penalty coefficient warm-up (default: 10% of steps).
    grad_clip: global gradient-norm clip (None: off).
    adam_b1, adam_b2: Adam's betas.
    log_every: history granularity in steps (each entry averages its window).
    dead_window_tokens: a latent silent for this many tokens counts as dead.
    normalize: scale inputs/targets to E||x||^2 = d (folded back into the result).
    b_dec_init: "median" (geometric median), "mean" or "zeros".
    init_samples: rows used to estimate the scales and initial biases.
    shuffle_buffer: rows held by the shuffle buffer of a streamed source.
    compute_dtype: matmul operand dtype (float32, or jnp.bfloat16 for speed on GPUs).

  Returns:
    ``dictionary``: a ``JumpReLUSAE`` or ``Transcoder`` (float32) on raw activations.
    ``history``: dict of numpy arrays, one entry per logged step: ``step``, ``loss``,
      ``mse`` (raw units, mean over features), ``l0``, ``fvu``, ``dead_fraction``,
      ``penalty``, ``learning_rate``, ``sparsity_coeff``.
  """
  if kind not in ("sae", "transcoder"):
    raise ValueError(f"kind must be 'sae' or 'transcoder', not {kind!r}")
  if targets is not None and kind == "sae":
    raise ValueError("targets are for transcoders; an SAE reconstructs its input")
  for name, v in (("width", width), ("steps", steps), ("batch_size", batch_size)):
    if int(v) != v or v <= 0:
      raise ValueError(f"{name} must be a positive integer, not {v!r}")
  if target_l0 is None and sparsity_coeff is None:
    raise ValueError("give target_l0 (train towards an L0) or sparsity_coeff (fixed penalty)")
  if target_l0 is not None and not target_l0 > 0:
    raise ValueError(f"target_l0 must be positive, not {target_l0}")
  src = as_source(data, targets)
  if kind == "transcoder" and src.d_out is None:
    raise ValueError("a transcoder needs targets (or (x, y) batches)")
  if kind == "sae" and src.d_out is not None:
    raise ValueError("an SAE's batches are x alone; (x, y) pairs are for transcoders")
  if mesh is not None and batch_size % mesh.shape[data_axis]:
    raise ValueError(
        f"batch_size={batch_size} does not split over the mesh axis {data_axis!r} of size "
        f"{mesh.shape[data_axis]}")
  if mesh is not None and width_axis is not None and width % mesh.shape[width_axis]:
    raise ValueError(f"width={width} does not split over the mesh axis {width_axis!r} of "
                     f"size {mesh.shape[width_axis]}")

  cfg = TrainConfig(
      kind=kind, width=int(width), d_in=int(src.d_in),
      d_out=int(src.d_out if kind == "transcoder" else src.d_in), steps=int(steps),
      batch_size=int(batch_size), learning_rate=float(learning_rate), seed=int(seed),
      target_l0=None if target_l0 is None else float(target_l0),
      sparsity_coeff=float(_default_coeff(src, kind) if sparsity_coeff is None
                           else sparsity_coeff),
      affine=bool(affine and kind == "transcoder"),
      matryoshka=objective.prefix_bounds(int(width), matryoshka),
      bandwidth=float(bandwidth), threshold_init=float(threshold_init),
      encoder_scale=float(encoder_scale),
      warmup_steps=int(min(1000, steps // 20) if warmup_steps is None else warmup_steps),
      decay=decay, final_lr_fraction=float(final_lr_fraction),
      sparsity_warmup_steps=int(steps // 10 if sparsity_warmup_steps is None
                                else sparsity_warmup_steps),
      grad_clip=grad_clip, adam_b1=float(adam_b1), adam_b2=float(adam_b2),
      log_every=int(log_every or max(1, min(100, steps // 50))),
      dead_window_tokens=int(dead_window_tokens), normalize=bool(normalize),
      b_dec_init=b_dec_init, skip_init=skip_init,
      skip_hold_steps=int(steps // 2 if skip_hold_steps is None else skip_hold_steps),
      init_samples=int(init_samples),
      shuffle_buffer=int(shuffle_buffer), compute_dtype=jnp.dtype(compute_dtype).name)
  meta = _meta_for(meta, src, cfg)

  schedule = optim.lr_schedule(cfg.learning_rate, cfg.steps, warmup_steps=cfg.warmup_steps,
                               decay=cfg.decay, final_lr_fraction=cfg.final_lr_fraction)
  coeff_at = optim.sparsity_schedule(cfg.sparsity_coeff, cfg.sparsity_warmup_steps)
  opt = _optimizer(cfg, schedule)

  # ------------------------------------------------------------ start or resume
  history = {k: [] for k in HISTORY_KEYS}
  found = ckpt.latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
  if found is not None:
    template = jax.eval_shape(lambda: _initial_state(cfg, opt, *_dummy_init(cfg)))
    _check_resume(cfg, ckpt.read_info(found), found)
    state, info = ckpt.load_checkpoint(found, template)
    s_in, s_out = info["scales"]
    history = {k: list(info["history"].get(k, [])) for k in HISTORY_KEYS}
  else:
    s_in, s_out, b_dec, w_skip = _estimate_init(src, cfg)
    state = _initial_state(cfg, opt, b_dec, w_skip)
  start = int(np.asarray(state["step"]))
  scales = (float(np.float32(s_in)), float(np.float32(s_out)))

  # ------------------------------------------------------------------ placement
  state_sh, batch_sh = _shardings(state, mesh, data_axis, width_axis)
  # Committed placement (a device, not None) so the first call and every later one, which
  # gets committed arrays back, share one compilation.
  state = jax.device_put(state, batch_sh if state_sh is None else state_sh)
  step_fn = _compiled_step(_step_key(cfg), mesh, data_axis, width_axis)

  def finish():
    d = objective.to_dictionary(state["params"], s_in=scales[0], s_out=scales[1],
                                kind=cfg.kind, meta=_final_meta(meta, cfg, history, scales))
    return d, {k: np.asarray(v, np.int64 if k == "step" else np.float32)
               for k, v in history.items()}

  if start >= cfg.steps:
    return finish()

  if isinstance(src, ArraySource):
    batches = random_access_batches(src, cfg.batch_size, cfg.seed, start)
  else:
    if start and not src.replayable:
      warnings.warn("resuming from a one-shot iterator: it cannot be replayed, so the data "
                    "continues from wherever the iterator now is; pass a callable returning "
                    "a fresh iterator for an exact resume", stacklevel=2)
      batches = src.batches(cfg.batch_size, cfg.seed, 0, cfg.shuffle_buffer)
    else:
      batches = src.batches(cfg.batch_size, cfg.seed, start, cfg.shuffle_buffer)
  batches = prefetch(batches, depth=2)

  scales_dev = jax.device_put(np.asarray(scales, np.float32),
                              batch_sh if mesh is None else NamedSharding(mesh, P()))
  bar = _progress(progress, cfg.steps, start)
  saved = start

  def save(done):
    d, _ = finish()
    ckpt.save_checkpoint(
        checkpoint_dir, done, dictionary=d, state=state, keep=keep_checkpoints,
        info={"format": "dictlearn.train_state", "version": 1, "config": _config_json(cfg),
              "scales": list(scales), "history": history})
    return done

  try:
    for t in range(start, cfg.steps):
      item = next(batches, None)
      if item is None:
        warnings.warn(f"the data ran out after {t} of {cfg.steps} steps; stopping there "
                      "(pass a callable that returns a fresh iterator to run more epochs)",
                      stacklevel=2)
        break
      x, y = item
      x = jax.device_put(x, batch_sh)
      y = x if y is None else jax.device_put(y, batch_sh)
      state = step_fn(state, x, y, scales_dev)
      done = t + 1
      if done % cfg.log_every == 0 or done == cfg.steps:
        row = _log_row(state, done, cfg, schedule, coeff_at)
        if not np.isfinite(row["loss"]):
          raise FloatingPointError(
              f"training diverged: the loss is {row['loss']} at step {done}; lower "
              f"learning_rate (now {cfg.learning_rate}) or check the data for NaN/inf")
        for k in HISTORY_KEYS:
          history[k].append(row[k])
        if bar is not None:
          bar.set_postfix(loss=f"{row['loss']:.4g}", l0=f"{row['l0']:.1f}",
                          fvu=f"{row['fvu']:.3f}", dead=f"{row['dead_fraction']:.2f}",
                          refresh=False)
      if bar is not None:
        bar.update(1)
      if checkpoint_dir is not None and (done % checkpoint_every == 0 or done == cfg.steps):
        saved = save(done)
    done = int(np.asarray(state["step"]))
    if checkpoint_dir is not None and saved != done:  # the data ran out early
      save(done)
  finally:
    if bar is not None:
      bar.close()
    batches.close()
  return finish()


# ------------------------------------------------------------------ initialisation


def _default_coeff(src, kind) -> float:
  """The target penalty's default coefficient: d_out / 4.

  The reconstruction loss is a sum of squares over d_out coordinates of unit scale, so the
  pull towards more latents grows with d_out; a coefficient growing alike keeps the L0
  overshoot (a few percent on the synthetic benchmarks) about the same at every width of
  the residual stream.
  """
  return (src.d_out if kind == "transcoder" else src.d_in) / 4.0


def _estimate_init(src, cfg: TrainConfig):
  """Scales, b_dec and w_skip (normalised units) from a seeded sample of the data."""
  x, y = src.sample(cfg.init_samples, cfg.seed)
  x = x.astype(np.float64)
  y = x if y is None else y.astype(np.float64)

  def scale(a):
    ms = float(np.mean(np.sum(a * a, axis=-1)))
    if not np.isfinite(ms) or ms <= 0:
      raise ValueError("the data sample has zero or non-finite mean squared norm; cannot "
                       "normalise (are the activations all zero, NaN or inf?)")
    return math.sqrt(a.shape[-1] / ms) if cfg.normalize else 1.0

  s_in = scale(x)
  s_out = scale(y) if cfg.kind == "transcoder" else s_in
  xn, yn = x * s_in, y * s_out
  w_skip = None
  if cfg.affine and cfg.skip_init == "lstsq":
    w_skip = _ridge(xn, yn)
    yn = yn - xn @ w_skip
  elif cfg.affine and cfg.skip_init != "zeros":
    raise ValueError(f"skip_init must be 'lstsq' or 'zeros', not {cfg.skip_init!r}")
  if cfg.b_dec_init == "median":
    b_dec = geometric_median(yn)
  elif cfg.b_dec_init == "mean":
    b_dec = yn.mean(0)
  elif cfg.b_dec_init == "zeros":
    b_dec = np.zeros(yn.shape[1])
  else:
    raise ValueError(f"b_dec_init must be 'median', 'mean' or 'zeros', not {cfg.b_dec_init!r}")
  return s_in, s_out, b_dec.astype(np.float32), (None if w_skip is None
                                                 else w_skip.astype(np.float32))


def _ridge(x, y, rel: float = 1e-4):
  """Least-squares linear map x (n, d_in) -> y (n, d_out) on centred data, lightly
  regularised so a sample smaller than d_in (or rank-deficient data) stays well posed."""
  xc, yc = x - x.mean(0), y - y.mean(0)
  gram = xc.T @ xc
  lam = rel * np.trace(gram) / gram.shape[0] + 1e-12
  return np.linalg.solve(gram + lam * np.eye(gram.shape[0]), xc.T @ yc)


def geometric_median(a, iters: int = 30, tol: float = 1e-6):
  """Weiszfeld's iteration for the point minimising the summed distances to rows of a."""
  m = a.mean(0)
  for _ in range(iters):
    dist = np.maximum(np.linalg.norm(a - m, axis=1), 1e-8)
    w = 1.0 / dist
    new = (w[:, None] * a).sum(0) / w.sum()
    if np.linalg.norm(new - m) <= tol * (np.linalg.norm(m) + 1e-12):
      return new
    m = new
  return m


def _dummy_init(cfg):
  return (np.zeros(cfg.d_out, np.float32),
          np.zeros((cfg.d_in, cfg.d_out), np.float32) if cfg.affine else None)


def _initial_state(cfg: TrainConfig, opt, b_dec, w_skip):
  params = objective.init_params(
      jax.random.key(cfg.seed), d_in=cfg.d_in, d_out=cfg.d_out, width=cfg.width,
      kind=cfg.kind, affine=cfg.affine, threshold_init=cfg.threshold_init,
      encoder_scale=cfg.encoder_scale, b_dec=b_dec, w_skip=w_skip)
  return {
      "params": params,
      "opt": opt.init(params),
      "step": jnp.zeros((), jnp.int32),
      "since_fired": jnp.zeros((cfg.width,), jnp.int32),
      "acc": {k: jnp.zeros((), jnp.float32) for k in (*_METRICS, "n")},
  }


# ------------------------------------------------------------------------ the step


def _optimizer(cfg: TrainConfig, schedule):
  return optim.make_optimizer(schedule, grad_clip=cfg.grad_clip, b1=cfg.adam_b1,
                              b2=cfg.adam_b2, hold=("w_skip",),
                              hold_steps=cfg.skip_hold_steps if cfg.affine else 0)


def _step_key(cfg: TrainConfig) -> TrainConfig:
  """cfg with the fields the step does not depend on blanked, so runs that differ only in
  seed or initialisation share a compiled step."""
  return dataclasses.replace(cfg, seed=0, threshold_init=1.0, encoder_scale=1.0,
                             normalize=True, b_dec_init="", skip_init="", init_samples=0,
                             shuffle_buffer=0)


@functools.lru_cache(maxsize=8)
def _compiled_step(cfg: TrainConfig, mesh, data_axis, width_axis):
  """The jitted training step ``(state, x, y, scales) -> state`` for a configuration.

  ``scales`` (2,) holds (s_in, s_out); they are arguments, not constants, so the compiled
  step is shared by every run with this configuration (the cache key).
  """
  schedule = optim.lr_schedule(cfg.learning_rate, cfg.steps, warmup_steps=cfg.warmup_steps,
                               decay=cfg.decay, final_lr_fraction=cfg.final_lr_fraction)
  coeff_at = optim.sparsity_schedule(cfg.sparsity_coeff, cfg.sparsity_warmup_steps)
  opt = _optimizer(cfg, schedule)
  compute_dtype = jnp.dtype(cfg.compute_dtype)

  def step(state, x, y, scales):
    params = state["params"]
    s_in, s_out = scales[0], scales[1]
    xn = x * s_in
    yn = y * s_out
    coeff = coeff_at(state["step"].astype(jnp.float32))
    (loss, aux), grads = jax.value_and_grad(objective.loss_fn, has_aux=True)(
        params, xn, yn, coeff=coeff, target_l0=cfg.target_l0, eps=cfg.bandwidth,
        bounds=cfg.matryoshka, compute_dtype=compute_dtype)
    updates, opt_state = opt.update(grads, state["opt"], params)
    params = jax.tree_util.tree_map(jnp.add, params, updates)
    params["w_dec"] = objective.unit_rows(params["w_dec"])

    since = jnp.where(aux["fired"], 0,
                      jnp.minimum(state["since_fired"] + cfg.batch_size, cfg.dead_window_tokens))
    metrics = {
        "loss": loss,
        "mse": aux["sse"] / (cfg.d_out * s_out * s_out),
        "l0": aux["l0"],
        "fvu": aux["sse"] * cfg.batch_size / jnp.maximum(aux["var"], 1e-30),
        "penalty": aux["penalty"],
        "n": jnp.ones((), jnp.float32),
    }
    # A history entry averages the steps of its window; a window starts every log_every.
    fresh = state["step"] % cfg.log_every == 0
    acc = {k: jnp.where(fresh, metrics[k], state["acc"][k] + metrics[k]) for k in metrics}
    return {"params": params, "opt": opt_state, "step": state["step"] + 1,
            "since_fired": since, "acc": acc}

  if mesh is None:
    return jax.jit(step, donate_argnums=0)
  template = jax.eval_shape(lambda: _initial_state(cfg, opt, *_dummy_init(cfg)))
  state_sh, batch_sh = _shardings(template, mesh, data_axis, width_axis)
  return jax.jit(step, in_shardings=(state_sh, batch_sh, batch_sh, NamedSharding(mesh, P())),
                 out_shardings=state_sh, donate_argnums=0)


def _shardings(state, mesh, data_axis, width_axis):
  """(state shardings, batch sharding); (None, default device) without a mesh."""
  if mesh is None:
    return None, jax.devices()[0]
  if data_axis not in mesh.axis_names:
    raise ValueError(f"the mesh has axes {mesh.axis_names}; no data axis {data_axis!r}")
  if width_axis is not None and width_axis not in mesh.axis_names:
    raise ValueError(f"the mesh has axes {mesh.axis_names}; no width axis {width_axis!r}")
  w = width_axis
  specs = {"w_enc": P(None, w), "b_enc": P(w), "log_threshold": P(w), "w_dec": P(w, None),
           "b_dec": P(), "w_skip": P(), "since_fired": P(w)}

  def pick(path, leaf):
    # Adam's moments mirror the params tree, so the last dict key names the parameter.
    for entry in reversed(path):
      name = getattr(entry, "key", None)
      if name in specs and len(specs[name]) in (0, leaf.ndim):
        return NamedSharding(mesh, specs[name])
    return NamedSharding(mesh, P())

  state_sh = jax.tree_util.tree_map_with_path(pick, state)
  return state_sh, NamedSharding(mesh, P(data_axis, None))


# ---------------------------------------------------------------- logging, meta


def _log_row(state, done, cfg, schedule, coeff_at):
  acc = jax.device_get(state["acc"])
  n = max(float(acc["n"]), 1.0)
  since = np.asarray(jax.device_get(state["since_fired"]))
  row = {k: float(acc[k]) / n for k in _METRICS}
  row["step"] = done
  row["dead_fraction"] = float(np.mean(since >= cfg.dead_window_tokens))
  row["learning_rate"] = float(schedule(done - 1))
  row["sparsity_coeff"] = float(coeff_at(float(done - 1)))
  return row


def _progress(progress, total, initial):
  if not progress:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc="fit", unit="step", dynamic_ncols=True)


def _meta_for(meta, src, cfg) -> DictMeta:
  if meta is None:
    folder = getattr(src, "x", None)
    if isinstance(folder, ShardFolder):
      m = folder.meta
      meta = DictMeta(site=m.get("site"), layer=m.get("layer"),
                      model_name=m.get("model_name"), hook_point_in=m.get("hook_point"))
      out = getattr(src, "y", None)
      if cfg.kind == "transcoder" and isinstance(out, ShardFolder):
        meta = meta.replace(site_out=out.meta.get("site"),
                            hook_point_out=out.meta.get("hook_point"))
    else:
      meta = DictMeta()
  return meta.replace(kind=cfg.kind)


def _final_meta(meta: DictMeta, cfg, history, scales) -> DictMeta:
  l0 = cfg.target_l0
  if l0 is None and history["l0"]:
    l0 = round(float(history["l0"][-1]), 2)
  training = {"trainer": "dictlearn.train.fit", "steps": cfg.steps,
              "batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate,
              "seed": cfg.seed, "target_l0": cfg.target_l0,
              "sparsity_coeff": cfg.sparsity_coeff, "matryoshka": list(cfg.matryoshka),
              "normalisation_scales": list(scales)}
  extra = dict(meta.extra)
  extra["training"] = json.dumps(training)
  return meta.replace(l0=l0, extra=tuple(sorted(extra.items())))


def _config_json(cfg: TrainConfig) -> dict:
  d = dataclasses.asdict(cfg)
  d["matryoshka"] = list(d["matryoshka"])
  return d


def _check_resume(cfg: TrainConfig, info: dict, folder):
  saved = info.get("config", {})
  now = _config_json(cfg)
  bad = [k for k in TrainConfig.STRUCTURAL if saved.get(k) != now[k]]
  if bad:
    raise ValueError(
        f"{folder} was trained with a different {', '.join(bad)} "
        f"({', '.join(f'{k}={saved.get(k)!r}' for k in bad)}); use a fresh checkpoint_dir")
  changed = [k for k in now if k not in TrainConfig.STRUCTURAL and saved.get(k) != now[k]]
  if changed:
    warnings.warn(
        f"resuming {folder} with changed settings {changed}: the result will differ from an "
        "uninterrupted run with either setting", stacklevel=3)
