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
* Adam (beta1 = 0 by default, as in the paper) after
  global-norm clipping, learning rate with linear warm-up then cosine (or linear) decay.
  Clipping matters beyond stability: while L0 is far above the target the penalty's
  threshold gradients dominate the global norm, which slows the encoder and decoder until
  the sparsity is roughly right (benchmarks/RESULTS.md: without it the synthetic benchmark
  learns a dense code).
* Thresholds start where each latent fires on ``init_firing_rate`` of a data sample (a
  step-0 L0 of 10x the target), the kernel bandwidth is a tenth of the initial
  pre-activations' RMS, and log-thresholds have their own learning rate, at least
  10 / steps, so they can move by O(1) in a run of any length (see :mod:`.config` for
  the rules and :mod:`.init`). The paper's fixed 0.001 for both suits 100k+-step runs only.
* Init: random unit decoder rows, encoder = decoder^T (SAE) or independent random unit
  columns (transcoder), ``b_dec`` = geometric median of the (skip-corrected) targets.
* Affine skip (transcoders): starts at zero and is held there for the first half of the
  run. The skip is dense and learns much faster than sparse latents; trained from step 0
  (or started at the least-squares fit) it absorbs the linear shadow of the features
  first, and the latents are left with an entangled residual that they never untangle
  (benchmarks/RESULTS.md has the synthetic benchmark's numbers). Once the latents explain
  the sparse part, the skip learns what is left: the genuinely linear part.
* Matryoshka: nested prefix widths, reconstruction losses summed over the prefixes.
* Dead latents: a latent is dead once it has not fired in ``dead_window_tokens`` tokens.
* Resampling (:mod:`.resample`): every ``resample_every`` steps of the first half of the
  run, latents firing at under a tenth of the mean rate restart on the residual direction
  of a badly reconstructed row; without it latents that duplicate others fall silent and
  stay so, and a third of a known dictionary's directions is never found
  (benchmarks/RESULTS.md).

State is a plain dict pytree ``{"params", "opt", "step", "since_fired", "fired_rows",
"acc"}``; data order
is a pure function of (seed, step) (random-access data) or a replayable stream, so a run
resumed from a checkpoint matches an uninterrupted one.

Many processes (``dictlearn.distributed.initialize`` first, then the same ``fit`` call in
every process): the mesh spans every process's devices (by default a data mesh over all of
them), each process reads only the rows of each global batch that its devices hold
(random-access data; a stream is read whole by every process, which keeps its rows), the
init sample is the same seeded sample everywhere, and process 0 writes the checkpoints.
Since the data order depends on (seed, step) only, the result equals a one-process run on
a mesh of the same shape, and a checkpoint resumes with any process count.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dictlearn import distributed as dist
from dictlearn.activation_data import ArraySource, as_source, prefetch, random_access_batches
from dictlearn.dictionary import DictMeta
from dictlearn.sharding import auto_axes
from dictlearn.train import checkpoint as ckpt
from dictlearn.train import history as hist
from dictlearn.train import objective
from dictlearn.train import resample as rs
from dictlearn.train.config import TrainConfig, check_resume
from dictlearn.train.init import estimate_init, initial_state
from dictlearn.train.step import compiled_step, make_optimizer, shardings


def fit(data, config: TrainConfig | None = None, *, targets=None,
        mesh: jax.sharding.Mesh | None = None, data_axis: str = "data",
        width_axis: str | None = None, checkpoint_dir=None, checkpoint_every: int = 5000,
        keep_checkpoints: int = 2, meta: DictMeta | None = None, progress: bool = True,
        **overrides):
  """Trains a JumpReLU dictionary; returns ``(dictionary, history)``.

  ``fit(x, width=4096, target_l0=32, steps=20_000, batch_size=4096, learning_rate=3e-4)``:
  the settings are :class:`TrainConfig`'s fields (``config``, with ``overrides`` applied);
  the keyword-only arguments below are run options that do not change the result.

  Args:
    data: inputs x: an array or np.memmap (N, d_in); a shard folder path (see
      :mod:`dictlearn.activation_data`); an iterator of batches ``x`` / ``(x, y)`` (rows,
      d); or a zero-argument callable returning such an iterator (replayable: exact resume
      and several epochs).
    config: a :class:`TrainConfig` (default: all defaults).
    targets: transcoder outputs y (N, d_out) paired row by row with data (array, memmap or
      shard folder).
    mesh: a device mesh (``jax.make_mesh`` or ``Mesh``) for data-parallel training: the
      batch is split along ``data_axis``; the dictionary is replicated, or split along
      its width over ``width_axis`` when given. batch_size must divide by the data axis
      size. With several processes it spans all of their devices (default: a data mesh
      over every device).
    checkpoint_dir: write checkpoints there every ``checkpoint_every`` steps and at the end
      (keeping ``keep_checkpoints``), and resume from the newest one found.
    meta: the DictMeta to give the dictionary (site, layer, model name...); taken from a
      shard folder's meta.json when not given.
    progress: show a tqdm bar.
    **overrides: TrainConfig fields, e.g. ``kind="transcoder"``, ``width=...``.

  Returns:
    ``dictionary``: a ``JumpReLUSAE`` or ``Transcoder`` (float32) on raw activations.
    ``history``: dict of numpy arrays, one entry per logged step (each over the window
      of steps since the last): ``step``, ``loss``, ``mse`` (raw units, mean over
      features), ``l0``, ``fvu`` (the window's summed squared error over its rows' summed
      variance, as a corpus FVU), ``dead_fraction``, ``penalty``, ``learning_rate``,
      ``sparsity_coeff``.
  """
  cfg = (TrainConfig() if config is None else config).replace(**overrides)
  if targets is not None and cfg.kind == "sae":
    raise ValueError("targets are for transcoders; an SAE reconstructs its input")
  src = as_source(data, targets)
  cfg = cfg.resolve(src)
  if mesh is None and jax.process_count() > 1:
    mesh = dist.data_mesh(data_axis)  # Every process's devices take part.
  if mesh is not None:
    mesh = auto_axes(mesh)  # A jax.make_mesh mesh (Explicit axes) works as well.
  if mesh is not None and cfg.batch_size % mesh.shape[data_axis]:
    raise ValueError(
        f"batch_size={cfg.batch_size} does not split over the mesh axis {data_axis!r} of "
        f"size {mesh.shape[data_axis]}")
  if mesh is not None and width_axis is not None and cfg.width % mesh.shape[width_axis]:
    raise ValueError(f"width={cfg.width} does not split over the mesh axis {width_axis!r} "
                     f"of size {mesh.shape[width_axis]}")
  meta = hist.meta_for(meta, src, cfg)
  opt = make_optimizer(cfg)

  # ------------------------------------------------------------ start or resume
  history = hist.empty()
  found = ckpt.latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
  if found is not None:
    info = ckpt.read_info(found)
    changed, unused = check_resume(cfg, info.get("config", {}), found)
    if changed:
      warnings.warn(f"resuming {found} with changed settings {changed}: the result will "
                    "differ from an uninterrupted run with either setting", stacklevel=2)
    if unused:
      warnings.warn(f"resuming {found}: {unused} only decide how a run starts, so this run "
                    "continues from the checkpoint's start as it was; use a fresh "
                    "checkpoint_dir to start with them", stacklevel=2)
    state, info = ckpt.load_checkpoint(
        found, jax.eval_shape(lambda: initial_state(cfg, opt)))
    scales = tuple(info["scales"])
    history = {k: list(info["history"].get(k, [])) for k in hist.HISTORY_KEYS}
  else:
    init = estimate_init(src, cfg)
    state = initial_state(cfg, opt, init)
    scales = (init.s_in, init.s_out)
  start = int(np.asarray(state["step"]))
  scales = (float(np.float32(scales[0])), float(np.float32(scales[1])))

  # Committed placement (a device, not None) so the first call and every later one, which
  # gets committed arrays back, share one compilation.
  state_sh, batch_sh = shardings(state, mesh, data_axis, width_axis)
  state = dist.put(state, batch_sh if state_sh is None else state_sh)
  step_fn = compiled_step(cfg, mesh, data_axis, width_axis)
  resample_fn = None

  def finish():
    d = objective.to_dictionary(dist.gather_tree(state["params"]), s_in=scales[0],
                                s_out=scales[1], kind=cfg.kind,
                                meta=hist.final_meta(meta, cfg, history, scales),
                                center=dist.gather_tree(state["center"]))
    return d, hist.as_arrays(history)

  if start >= cfg.steps:
    return finish()

  # With several processes each reads the rows of every batch that its devices hold.
  rows = (dist.local_rows(batch_sh, (cfg.batch_size, cfg.d_in))
          if jax.process_count() > 1 else None)
  if isinstance(src, ArraySource):
    batches = random_access_batches(src, cfg.batch_size, cfg.seed, start, rows=rows)
  else:
    if start and not src.replayable:
      warnings.warn("resuming from a one-shot iterator: it cannot be replayed, so the data "
                    "continues from wherever the iterator now is; pass a callable returning "
                    "a fresh iterator for an exact resume", stacklevel=2)
    batches = src.batches(cfg.batch_size, cfg.seed, start if src.replayable else 0,
                          cfg.shuffle_buffer)
    if rows is not None:
      batches = ((x[rows], None if y is None else y[rows]) for x, y in batches)
  batches = prefetch(batches, depth=2)

  scales_dev = dist.put(np.asarray(scales, np.float32),
                        batch_sh if mesh is None else NamedSharding(mesh, P()))
  bar = _progress(progress and dist.is_primary(), cfg.steps, start)
  saved = start

  def save(done):
    d, _ = finish()
    ckpt.save_checkpoint(
        checkpoint_dir, done, dictionary=d, state=state, keep=keep_checkpoints,
        info={"format": "dictlearn.train_state", "version": 3, "config": cfg.to_json(),
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
      if rows is None:
        x = jax.device_put(x, batch_sh)
        y = x if y is None else jax.device_put(y, batch_sh)
      else:
        x = dist.global_batch(x, rows, batch_sh, cfg.batch_size)
        y = x if y is None else dist.global_batch(y, rows, batch_sh, cfg.batch_size)
      state = step_fn(state, x, y, scales_dev)
      done = t + 1
      if rs.due(cfg, done):
        if resample_fn is None:
          resample_fn = rs.compiled_resample(cfg, mesh, data_axis, width_axis)
        key = dist.put(rs.key_at(cfg, done),
                       batch_sh if mesh is None else NamedSharding(mesh, P()))
        state = resample_fn(state, x, y, scales_dev, key)
      if done % cfg.log_every == 0 or done == cfg.steps:
        # What the row reads, gathered where other processes hold part of it.
        row = hist.log_row(dist.gather_tree({k: state[k] for k in ("acc", "since_fired")}),
                           done, cfg, opt)
        if not np.isfinite(row["loss"]):
          raise FloatingPointError(
              f"training diverged: the loss is {row['loss']} at step {done}; lower "
              f"learning_rate (now {cfg.learning_rate}) or check the data for NaN/inf")
        for k in hist.HISTORY_KEYS:
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


def _progress(progress, total, initial):
  if not progress:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc="fit", unit="step", dynamic_ncols=True)
