"""Training: ground-truth recovery, determinism, resume, sharding, checkpoints, data sources.

The recovery tests train on synthetic data drawn from a known sparse overcomplete
dictionary, sized to finish in well under a minute each on two CPU cores: they use larger
learning rates, thresholds and bandwidth than the paper's defaults (which are tuned for
100k-step runs), but the properties checked are the real ones.
"""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import Mesh

import dictlearn
from dictlearn import DictMeta, activation_data as ad
from dictlearn.train import TrainConfig, fit, latest_checkpoint, objective, ste

# The two 600-step recovery tests below still use the settings tuned for short runs before
# the data-derived defaults existed (the paper's random decoder start, a fixed 0.5
# threshold start and bandwidth 0.05, one learning rate for the thresholds too, Adam with
# momentum): with the defaults (resampling included) and learning rate 1e-2 they recover
# 78% (SAE) and 79% (transcoder) instead of 90%+. The 3000-step defaults test does not
# need them (benchmarks/RESULTS.md).
SHORT_RUN = dict(threshold_init=0.5, bandwidth=0.05, learning_rate=1e-2, adam_b1=0.9,
                 dec_init="random", threshold_learning_rate=1e-2, progress=False)


def sparse_data(n, n_feat, d, k, seed, mag=(1.0, 2.0)):
  """x (n, d): each row sums k random unit directions of D (n_feat, d), magnitudes U(mag)."""
  rng = np.random.default_rng(seed)
  D = rng.standard_normal((n_feat, d))
  D /= np.linalg.norm(D, axis=1, keepdims=True)
  idx = rng.integers(0, n_feat, size=(n, k))
  a = rng.uniform(*mag, size=(n, k))
  return np.einsum("nk,nkd->nd", a, D[idx]).astype(np.float32), D, idx, a


def recovered(true_dirs, learned_rows, cos=0.9):
  w = np.asarray(learned_rows, np.float64)
  w = w / np.linalg.norm(w, axis=1, keepdims=True)
  return float(np.mean((true_dirs @ w.T).max(axis=1) > cos))


def leaves_equal(a, b):
  return all(np.array_equal(np.asarray(u), np.asarray(v))
             for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.fixture(scope="module")
def tiny():
  x, D, _, _ = sparse_data(4096, 64, 16, 2, seed=1)
  return x


# resample_every: the default interval is longer than these runs; 5 makes them resample
# (steps 5 to 20), so the determinism, resume and sharding tests cover it.
TINY = dict(kind="sae", width=128, target_l0=2, steps=40, batch_size=64, log_every=5,
            learning_rate=1e-2, resample_every=5,
            meta=DictMeta(site="resid_post", layer=3, model_name="toy"), progress=False)


@pytest.fixture(scope="module")
def baseline(tiny):
  """``fit(tiny, **TINY)``, run once for every test that compares against it."""
  return fit(tiny, **TINY)


# --------------------------------------------------------------------- recovery


@pytest.mark.slow
def test_sae_recovers_ground_truth():
  x, D, _, _ = sparse_data(100_000, 1024, 128, 4, seed=0)
  d, h = fit(x, kind="sae", width=2048, target_l0=4, steps=600, batch_size=512,
             **SHORT_RUN)
  assert isinstance(d, dictlearn.JumpReLUSAE) and d.w_dec.shape == (2048, 128)
  frac = recovered(D, d.w_dec)
  assert frac >= 0.9, frac
  l0 = float(dictlearn.metrics.l0(dictlearn.encode(d, x[:8192])))
  assert abs(l0 - 4) <= 0.2 * 4, l0
  assert abs(h["l0"][-1] - 4) <= 0.2 * 4
  fvu = float(dictlearn.metrics.fvu(x[:8192], dictlearn.forward(d, x[:8192])))
  assert fvu < 0.2, fvu
  # history is per logged step, with every documented key
  assert set(h) >= {"step", "loss", "mse", "l0", "dead_fraction", "fvu"}
  assert h["step"][-1] == 600 and np.all(np.diff(h["step"]) > 0)
  assert h["loss"][-1] < h["loss"][0]


def bernoulli_data(n, n_feat, d, l0, seed, mag=(1.0, 2.0)):
  """x (n, d): each of n_feat random unit directions active with probability l0 / n_feat
  in each row, magnitude U(mag) when active; returns (x, directions)."""
  rng = np.random.default_rng(seed)
  D = rng.standard_normal((n_feat, d))
  D /= np.linalg.norm(D, axis=1, keepdims=True)
  x = np.zeros((n, d), np.float32)
  for i in range(0, n, 8192):  # in chunks: (rows, n_feat) at a time
    m = min(8192, n - i)
    a = rng.uniform(*mag, size=(m, n_feat)) * (rng.random((m, n_feat)) < l0 / n_feat)
    x[i:i + m] = a @ D
  return x, D


@pytest.mark.slow
@pytest.mark.parametrize("offset", [0.0, 8.0])
def test_defaults_reach_the_target_and_recover_the_dictionary(offset):
  # What a new user writes: the target, the run's size and the learning rate; every other
  # setting (thresholds, bandwidth, threshold learning rate...) at its default. The offset
  # (in mean row norms) is a common part as in Gemma's residual stream, which a raw encoder
  # fails on (benchmarks/RESULTS.md, "The centred encoder becomes an SAE's default").
  x, D = bernoulli_data(200_000, 512, 64, 4, seed=0)
  x += offset * np.linalg.norm(x, axis=1).mean() * np.ones(64, np.float32) / 8.0
  d, h = fit(x, width=DEFAULT_WIDTH, target_l0=4, steps=3000, batch_size=1024,
             learning_rate=3e-4, progress=False)
  l0 = float(dictlearn.metrics.l0(dictlearn.encode(d, x[:16384])))
  assert abs(l0 - 4) <= 0.2 * 4, l0
  assert recovered(D, d.w_dec) >= 0.9


DEFAULT_WIDTH = 1024


def test_data_start_is_not_captured_by_rare_massive_rows():
  # Gemma's residuals hold rare tokens of ~10x the median norm along one direction (0.02%
  # of the layer-9 tokens of the 270M). 20 such rows in 20k must not pull the data start's
  # latents onto their direction (with raw-row k-means rounds 331 of 512 went there and
  # the start covered 29% of the true directions, not 80%).
  x, D, _, _ = sparse_data(20_000, 256, 32, 3, seed=5)
  rng = np.random.default_rng(1)
  e = np.zeros(32, np.float32)
  e[0] = 1.0
  big = rng.choice(len(x), 20, replace=False)
  x[big] = (30 * np.linalg.norm(x, axis=1).mean() * e
            + rng.standard_normal((20, 32)).astype(np.float32))
  # A learning rate this small returns the start itself.
  d, _ = fit(x, kind="sae", width=512, target_l0=3, steps=1, batch_size=256,
             learning_rate=1e-12, threshold_learning_rate=1e-12, resample_every=0,
             progress=False)
  w = np.asarray(d.w_dec)
  assert int(np.sum(np.abs(w @ e) > 0.9)) <= 5
  assert recovered(D, w) >= 0.7


def transcoder_data(n, seed=0, n_feat=256, d_s=128, d_g=16, d_out=64, k=4, noise=0.1,
                    g_scale=0.3):
  """x = [sparse features (d_s) + noise | dense Gaussian block (d_g)];
  y = sum_j a_j e_j + x @ A: a sparse map of the features plus a linear map of x."""
  rng = np.random.default_rng(seed)
  xs, D, idx, a = sparse_data(n, n_feat, d_s, k, seed)
  E = rng.standard_normal((n_feat, d_out))
  E /= np.linalg.norm(E, axis=1, keepdims=True)
  g = g_scale * rng.standard_normal((n, d_g))
  x = np.concatenate([xs + noise * rng.standard_normal(xs.shape), g], 1).astype(np.float32)
  A = rng.standard_normal((d_s + d_g, d_out)) * 0.5 / np.sqrt(d_s + d_g)
  y = np.einsum("nk,nkd->nd", a, E[idx]) + x @ A
  return x, y.astype(np.float32), E, A


@pytest.mark.slow
def test_transcoder_recovers_sparse_map_and_linear_part():
  x, y, E, A = transcoder_data(100_000)
  d, h = fit(x, targets=y, kind="transcoder", width=1024, target_l0=4, steps=600,
             batch_size=512, **SHORT_RUN)
  assert isinstance(d, dictlearn.Transcoder) and d.w_skip is not None
  assert recovered(E, d.w_dec) >= 0.9
  l0 = float(dictlearn.metrics.l0(dictlearn.encode(d, x[:8192])))
  assert abs(l0 - 4) <= 0.2 * 4, l0
  fvu = float(dictlearn.metrics.fvu(y[:8192], dictlearn.forward(d, x[:8192])))
  assert fvu < 0.1, fvu
  # The dense block reaches y only through the linear part, so the skip must carry it.
  w_g, a_g = np.asarray(d.w_skip)[128:], A[128:]
  assert np.linalg.norm(w_g - a_g) / np.linalg.norm(a_g) < 0.1


def test_deterministic_for_a_seed(tiny, baseline):
  d0, h0 = baseline
  d1, h1 = fit(tiny, **TINY)
  assert leaves_equal(d0, d1)
  assert all(np.array_equal(h0[k], h1[k]) for k in h0)
  d2, _ = fit(tiny, seed=1, **TINY)
  assert not leaves_equal(d0, d2)


# ------------------------------------------------------------ resume, sharding


def test_resume_equals_uninterrupted(tiny, baseline, tmp_path):
  d0, h0 = baseline
  ck = tmp_path / "ck"
  d1, h1 = fit(tiny, checkpoint_dir=ck, checkpoint_every=15, **TINY)
  assert leaves_equal(d0, d1)
  assert sorted(os.listdir(ck)) == ["step_00000030", "step_00000040"]  # keeps the last 2
  # Interrupt: drop the final checkpoint and resume from step 30 (mid log window).
  shutil.rmtree(ck / "step_00000040")
  d2, h2 = fit(tiny, checkpoint_dir=ck, checkpoint_every=15, **TINY)
  assert leaves_equal(d0, d2)
  assert all(np.array_equal(h0[k], h2[k]) for k in h0)
  # Nothing left to do: the finished checkpoint comes straight back.
  d3, h3 = fit(tiny, checkpoint_dir=ck, checkpoint_every=15, **TINY)
  assert leaves_equal(d0, d3) and np.array_equal(h0["loss"], h3["loss"])


def test_resume_says_which_changed_settings_matter(tiny, baseline, tmp_path):
  d0, _ = baseline
  fit(tiny, checkpoint_dir=tmp_path / "a", checkpoint_every=15, **TINY)
  shutil.rmtree(tmp_path / "a" / "step_00000040")
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  # A start-only setting changes nothing once the start is in the checkpoint.
  with pytest.warns(UserWarning, match=r"\['init_samples'\] only decide how a run starts"):
    d1, _ = fit(tiny, checkpoint_dir=tmp_path / "a", checkpoint_every=15,
                **dict(TINY, init_samples=1000))
  assert leaves_equal(d0, d1)
  with pytest.warns(UserWarning, match=r"changed settings \['seed'\]: the result will differ"):
    d2, _ = fit(tiny, checkpoint_dir=tmp_path / "b", checkpoint_every=15, **dict(TINY, seed=1))
  assert not leaves_equal(d0, d2)


def test_resume_across_resamplings_equals_uninterrupted(tiny, tmp_path):
  kw = dict(TINY, resample_until=35)
  d0, h0 = fit(tiny, **kw)
  fit(tiny, checkpoint_dir=tmp_path, checkpoint_every=12, keep_checkpoints=5, **kw)
  for later in ("step_00000024", "step_00000036", "step_00000040"):
    shutil.rmtree(tmp_path / later)
  d1, h1 = fit(tiny, checkpoint_dir=tmp_path, **kw)  # from step 12: resamples 15 to 35
  assert leaves_equal(d0, d1)
  assert all(np.array_equal(h0[k], h1[k]) for k in h0)


def test_resume_refuses_another_shape(tiny, tmp_path):
  fit(tiny, checkpoint_dir=tmp_path, **dict(TINY, steps=5))
  with pytest.raises(ValueError, match="width"):
    fit(tiny, checkpoint_dir=tmp_path, **dict(TINY, steps=10, width=64))


def test_resume_stream_equals_uninterrupted(tiny, tmp_path):
  def batches():  # replayable stream of uneven chunks
    for i in range(0, len(tiny), 300):
      yield tiny[i:i + 300]

  kw = dict(TINY, shuffle_buffer=1024)
  d0, h0 = fit(batches, **kw)
  fit(batches, checkpoint_dir=tmp_path, checkpoint_every=25, **kw)
  shutil.rmtree(tmp_path / "step_00000040")
  d1, h1 = fit(batches, checkpoint_dir=tmp_path, **kw)
  assert leaves_equal(d0, d1)


@pytest.mark.parametrize("shape,width_axis,make", [((8,), None, "Mesh"),
                                                   ((4, 2), "width", "Mesh"),
                                                   ((2,), None, "make_mesh"),
                                                   ((4, 2), "width", "make_mesh")])
def test_sharded_equals_unsharded(tiny, baseline, shape, width_axis, make):
  names = ("data",) if len(shape) == 1 else ("data", "width")
  n = int(np.prod(shape))
  mesh = (jax.make_mesh(shape, names, devices=jax.devices()[:n]) if make == "make_mesh"
          else Mesh(np.array(jax.devices()[:n]).reshape(shape), names))
  d0, h0 = baseline
  d1, h1 = fit(tiny, mesh=mesh, width_axis=width_axis, **TINY)
  for a, b in zip(jax.tree_util.tree_leaves(d0), jax.tree_util.tree_leaves(d1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(h0["loss"], h1["loss"], rtol=1e-4)
  np.testing.assert_array_equal(h0["l0"], h1["l0"])


def test_mesh_batch_must_split(tiny):
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  with pytest.raises(ValueError, match="does not split"):
    fit(tiny, mesh=mesh, **dict(TINY, batch_size=60))


# --------------------------------------------------------- checkpoints on disk


def test_checkpoint_folder_loads_and_names_its_site(tiny, tmp_path):
  d, _ = fit(tiny, checkpoint_dir=tmp_path, **TINY)
  folder = latest_checkpoint(tmp_path)
  assert folder.name == "step_00000040"
  cfg = json.loads((folder / "config.json").read_text())
  assert cfg["architecture"] == "jump_relu" and cfg["type"] == "sae"
  assert cfg["hf_hook_point_in"] == "model.layers.3.output" and cfg["width"] == 128
  assert cfg["model_name"] == "toy" and cfg["l0"] == 2
  loaded = dictlearn.load(folder)
  assert loaded.meta.site == "resid_post" and loaded.meta.layer == 3
  assert d.meta.site == "resid_post"
  np.testing.assert_array_equal(np.asarray(loaded.w_enc), np.asarray(d.w_enc))
  np.testing.assert_allclose(np.asarray(dictlearn.forward(loaded, tiny[:64])),
                             np.asarray(dictlearn.forward(d, tiny[:64])), rtol=1e-6)


def test_transcoder_checkpoint_is_affine(tmp_path):
  x, y, _, _ = transcoder_data(2048, d_s=16, d_g=4, d_out=8, n_feat=32)
  d, _ = fit(x, targets=y, kind="transcoder", width=64, target_l0=2, steps=6, batch_size=32,
             learning_rate=1e-2, checkpoint_dir=tmp_path, meta=DictMeta(site="mlp_in", layer=5),
             progress=False)
  loaded = dictlearn.load(latest_checkpoint(tmp_path))
  assert isinstance(loaded, dictlearn.Transcoder) and loaded.w_skip is not None
  assert loaded.meta.site == "mlp_in" and loaded.meta.site_out == "mlp_out"
  assert loaded.meta.layer == 5


# ------------------------------------------------------------------ recipe parts


def test_normalisation_is_folded_into_the_weights(tiny):
  # Scaling the data by a power of two scales the normalisation by its inverse exactly, so
  # training is bit-identical and the saved dictionary must simply work on the raw scale.
  kw = dict(TINY, steps=10)
  d, _ = fit(tiny, **kw)
  big, _ = fit(tiny * 1024.0, **kw)
  np.testing.assert_array_equal(np.asarray(big.w_dec), np.asarray(d.w_dec))
  np.testing.assert_array_equal(np.asarray(dictlearn.forward(big, tiny[:64] * 1024.0)),
                                1024.0 * np.asarray(dictlearn.forward(d, tiny[:64])))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(d.w_dec), axis=1), 1.0, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), s_in=st.floats(0.01, 100.0), s_out=st.floats(0.01, 100.0),
       kind=st.sampled_from(["sae", "transcoder"]))
def test_encoder_center_is_folded_into_the_bias(seed, s_in, s_out, kind):
  # Training encodes (s_in x - c); the saved dictionary reads raw x and must give the same
  # latents (divided by s_out, as the scales are folded) and the same output.
  rng = np.random.default_rng(seed)
  d_in, width = 8, 16
  d_out = d_in if kind == "sae" else 5
  params = {"w_enc": rng.normal(size=(d_in, width)), "b_enc": rng.normal(size=width),
            "log_threshold": rng.normal(size=width) - 1.0,
            "w_dec": rng.normal(size=(width, d_out)), "b_dec": rng.normal(size=d_out)}
  if kind == "transcoder":
    params["w_skip"] = rng.normal(size=(d_in, d_out))
  params = {k: v.astype(np.float32) for k, v in params.items()}
  center = rng.normal(size=d_in).astype(np.float32) * 3
  x = rng.normal(size=(32, d_in)).astype(np.float32) * 2 + 5
  d = objective.to_dictionary(params, s_in=s_in, s_out=s_out, kind=kind,
                              meta=DictMeta(), center=center)
  xn = x * np.float32(s_in)
  pre = (xn - center) @ params["w_enc"] + params["b_enc"]
  f = np.where(pre > np.exp(params["log_threshold"]), pre, 0.0)
  y = f @ params["w_dec"] + params["b_dec"]
  if kind == "transcoder":
    y = y + xn @ params["w_skip"]
  np.testing.assert_allclose(np.asarray(dictlearn.encode(d, x)) * s_out, f, rtol=1e-4,
                             atol=1e-4 * np.abs(pre).max())
  np.testing.assert_allclose(np.asarray(dictlearn.forward(d, x)) * s_out, y, rtol=1e-4,
                             atol=1e-4 * np.abs(y).max())


def test_encoder_center_keeps_latents_alive_under_a_common_offset():
  # Gemma's residuals share a large common part (layer 9 of the 270M: the mean is 97% of a
  # row's norm). Read raw, every firing row's encoder gradient carries it, and most
  # latents die; centred, the same run keeps them and reconstructs better.
  x, _, _, _ = sparse_data(8192, 64, 32, 3, seed=2)
  x = x + 8.0 * np.ones(32, np.float32) / np.sqrt(32) * np.linalg.norm(x, axis=1).mean()
  kw = dict(kind="sae", width=64, target_l0=3, steps=600, batch_size=256,
            learning_rate=3e-3, progress=False)
  out = {}
  for c in (False, True):
    d, h = fit(x, encoder_center=c, **kw)
    r = np.asarray(dictlearn.forward(d, x))
    out[c] = (float(np.sum((r - x) ** 2) / np.sum((x - x.mean(0)) ** 2)),
              h["dead_fraction"][-1], h["l0"][-1])
    np.testing.assert_allclose(out[c][0], h["fvu"][-1], rtol=0.05)  # saved = trained
  assert out[True][1] < 0.15 and out[False][1] > 0.3  # seeds 0, 1: 2-6% against 45-48%
  assert out[True][0] < 0.6 * out[False][0]
  assert abs(out[True][2] / 3 - 1) < 0.2


def test_pseudo_derivatives():
  z = np.array([[0.0, 0.98, 1.02, 2.0]], np.float32)
  theta = np.ones_like(z)
  eps = 0.1
  f, vjp = jax.vjp(lambda z, t: ste.jumprelu(z, t, eps), z, theta)
  np.testing.assert_array_equal(f, np.where(z > 1, z, 0))
  dz, dt = vjp(np.ones_like(z))
  np.testing.assert_array_equal(dz, [[0, 0, 1, 1]])
  # -(theta/eps) K((z - theta)/eps): nonzero only within eps/2 of the threshold
  np.testing.assert_allclose(dt, [[0, -10, -10, 0]])
  h, vjp = jax.vjp(lambda z, t: ste.heaviside(z, t, eps), z, theta)
  np.testing.assert_array_equal(h, [[0, 0, 1, 1]])
  dz, dt = vjp(np.full_like(z, 2.0))
  np.testing.assert_array_equal(dz, 0)
  np.testing.assert_allclose(dt, [[0, -20, -20, 0]])


def test_matryoshka_loss_sums_prefixes():
  key = jax.random.key(0)
  params = objective.init_params(key, d_in=8, d_out=8, width=16, kind="sae", affine=False,
                                 threshold_init=0.01, encoder_scale=1.0, b_dec=np.zeros(8))
  x = np.asarray(jax.random.normal(jax.random.key(1), (32, 8)))
  kw = dict(coeff=0.0, target_l0=None, eps=0.01)
  full, aux = objective.loss_fn(params, x, x, bounds=(16,), **kw)
  both, aux2 = objective.loss_fn(params, x, x, bounds=(4, 16), **kw)
  pre = x @ np.asarray(params["w_enc"])
  f = np.where(pre > 0.01, pre, 0)
  y4 = f[:, :4] @ np.asarray(params["w_dec"])[:4]
  sse4 = np.mean(np.sum((y4 - x) ** 2, -1))
  np.testing.assert_allclose(both, full + sse4, rtol=1e-5)
  assert objective.prefix_bounds(16, [8, 4]) == (4, 8, 16)
  with pytest.raises(ValueError):
    objective.prefix_bounds(16, [32])


def test_matryoshka_fit_makes_prefixes_reconstruct(tiny):
  kw = dict(TINY, steps=60)
  plain, _ = fit(tiny, **kw)
  nested, h = fit(tiny, matryoshka=[32], **kw)
  assert np.all(np.isfinite(h["loss"]))

  def prefix_fvu(d, m=32):
    f = np.asarray(dictlearn.encode(d, tiny))
    y = f[:, :m] @ np.asarray(d.w_dec)[:m] + np.asarray(d.b_dec)
    return float(dictlearn.metrics.fvu(tiny, y))

  assert prefix_fvu(nested) < prefix_fvu(plain)


def test_dead_latents_are_counted():
  # 4 directions only, 256 latents: most latents find nothing to fire on.
  x, _, _, _ = sparse_data(4096, 4, 16, 1, seed=2)
  _, h = fit(x, **dict(TINY, width=256, target_l0=1, steps=60, meta=None,
                       dead_window_tokens=640))
  assert h["dead_fraction"][0] == 0.0  # nothing can be dead before the window has passed
  assert h["dead_fraction"][-1] > 0.5


@pytest.mark.parametrize("kind", ["sae", "transcoder"])
def test_resampling_restarts_only_the_rare_latents(kind):
  from dictlearn.train import initial_state, make_optimizer
  from dictlearn.train.init import estimate_init
  from dictlearn.train.resample import key_at, make_resample
  from dictlearn.activation_data import as_source

  x, y, _, _ = transcoder_data(512, d_s=16, d_g=4, d_out=8, n_feat=32)
  y = x if kind == "sae" else y
  cfg = TrainConfig(kind=kind, width=64, target_l0=2, steps=100, batch_size=128,
                    learning_rate=1e-2, resample_every=10, init_samples=256).resolve(
                        as_source(x, None if kind == "sae" else y))
  opt = make_optimizer(cfg)
  init = estimate_init(as_source(x, None if kind == "sae" else y), cfg)
  state = initial_state(cfg, opt, init)
  # Adam moments made nonzero, every latent firing often except latents 3 and 40.
  state["opt"] = jax.tree_util.tree_map(
      lambda a: a + 1 + np.arange(a.size).reshape(a.shape) % 7 if a.dtype == np.float32 else a,
      state["opt"])
  before = {tuple(map(str, p)): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(state["opt"])}
  counts = np.full(64, 1000, np.int32)
  counts[[3, 40]] = [0, 3]  # below 0.1 * (2 / 64) * 10 * 128 = 4 rows
  state["fired_rows"] = jax.numpy.asarray(counts)
  scales = np.asarray([init.s_in, init.s_out], np.float32)
  new = make_resample(cfg)(state, x[:128], y[:128], scales, key_at(cfg, 10))
  p0, p1 = state["params"], new["params"]
  changed = np.flatnonzero(np.any(np.asarray(p0["w_dec"]) != np.asarray(p1["w_dec"]), 1))
  np.testing.assert_array_equal(changed, [3, 40])
  for k in ("w_enc", "b_enc", "log_threshold"):
    a, b = np.asarray(p0[k]), np.asarray(p1[k])
    keep = np.setdiff1d(np.arange(64), [3, 40])
    np.testing.assert_array_equal(a[..., keep], b[..., keep])
  np.testing.assert_allclose(np.linalg.norm(np.asarray(p1["w_dec"]), axis=1), 1, rtol=1e-5)
  assert np.all(np.isfinite(np.asarray(p1["log_threshold"])))
  assert np.all(np.asarray(new["fired_rows"]) == 0)
  # Restarted latents: Adam's moments zeroed; the kept latents' untouched.
  for path, leaf in jax.tree_util.tree_leaves_with_path(new["opt"]):
    name = getattr(path[-1], "key", None)
    if name not in ("w_dec", "w_enc"):
      continue
    old, leaf = before[tuple(map(str, path))], np.asarray(leaf)
    axis = 0 if name == "w_dec" else 1
    old, leaf = np.moveaxis(old, axis, 0), np.moveaxis(leaf, axis, 0)
    np.testing.assert_array_equal(leaf[keep], old[keep])
    assert np.all(leaf[[3, 40]] == 0)


def test_fixed_coefficient_penalty(tiny):
  _, weak = fit(tiny, **dict(TINY, target_l0=None, sparsity_coeff=0.01, steps=40))
  _, strong = fit(tiny, **dict(TINY, target_l0=None, sparsity_coeff=1.0, steps=40))
  assert strong["l0"][-1] < weak["l0"][-1]


def test_bad_arguments(tiny):
  with pytest.raises(ValueError, match="kind"):
    fit(tiny, **dict(TINY, kind="crosscoder"))
  with pytest.raises(ValueError, match="target_l0"):
    fit(tiny, **dict(TINY, target_l0=None))
  with pytest.raises(ValueError, match="targets are for transcoders"):
    fit(tiny, targets=tiny, **TINY)
  with pytest.raises(ValueError, match="needs targets"):
    fit(tiny, **dict(TINY, kind="transcoder"))
  with pytest.raises(ValueError, match="pair up"):
    fit(tiny, targets=tiny[:10], **dict(TINY, kind="transcoder"))
  with pytest.raises(TypeError, match="data must be"):
    fit(3.0, **TINY)


# ------------------------------------------------------------------ data sources


def test_fit_reads_a_shard_folder_and_a_memmap(tiny, baseline, tmp_path):
  folder = tmp_path / "resid_post_3"
  with ad.ShardWriter(folder, d=16, site="resid_post", layer=3, model_name="toy",
                      hook_point="model.layers.3.output", shard_rows=1000) as w:
    w.append(tiny)
  mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32,
                                 shape=tiny.shape)
  mm[:] = tiny
  mm.flush()
  kw = dict(TINY, meta=None)
  d0, _ = baseline  # meta does not change the weights
  d1, _ = fit(str(folder), **kw)
  d2, _ = fit(np.load(tmp_path / "x.npy", mmap_mode="r"), **kw)
  assert leaves_equal(d0, d1) and leaves_equal(d0, d2)  # same rows, same order
  assert d1.meta.site == "resid_post" and d1.meta.layer == 3 and d1.meta.model_name == "toy"


def test_transcoder_from_pair_batches():
  x, y, _, _ = transcoder_data(2048, d_s=16, d_g=4, d_out=8, n_feat=32)
  batches = [(x[i:i + 256], y[i:i + 256]) for i in range(0, 2048, 256)]
  d, h = fit(iter(batches), kind="transcoder", width=64, target_l0=2, steps=4,
             batch_size=64, shuffle_buffer=256, learning_rate=1e-2, progress=False)
  assert d.d_in == 20 and d.d_out == 8 and len(h["step"]) >= 1


# ------------------------------------------------------------------------ config


def test_config_object_and_overrides_agree(tiny, baseline):
  kw = {k: v for k, v in TINY.items() if k not in ("meta", "progress")}
  cfg = TrainConfig(**kw)
  d, h = fit(tiny, cfg, progress=False)
  assert leaves_equal(d, baseline[0]) and np.array_equal(h["loss"], baseline[1]["loss"])
  with pytest.raises(TypeError, match="unknown training setting.*'widht'.*width"):
    fit(tiny, cfg, widht=3)


def test_resolve_fills_every_derived_default_once():
  cfg = TrainConfig(width=64, steps=3000, batch_size=8, learning_rate=3e-4, target_l0=4,
                    d_in=16).resolve()
  off = ("threshold_init", "grad_clip", "loss_norm_cap")  # None there means off
  assert all(getattr(cfg, f.name) is not None for f in dataclasses.fields(cfg)
             if f.name not in off)
  assert cfg.resolve() == cfg
  assert cfg.d_out == 16 and cfg.sparsity_coeff == 4.0 and cfg.affine is False
  assert cfg.warmup_steps == 150 and cfg.sparsity_warmup_steps == 300
  assert cfg.threshold_learning_rate == pytest.approx(10 / 3000)
  assert cfg.encoder_center is True  # an SAE's default
  assert cfg.init_firing_rate == pytest.approx(2 * 4 / 64)  # a centred start: 2x the target
  assert cfg.dead_window_tokens == 2400  # a tenth of 3000 x 8 tokens
  raw = cfg.replace(init_firing_rate=None, encoder_center=False).resolve()
  assert raw.init_firing_rate == 0.5  # min(0.5, 10 * 4 / 64)
  tc = TrainConfig(kind="transcoder", width=64, steps=3000, batch_size=8, learning_rate=3e-4,
                   target_l0=4, d_in=16, d_out=8).resolve()
  assert tc.encoder_center is False and tc.init_firing_rate == 0.5
  with pytest.raises(ValueError, match="width must be a positive integer"):
    TrainConfig(steps=1, batch_size=1, learning_rate=1.0, target_l0=1, d_in=4).resolve()


def test_compile_key_comes_from_field_metadata():
  cfg = TrainConfig(width=64, steps=100, batch_size=8, learning_rate=1e-3, target_l0=4,
                    d_in=16).resolve()
  init_only = {f.name for f in dataclasses.fields(cfg) if not f.metadata.get("step", True)}
  assert {"seed", "threshold_init", "b_dec_init", "init_samples"} <= init_only
  assert "bandwidth" not in init_only and "learning_rate" not in init_only
  assert cfg.replace(seed=5, init_samples=10).step_key() == cfg.step_key()
  assert cfg.replace(bandwidth=0.5).step_key() != cfg.step_key()


def test_logged_fvu_weighs_rows_as_a_corpus_fvu_does():
  # A few rows far larger than the rest (as Gemma's massive activations are): the logged
  # FVU must be the window's summed error over its summed variance, the FVU of the rows
  # it trained on, not a mean of per-batch ratios, which a batch holding a big row sways.
  x, _, _, _ = sparse_data(4096, 64, 16, 2, seed=3)
  rng = np.random.default_rng(0)
  big = rng.choice(len(x), 6, replace=False)
  x[big] = 40.0 * rng.standard_normal((6, 16)).astype(np.float32)
  # A learning rate this small leaves the dictionary at its start, so the one window of
  # 16 steps x 256 rows (every row once) is scored by the dictionary fit returns.
  d, h = fit(x, kind="sae", width=64, target_l0=2, steps=16, batch_size=256, log_every=16,
             learning_rate=1e-12, threshold_learning_rate=1e-12, resample_every=0,
             progress=False)
  direct = float(dictlearn.metrics.fvu(x, dictlearn.forward(d, x)))
  # Each batch is centred on its own mean, which leaves out about 1/batch_size of the
  # variance.
  np.testing.assert_allclose(h["fvu"][-1], direct, rtol=0.02)


@settings(max_examples=25, deadline=None)
@given(cap=st.floats(0.5, 8.0), scale=st.floats(0.1, 100.0), seed=st.integers(0, 99))
def test_loss_norm_cap_counts_a_massive_row_as_a_row_at_the_cap(cap, scale, seed):
  # Each row's squared error is weighted; a row above cap * sqrt(d) counts as the same row
  # scaled down to that norm (same relative error), a row under it counts in full.
  key = jax.random.key(seed)
  d = 8
  params = objective.init_params(key, d_in=d, d_out=d, width=16, kind="sae", affine=False,
                                 threshold_init=0.01, encoder_scale=1.0, b_dec=np.zeros(d))
  x = np.asarray(jax.random.normal(jax.random.key(seed + 1), (1, d)))
  x = (x / np.linalg.norm(x) * scale * np.sqrt(d)).astype(np.float32)
  w = objective.row_weights(x, cap)
  kw = dict(coeff=0.0, target_l0=None, eps=0.01, bounds=(16,))
  plain, aux = objective.loss_fn(params, x, x, **kw)
  weighted, aux_w = objective.loss_fn(params, x, x, weights=w, **kw)
  np.testing.assert_allclose(aux_w["sse"], aux["sse"], rtol=1e-6)  # metrics unweighted
  np.testing.assert_allclose(weighted, plain * min(1.0, (cap / scale) ** 2), rtol=1e-4)
  assert objective.row_weights(x, None) is None


def test_loss_norm_cap_is_validated():
  with pytest.raises(ValueError, match="loss_norm_cap"):
    TrainConfig(width=8, steps=1, batch_size=8, learning_rate=1e-3, target_l0=2,
                loss_norm_cap=0.0, d_in=8).resolve()
