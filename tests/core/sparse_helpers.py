"""Shared builders and checks for the sparse / sharding / pallas tests."""

import jax
import jax.numpy as jnp
import numpy as np

import dictlearn as dl


def make_dictionary(seed, d_in, width, *, kind="sae", d_out=None, dtype=jnp.float32,
                    threshold=1.0, spread=0.3):
  """Gaussian weights; thresholds ``threshold * (1 + spread * N(0, 1))`` per latent.

  Pre-activations are ~N(b_enc, 1) for unit-variance x (w_enc columns have unit norm),
  so ``threshold`` sets the density: ~2.3 per 100 latents active at 2, ~all at -3.
  """
  ks = jax.random.split(jax.random.key(seed), 6)
  d_out = d_in if kind == "sae" else (d_out or d_in + 3)
  w_enc = jax.random.normal(ks[0], (d_in, width), jnp.float32)
  w_enc = w_enc / jnp.linalg.norm(w_enc, axis=0, keepdims=True)
  w = dict(
      w_enc=w_enc,
      b_enc=0.1 * jax.random.normal(ks[1], (width,), jnp.float32),
      threshold=threshold * (1.0 + spread * jax.random.normal(ks[2], (width,), jnp.float32)),
      w_dec=jax.random.normal(ks[3], (width, d_out), jnp.float32) / np.sqrt(d_out),
      b_dec=0.1 * jax.random.normal(ks[4], (d_out,), jnp.float32))
  if kind == "sae":
    d = dl.JumpReLUSAE(**w)
  else:
    skip = (jax.random.normal(ks[5], (d_in, d_out), jnp.float32) / np.sqrt(d_in)
            if kind == "affine" else None)
    d = dl.Transcoder(**w, w_skip=skip)
  return d.astype(dtype) if jnp.dtype(dtype) != jnp.float32 else d


def inputs(seed, shape, d_in):
  return jax.random.normal(jax.random.key(seed + 1000), (*shape, d_in), jnp.float32)


def tolerance(compute_dtype):
  return 1e-5 if jnp.dtype(compute_dtype) == jnp.float32 else 2e-2


def margin_ok(d, x, compute_dtype, rel=1e-5):
  """False when a pre-activation sits so close to its threshold that a different (but
  equally valid) summation order could flip it: such inputs have no unique answer."""
  pre = np.asarray(dl.pre_activations(d, x, compute_dtype=compute_dtype), np.float64)
  thr = np.asarray(d.threshold, np.float64)
  scale = 1.0 + np.abs(pre)
  eps = rel if jnp.dtype(compute_dtype) == jnp.float32 else 1e-2
  return bool(np.all(np.abs(pre - thr) > eps * scale))


def assert_close(got, want, rtol):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(1.0, float(np.abs(want).max(initial=0.0)))
  np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)


def check_codes(codes, f, k, rtol):
  """codes (SparseCodes over rows of f) hold f's nonzeros, or its k largest on overflow."""
  f = np.asarray(f, np.float64).reshape(-1, f.shape[-1])
  v = np.asarray(codes.values, np.float64).reshape(-1, k)
  i = np.asarray(codes.indices).reshape(-1, k)
  count = np.asarray(codes.count).reshape(-1)
  over = np.asarray(codes.overflow).reshape(-1)
  nnz = (f != 0).sum(-1)
  np.testing.assert_array_equal(count, nnz)
  np.testing.assert_array_equal(over, nnz > k)
  scale = max(1.0, float(np.abs(f).max(initial=0.0)))
  for r in range(f.shape[0]):
    m = min(nnz[r], k)
    want_idx = np.nonzero(f[r])[0]
    if over[r]:
      want_idx = want_idx[np.argsort(-f[r, want_idx], kind="stable")][:k]
    got = sorted(zip(i[r, :m].tolist(), v[r, :m].tolist()))
    want = sorted(zip(want_idx.tolist(), f[r, want_idx].tolist()))
    assert [g[0] for g in got] == [w[0] for w in want], (r, got, want)
    np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], rtol=0,
                               atol=rtol * scale)
    # Empty slots decode to nothing.
    assert np.all(v[r, m:] == 0) and np.all(i[r, m:] == 0)
