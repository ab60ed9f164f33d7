"""The training step and its optimiser, built once from a resolved :class:`TrainConfig`.

``make_optimizer(cfg) -> Optimizer`` holds the optax chain with the learning-rate and
penalty-coefficient schedules, which the step uses and the history logs;
``make_step(cfg) -> step(state, x, y, scales) -> state`` is the pure step;
``compiled_step(cfg, mesh, data_axis, width_axis)`` jits it (placed over a mesh when given),
cached by :meth:`TrainConfig.step_key` so runs that differ only in their initialisation or
data share one executable.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from dictlearn.train import objective, optim
from dictlearn.train.config import TrainConfig
from dictlearn.train.init import initial_state


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """Attributes:
    tx: the optax transformation (state: ``opt.init(params)``).
    lr_at: step -> learning rate of the encoder, decoder and biases.
    coeff_at: step -> sparsity penalty coefficient.
  """

  tx: optax.GradientTransformation
  lr_at: Callable
  coeff_at: Callable

  def init(self, params):
    return self.tx.init(params)

  def update(self, grads, state, params):
    return self.tx.update(grads, state, params)


def make_optimizer(cfg: TrainConfig) -> Optimizer:
  lr_at = optim.lr_schedule(cfg.learning_rate, cfg.steps, warmup_steps=cfg.warmup_steps,
                            decay=cfg.decay, final_lr_fraction=cfg.final_lr_fraction)
  tx = optim.make_optimizer(
      lr_at, grad_clip=cfg.grad_clip, b1=cfg.adam_b1, b2=cfg.adam_b2, hold=("w_skip",),
      hold_steps=cfg.skip_hold_steps if cfg.affine else 0,
      lr_factors={"log_threshold": cfg.threshold_learning_rate / cfg.learning_rate})
  return Optimizer(tx=tx, lr_at=lr_at,
                   coeff_at=optim.sparsity_schedule(cfg.sparsity_coeff,
                                                    cfg.sparsity_warmup_steps))


def make_step(cfg: TrainConfig, opt: Optimizer | None = None):
  """The training step ``(state, x, y, scales) -> state`` for a resolved config.

  ``x`` (B, d_in), ``y`` (B, d_out) raw (y is x for an SAE); ``scales`` (2,) holds
  (s_in, s_out). They are arguments, not constants, so one compiled step serves every run
  with this config.
  """
  opt = make_optimizer(cfg) if opt is None else opt
  compute_dtype = jnp.dtype(cfg.compute_dtype)

  def step(state, x, y, scales):
    params = state["params"]
    s_in, s_out = scales[0], scales[1]
    xn = x * s_in
    yn = y * s_out
    coeff = opt.coeff_at(state["step"].astype(jnp.float32))
    (loss, aux), grads = jax.value_and_grad(objective.loss_fn, has_aux=True)(
        params, xn, yn, coeff=coeff, target_l0=cfg.target_l0, eps=cfg.bandwidth,
        bounds=cfg.matryoshka, compute_dtype=compute_dtype,
        weights=objective.row_weights(yn, cfg.loss_norm_cap), center=state["center"])
    updates, opt_state = opt.update(grads, state["opt"], params)
    params = jax.tree_util.tree_map(jnp.add, params, updates)
    params["w_dec"] = objective.unit_rows(params["w_dec"])

    since = jnp.where(aux["fired"] > 0, 0,
                      jnp.minimum(state["since_fired"] + cfg.batch_size, cfg.dead_window_tokens))
    metrics = {
        "loss": loss,
        "mse": aux["sse"] / (cfg.d_out * s_out * s_out),
        "l0": aux["l0"],
        "penalty": aux["penalty"],
        # FVU is the window's summed squared error over its summed variance, not a mean of
        # per-batch ratios: a rare batch with a badly reconstructed row must weigh as
        # its rows do in a corpus FVU, neither more nor less.
        "sse": aux["sse"] * cfg.batch_size,
        "var": aux["var"],
        "n": jnp.ones((), jnp.float32),
    }
    # A history entry sums the steps of its window; a window starts every log_every.
    fresh = state["step"] % cfg.log_every == 0
    acc = {k: jnp.where(fresh, metrics[k], state["acc"][k] + metrics[k]) for k in metrics}
    # Saturates (after the last resampling nothing resets it) instead of overflowing.
    fired_rows = jnp.minimum(state["fired_rows"], 1 << 30) + aux["fired"]
    return {"params": params, "opt": opt_state, "step": state["step"] + 1,
            "since_fired": since, "fired_rows": fired_rows, "acc": acc,
            "center": state["center"]}

  return step


def compiled_step(cfg: TrainConfig, mesh=None, data_axis: str = "data",
                  width_axis: str | None = None):
  """``make_step(cfg)`` jitted (state donated), over ``mesh`` when given."""
  return _compiled(cfg.step_key(), mesh, data_axis, width_axis)


@functools.lru_cache(maxsize=8)
def _compiled(cfg: TrainConfig, mesh, data_axis, width_axis):
  return jit_state_fn(make_step(cfg), cfg, mesh, data_axis, width_axis, n_replicated=1)


def jit_state_fn(fn, cfg: TrainConfig, mesh, data_axis: str, width_axis: str | None,
                 n_replicated: int):
  """``fn(state, x, y, *replicated) -> state`` jitted with the state donated; over ``mesh``
  the state is placed as :func:`shardings` says, x and y split along ``data_axis`` and the
  ``n_replicated`` trailing arguments replicated."""
  if mesh is None:
    return jax.jit(fn, donate_argnums=0)
  template = jax.eval_shape(lambda: initial_state(cfg, make_optimizer(cfg)))
  state_sh, batch_sh = shardings(template, mesh, data_axis, width_axis)
  rep = (NamedSharding(mesh, P()),) * n_replicated
  return jax.jit(fn, in_shardings=(state_sh, batch_sh, batch_sh, *rep),
                 out_shardings=state_sh, donate_argnums=0)


def shardings(state, mesh, data_axis: str = "data", width_axis: str | None = None):
  """(state shardings, batch sharding); (None, default device) without a mesh.

  The dictionary (and Adam's moments, which mirror it) is replicated, or split along its
  width over ``width_axis``; batches are split along ``data_axis``.
  """
  if mesh is None:
    return None, jax.devices()[0]
  if data_axis not in mesh.axis_names:
    raise ValueError(f"the mesh has axes {mesh.axis_names}; no data axis {data_axis!r}")
  if width_axis is not None and width_axis not in mesh.axis_names:
    raise ValueError(f"the mesh has axes {mesh.axis_names}; no width axis {width_axis!r}")
  w = width_axis
  specs = {"w_enc": P(None, w), "b_enc": P(w), "log_threshold": P(w), "w_dec": P(w, None),
           "b_dec": P(), "w_skip": P(), "since_fired": P(w), "fired_rows": P(w)}

  def pick(path, leaf):
    # Adam's moments mirror the params tree, so the last dict key names the parameter.
    for entry in reversed(path):
      name = getattr(entry, "key", None)
      if name in specs and len(specs[name]) in (0, leaf.ndim):
        return NamedSharding(mesh, specs[name])
    return NamedSharding(mesh, P())

  state_sh = jax.tree_util.tree_map_with_path(pick, state)
  return state_sh, NamedSharding(mesh, P(data_axis, None))
