"""dictlearn.analysis against direct numpy computations over the dense latents."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import dictlearn
from dictlearn import analysis, interventions as iv


def _dict(seed, kind="sae", width=96, threshold=0.4, d=12):
  d_ = dictlearn.random_dictionary(jax.random.key(seed), d, width, kind=kind,
                                   affine=kind == "transcoder", threshold=threshold)
  rng = np.random.default_rng(seed)
  return d_.replace(b_enc=jnp.asarray(rng.normal(0, 0.2, width), jnp.float32))


def _np_f(d, x):
  pre = np.asarray(x, np.float64) @ np.asarray(d.w_enc, np.float64) + np.asarray(d.b_enc)
  return np.where(pre > np.asarray(d.threshold), pre, 0.0)


@settings(max_examples=10)
@given(seed=st.integers(0, 1000), reduce=st.sampled_from(["max", "mean"]),
       k=st.sampled_from([1, 5, 40]))
def test_top_latents_equal_a_dense_search(seed, reduce, k):
  d = _dict(seed)
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(3, 6, 12)).astype(np.float32)
  positions = iv.positions_from_padding(np.array([[2, 5, 6, 7, 8, 9], [0, 0, 2, 5, 6, 7],
                                                  [2, 5, 6, 0, 0, 0]]))
  mask = iv.active_positions(positions)
  top = analysis.top_latents(d, x, k, mask, reduce=reduce)
  f = _np_f(d, x)
  want = -np.sort(-f, axis=-1)[..., :k]
  np.testing.assert_allclose(top.values, want, rtol=1e-5, atol=1e-5)
  picked = np.take_along_axis(f, top.indices, axis=-1)
  active = want > 0  # Past a position's active latents, slots hold value 0 and index 0.
  np.testing.assert_allclose(picked[active], want[active], rtol=1e-5, atol=1e-5)
  assert (top.indices[~active] == 0).all()
  m = np.asarray(mask)[..., None]
  if reduce == "max":
    pooled = np.where(m, f, 0.0).max(axis=1)
  else:
    pooled = (f * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1)
  np.testing.assert_allclose(top.prompt_values, -np.sort(-pooled, axis=-1)[:, :k], rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(np.take_along_axis(pooled, top.prompt_indices, axis=-1),
                             top.prompt_values, rtol=1e-5, atol=1e-5)
  assert "latent" in top.table(0)


def test_latent_activations():
  d = _dict(3)
  x = np.random.default_rng(3).normal(size=(2, 5, 12)).astype(np.float32)
  np.testing.assert_allclose(analysis.latent_activations(d, x, 17), _np_f(d, x)[..., 17],
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="out of range"):
    analysis.latent_activations(d, x, 96)


@pytest.mark.parametrize("kind", ["sae", "transcoder"])
def test_reconstruction_matches_direct_computation(kind):
  d = _dict(5, kind)
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, 7, 12)).astype(np.float32)
  target = x if kind == "sae" else rng.normal(size=(2, 7, 12)).astype(np.float32)
  tokens = np.array([[2, 3, 4, 5, 6, 7, 8], [0, 0, 2, 9, 10, 11, 12]])
  mask = np.asarray(iv.active_positions(iv.positions_from_padding(tokens)))
  clean = rng.normal(size=(2, 7, 20)).astype(np.float32)
  spliced = clean + rng.normal(0, 0.5, size=clean.shape).astype(np.float32)
  r = analysis.reconstruction(d, x, target, mask, tokens=tokens, clean_logits=clean,
                              spliced_logits=spliced, site_in="a.1", site_out="b.1")
  f = _np_f(d, x)
  y = f @ np.asarray(d.w_dec, np.float64) + np.asarray(d.b_dec)
  if d.w_skip is not None:
    y = y + x @ np.asarray(d.w_skip)
  t = target[mask].astype(np.float64)
  fvu = ((t - y[mask]) ** 2).sum() / ((t - t.mean(0)) ** 2).sum()
  assert r.fvu == pytest.approx(fvu, rel=1e-4)
  assert r.mse == pytest.approx(((t - y[mask]) ** 2).mean(), rel=1e-4)
  assert r.l0 == pytest.approx((f[mask] != 0).sum(-1).mean(), rel=1e-6)
  assert r.n_tokens == mask.sum() == 10

  def ce(logits):
    lp = logits[:, :-1] - np.log(np.exp(logits[:, :-1]).sum(-1, keepdims=True))
    return -np.take_along_axis(lp, tokens[:, 1:, None], -1)[..., 0]
  keep = mask[:, 1:]
  assert r.clean_loss == pytest.approx(ce(clean)[keep].mean(), rel=1e-5)
  assert r.spliced_loss == pytest.approx(ce(spliced)[keep].mean(), rel=1e-5)
  assert r.delta_loss == pytest.approx(r.spliced_loss - r.clean_loss, abs=1e-5)
  np.testing.assert_allclose(r.clean_per_token, ce(clean), rtol=1e-5)
  np.testing.assert_array_equal(r.loss_mask, keep)
  assert "a.1 -> b.1" in str(r)
  with pytest.raises(ValueError, match="together"):
    analysis.reconstruction(d, x, target, mask, tokens=tokens)
  with pytest.raises(ValueError, match="mask has shape"):
    analysis.reconstruction(d, x, target, mask[:, :3])
