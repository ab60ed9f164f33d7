"""Metrics against direct numpy computations, with and without masks."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dictlearn import interventions, metrics


@st.composite
def batches(draw):
  b, s, d = draw(st.integers(1, 3)), draw(st.integers(2, 7)), draw(st.integers(1, 6))
  rng = np.random.default_rng(draw(st.integers(0, 9999)))
  x = rng.normal(size=(b, s, d)).astype(np.float32)
  x_hat = x + rng.normal(scale=0.3, size=x.shape).astype(np.float32)
  mask = rng.random((b, s)) < 0.7
  mask[0, 0] = True  # At least one token kept.
  return x, x_hat, mask


@given(batches())
def test_fvu_mse_l0_match_direct_computation(batch):
  x, x_hat, mask = batch
  xs, hs = x[mask], x_hat[mask]
  total = ((xs - xs.mean(0)) ** 2).sum()
  if total > 1e-6:  # One kept token has no variance to explain.
    want_fvu = ((xs - hs) ** 2).sum() / total
    np.testing.assert_allclose(metrics.fvu(x, x_hat, mask), want_fvu, rtol=1e-4)
  np.testing.assert_allclose(metrics.mse(x, x_hat, mask), ((xs - hs) ** 2).mean(), rtol=1e-5)
  f = np.where(np.abs(x) > 0.5, x, 0.0)
  np.testing.assert_allclose(metrics.l0(f, mask), (f[mask] != 0).sum(-1).mean(), rtol=1e-6)


def test_fvu_is_zero_for_perfect_and_one_for_the_mean():
  x = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
  assert float(metrics.fvu(x, x)) == 0.0
  np.testing.assert_allclose(metrics.fvu(x, np.broadcast_to(x.mean(0), x.shape)), 1.0, rtol=1e-5)


def test_masked_tokens_do_not_count():
  x = np.zeros((1, 3, 2), np.float32)
  x_hat = np.array([[[100.0, 100.0], [0, 0], [0, 0]]], np.float32)  # Error only at BOS.
  mask = np.array([[False, True, True]])
  assert float(metrics.mse(x, x_hat, mask)) == 0.0
  assert float(metrics.mse(x, x_hat)) > 0


def test_cross_entropy_and_delta_loss_match_direct_computation():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
  patched = logits + rng.normal(size=logits.shape).astype(np.float32)
  tokens = np.array([[2, 4, 6, 8, 10], [2, 3, 5, 0, 0]])
  def ce(lg):
    lp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    return -np.take_along_axis(lp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(metrics.cross_entropy(logits, tokens), ce(logits), rtol=1e-5)
  mask = interventions.active_positions(interventions.positions_from_padding(tokens))
  keep = np.asarray(mask)[:, 1:]
  want = ce(patched)[keep].mean() - ce(logits)[keep].mean()
  np.testing.assert_allclose(metrics.delta_loss(logits, patched, tokens, mask), want, rtol=1e-5)
  assert keep.sum() == 6  # Padding targets (0) are left out.


def test_mask_shape_mismatch_is_an_error():
  with pytest.raises(ValueError, match="mask has shape"):
    metrics.mse(jnp.ones((2, 3, 4)), jnp.ones((2, 3, 4)), jnp.ones((3, 2), bool))
