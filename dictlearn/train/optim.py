"""The optimiser: unit-norm decoder rows, gradient clipping, Adam, warm-up and decay.

Decoder norms. L0 does not change when a latent's activations grow and its decoder row
shrinks, so (unlike an L1 penalty) nothing in the loss pins the decoder scale. We keep
decoder rows at unit norm, as Gemma Scope did: the component of each row's gradient along
the row is removed before Adam (it could only change the norm) and the rows are
renormalised after every step (:func:`dictlearn.train.objective.unit_rows`). The other
option of the JumpReLU paper, weighting each latent's penalty by its decoder norm, only
makes sense for L1-style penalties.

Order of the chain: project, clip by global norm, Adam (the paper uses beta1 = 0), scale
by the learning-rate schedule.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def project_out_decoder_radial() -> optax.GradientTransformation:
  """Removes from ``w_dec``'s gradient the part along each (unit) decoder row."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params):
    if params is None:
      raise ValueError("project_out_decoder_radial needs params in update()")
    g, w = updates["w_dec"], params["w_dec"]
    updates = dict(updates)
    updates["w_dec"] = g - jnp.sum(g * w, axis=-1, keepdims=True) * w
    return updates, state

  return optax.GradientTransformation(init, update)


def lr_schedule(learning_rate: float, steps: int, *, warmup_steps: int, decay: str,
                decay_fraction: float = 0.2, final_lr_fraction: float = 0.0):
  """Linear warm-up from 0 over ``warmup_steps``, then

  * ``"cosine"``: cosine decay to ``learning_rate * final_lr_fraction`` at ``steps``;
  * ``"linear"``: constant, then linear decay to that value over the final
    ``decay_fraction`` of the steps (the JumpReLU paper's shape);
  * ``"constant"``: constant.
  """
  end = learning_rate * final_lr_fraction
  warmup_steps = max(0, min(warmup_steps, steps - 1))
  warm = optax.linear_schedule(0.0, learning_rate, warmup_steps) if warmup_steps else None
  if decay == "cosine":
    rest = optax.cosine_decay_schedule(learning_rate, max(1, steps - warmup_steps),
                                       alpha=final_lr_fraction)
  elif decay == "linear":
    decay_steps = max(1, int(round(steps * decay_fraction)))
    flat = max(0, steps - warmup_steps - decay_steps)
    rest = optax.join_schedules(
        [optax.constant_schedule(learning_rate),
         optax.linear_schedule(learning_rate, end, decay_steps)], [flat])
  elif decay == "constant":
    rest = optax.constant_schedule(learning_rate)
  else:
    raise ValueError(f"decay must be 'cosine', 'linear' or 'constant', not {decay!r}")
  if warm is None:
    return rest
  return optax.join_schedules([warm, rest], [warmup_steps])


def hold_params(names: tuple, steps: int) -> optax.GradientTransformation:
  """Zeroes the updates of the named parameters for the first ``steps`` steps."""

  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    del params
    updates = dict(updates)
    live = (state.count >= steps).astype(jnp.float32)
    for k in names:
      if k in updates:
        updates[k] = updates[k] * live
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


def scale_params(factors: dict) -> optax.GradientTransformation:
  """Multiplies the updates of the named parameters by constant factors."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    updates = dict(updates)
    for k, f in factors.items():
      if k in updates:
        updates[k] = updates[k] * f
    return updates, state

  return optax.GradientTransformation(init, update)


def make_optimizer(schedule, *, grad_clip: float | None, b1: float, b2: float,
                   eps: float = 1e-8, hold: tuple = (), hold_steps: int = 0,
                   lr_factors: dict | None = None) -> optax.GradientTransformation:
  """The chain above; ``lr_factors`` {name: f} gives a parameter the learning rate
  ``f * schedule`` (the log-thresholds' own rate)."""
  parts = [project_out_decoder_radial()]
  if grad_clip:
    parts.append(optax.clip_by_global_norm(grad_clip))
  parts += [optax.scale_by_adam(b1=b1, b2=b2, eps=eps), optax.scale_by_learning_rate(schedule)]
  factors = {k: f for k, f in (lr_factors or {}).items() if f != 1.0}
  if factors:
    parts.append(scale_params(factors))
  if hold and hold_steps > 0:
    parts.append(hold_params(hold, hold_steps))
  return optax.chain(*parts)


def sparsity_schedule(coeff: float, warmup_steps: int):
  """The penalty coefficient ramps linearly from 0 over ``warmup_steps`` (the paper's
  sparsity warm-up: an early strong penalty kills latents before they find a direction)."""
  if warmup_steps <= 0:
    return lambda step: jnp.asarray(coeff, jnp.float32)
  return lambda step: coeff * jnp.minimum(1.0, (step + 1.0) / warmup_steps)
