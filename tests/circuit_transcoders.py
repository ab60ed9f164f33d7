"""Seeded random transcoders for the circuit-tracer attribution-graph fixtures.

numpy only (no dictlearn, jax or torch), so both scripts/make_circuit_fixtures.py
(in its torch side venv) and the JAX tests import it and rebuild the very same
weights; nothing but the seed, the width and a few per-layer scalars is
committed (tests/fixtures/circuits/{case}.npz carries them).

Layout is Gemma Scope 2's (what SAELens and circuit-tracer's Gemma Scope 2
loaders read), for Gemma 3 270M (d_model 640, 18 layers):

- per-layer transcoder (``make_plt``): one dict per layer L with
  ``w_enc (640, W)``, ``b_enc (W,)``, ``threshold (W,)``, ``w_dec (W, 640)``,
  ``b_dec (640,)`` and, with ``skip=True``, ``affine_skip_connection
  (640, 640)``; it reads the output of layer L's ``pre_feedforward_layernorm``
  and writes the output of its ``post_feedforward_layernorm``:
  ``out = jumprelu(x @ w_enc + b_enc) @ w_dec + b_dec (+ x @ affine_skip_connection)``
  with ``jumprelu(p) = p * (p > threshold)``.
- cross-layer transcoder (``make_clt``): one dict per source layer i with
  ``w_enc (640, W)``, ``b_enc (W,)``, ``threshold (W,)``, ``w_dec (W, 18, 640)``
  (output layers j < i are exactly zero and unused) and ``b_dec (640,)`` (the
  bias of output layer i). Output of layer j:
  ``sum_{i <= j} a_i @ w_dec_i[:, j] + b_dec_j``.

Scales come from the caller (the fixture script measures them on the real
model and stores them): pre-activations are about ``N(0, 1) * enc_scale[L] *
rms(x)``, every decoder row has norm ``dec_scale[L]``, and the skip matrix has
entries ``N(0, 1) * skip_scale[L] / sqrt(640)``. Thresholds are given per
layer and latent ``(n_layers, W)``.

Every array is drawn from its own ``np.random.default_rng([seed, kind, layer])``
stream in float64 and cast to float32, so the result does not depend on the
order of calls. ``fingerprint`` sums each array in float64; the fixtures store
it so a test can tell a changed numpy random stream from a real mismatch.
"""

import numpy as np

D_MODEL = 640
N_LAYERS = 18
F32 = np.float32

_KIND = {"w_enc": 1, "b_enc": 2, "w_dec": 3, "b_dec": 4, "skip": 5}


def _rng(seed, kind, layer):
  return np.random.default_rng([int(seed), _KIND[kind], int(layer)])


def _unit_rows(a):
  return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _check(thresholds, scales, width, n_layers):
  thresholds = np.asarray(thresholds, F32)
  assert thresholds.shape == (n_layers, width), thresholds.shape
  for name, s in scales.items():
    s = np.asarray(s, np.float64)
    assert s.shape == (n_layers,), (name, s.shape)
  return thresholds


def encoder(seed, layer, width, enc_scale, d_model=D_MODEL):
  """w_enc (d_model, width) and b_enc (width,) of one layer (shared by both kinds)."""
  w = _rng(seed, "w_enc", layer).standard_normal((d_model, width))
  w_enc = (w * (float(enc_scale) / np.sqrt(d_model))).astype(F32)
  b_enc = (0.1 * _rng(seed, "b_enc", layer).standard_normal(width)).astype(F32)
  return w_enc, b_enc


def make_plt(seed, thresholds, width, enc_scale, dec_scale, skip_scale=None,
             n_layers=N_LAYERS, d_model=D_MODEL):
  """Per-layer transcoders: a list of n_layers dicts in the Gemma Scope 2 layout.

  skip_scale None: no affine skip connection (the ``noskip`` case).
  """
  scales = {"enc_scale": enc_scale, "dec_scale": dec_scale}
  if skip_scale is not None:
    scales["skip_scale"] = skip_scale
  thresholds = _check(thresholds, scales, width, n_layers)
  out = []
  for L in range(n_layers):
    w_enc, b_enc = encoder(seed, L, width, enc_scale[L], d_model)
    w_dec = _unit_rows(_rng(seed, "w_dec", L).standard_normal((width, d_model)))
    w_dec = (w_dec * float(dec_scale[L])).astype(F32)
    b_dec = (0.002 * float(dec_scale[L])
             * _rng(seed, "b_dec", L).standard_normal(d_model)).astype(F32)
    p = {"w_enc": w_enc, "b_enc": b_enc, "threshold": thresholds[L].copy(),
         "w_dec": w_dec, "b_dec": b_dec}
    if skip_scale is not None:
      s = _rng(seed, "skip", L).standard_normal((d_model, d_model))
      p["affine_skip_connection"] = (
        s * (float(skip_scale[L]) / np.sqrt(d_model))).astype(F32)
    out.append(p)
  return out


def make_clt(seed, thresholds, width, enc_scale, dec_scale,
             n_layers=N_LAYERS, d_model=D_MODEL):
  """Cross-layer transcoder: a list of n_layers dicts in the Gemma Scope 2 layout.

  Source layer i's decoder ``w_dec (width, n_layers, d_model)`` is zero for
  output layers j < i; each used row ``w_dec[f, j]`` has norm ``dec_scale[j] /
  sqrt(j - i + 1)`` so a feature's total write stays comparable across layers.
  """
  thresholds = _check(thresholds, {"enc_scale": enc_scale, "dec_scale": dec_scale},
                      width, n_layers)
  out = []
  for i in range(n_layers):
    w_enc, b_enc = encoder(seed, i, width, enc_scale[i], d_model)
    w_dec = np.zeros((width, n_layers, d_model), F32)
    d = _unit_rows(_rng(seed, "w_dec", i).standard_normal((width, n_layers - i, d_model)))
    for k, j in enumerate(range(i, n_layers)):
      w_dec[:, j] = (d[:, k] * (float(dec_scale[j]) / np.sqrt(k + 1))).astype(F32)
    b_dec = (0.002 * float(dec_scale[i])
             * _rng(seed, "b_dec", i).standard_normal(d_model)).astype(F32)
    out.append({"w_enc": w_enc, "b_enc": b_enc, "threshold": thresholds[i].copy(),
                "w_dec": w_dec, "b_dec": b_dec})
  return out


def fingerprint(params):
  """(n_layers, n_arrays) float64 sums of every array, keys in sorted order."""
  keys = sorted(params[0])
  return np.array([[float(np.sum(p[k], dtype=np.float64)) for k in keys]
                   for p in params]), keys


def choose_thresholds(pre, seed, target=1.5, min_margin=0.05):
  """(n_layers, W) thresholds from pre-activations (n_layers, n_pos, W).

  BOS (position 0) is left out: circuit-tracer zeroes its features. Each
  latent gets its own threshold: the midpoint of the widest-enough gap in its
  sorted pre-activations that is nearest to a per-latent target (a layer-wide
  quantile giving `target` firing latents per position, jittered +-15%).
  """
  n_layers, n_pos, width = pre.shape
  p = pre[:, 1:].astype(np.float64)
  rng = np.random.default_rng([int(seed), 99])
  thr = np.zeros((n_layers, width), np.float32)
  q = 1.0 - target / width
  for L in range(n_layers):
    base = max(float(np.quantile(p[L], q)), 1.0)
    for f in range(width):
      v = np.sort(p[L, :, f])
      goal = base * rng.uniform(0.85, 1.15)
      cands = [v[-1] + 2 * min_margin]  # above every value: never fires
      cands += [(a + b) / 2 for a, b in zip(v[:-1], v[1:])
                if b - a >= 2 * min_margin and (a + b) / 2 > 0.5]
      cands = np.array(cands)
      t = np.float32(cands[np.argmin(np.abs(cands - goal))])
      assert np.abs(p[L, :, f] - float(t)).min() >= min_margin * 0.999
      thr[L, f] = t
  return thr
