"""JumpReLU and Heaviside with straight-through pseudo-derivatives (arXiv 2407.14435, sec. 4).

Both functions are piecewise constant in the threshold, so their true gradient with
respect to it is zero almost everywhere. The paper replaces it with a kernel density
estimate of the gradient of the *expected* loss: with the rectangle kernel
``K(u) = 1{-1/2 < u < 1/2}`` and bandwidth ``eps``,

    d/dtheta JumpReLU_theta(z) := -(theta / eps) K((z - theta) / eps)
    d/dtheta H(z - theta)      := -(1 / eps)     K((z - theta) / eps)

Gradients with respect to ``z`` are the ordinary ones: ``H(z - theta)`` for the JumpReLU,
and 0 for the Heaviside (the L0 penalty trains only the thresholds; the encoder learns
to be sparse through the reconstruction loss).

Shapes: ``z`` (..., width) and ``theta`` broadcast to it; callers broadcast theta first
so the backward pass sums its gradient over the batch through ``broadcast_to``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def rectangle(u):
  """The rectangle kernel: 1 on (-1/2, 1/2), else 0 (float of u's dtype)."""
  return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(z, theta, eps: float):
  """``z * (z > theta)``: (..., width), theta of the same shape (broadcast it first)."""
  return jnp.where(z > theta, z, jnp.zeros_like(z))


def _jumprelu_fwd(z, theta, eps):
  return jumprelu(z, theta, eps), (z, theta)


def _jumprelu_bwd(eps, res, g):
  z, theta = res
  dz = jnp.where(z > theta, g, jnp.zeros_like(g))
  dtheta = -(theta / eps) * rectangle((z - theta) / eps) * g
  return dz, dtheta


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def heaviside(z, theta, eps: float):
  """``1{z > theta}`` as float: (..., width), theta of the same shape."""
  return (z > theta).astype(z.dtype)


def _heaviside_fwd(z, theta, eps):
  return heaviside(z, theta, eps), (z, theta)


def _heaviside_bwd(eps, res, g):
  z, theta = res
  dtheta = -(1.0 / eps) * rectangle((z - theta) / eps) * g
  return jnp.zeros_like(z), dtheta


heaviside.defvjp(_heaviside_fwd, _heaviside_bwd)
