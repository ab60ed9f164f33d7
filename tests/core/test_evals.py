"""dictlearn.evals against an independent float64 numpy computation over the whole
corpus at once; streaming (any batch split) gives the same numbers; edge cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import dictlearn
from dictlearn import evals

B, S, D, V, W = 6, 9, 8, 13, 24


def _corpus(seed=0):
  """Rows (B, S) with right padding (one row all padding), logits, activations."""
  rng = np.random.default_rng(seed)
  lengths = np.array([S, S, 5, 2, 0, 7])
  tokens = rng.integers(1, V, size=(B, S)).astype(np.int32)
  positions = np.where(np.arange(S) < lengths[:, None], np.arange(S), -1).astype(np.int32)
  tokens[positions < 0] = 0
  clean = rng.normal(size=(B, S, V)).astype(np.float32) * 2
  spliced = (clean + 0.3 * rng.normal(size=clean.shape)).astype(np.float32)
  ablated = (clean + 2.0 * rng.normal(size=clean.shape)).astype(np.float32)
  x = (rng.normal(size=(B, S, D)) * 3 + 5).astype(np.float32)
  d = dictlearn.random_dictionary(jax.random.key(seed), D, W, threshold=0.5)
  return dict(tokens=tokens, positions=positions, clean=clean, spliced=spliced,
              ablated=ablated, x=x, d=d)


def _run(c, splits):
  """CorpusEval over row batches [splits[i], splits[i+1])."""
  ev = evals.CorpusEval({"d": W}, {"d": "site"})
  for lo, hi in zip(splits[:-1], splits[1:]):
    if hi == lo:
      continue
    sl = slice(lo, hi)
    tok, pos = jnp.asarray(c["tokens"][sl]), jnp.asarray(c["positions"][sl])
    clean = jnp.asarray(c["clean"][sl])
    x = jnp.asarray(c["x"][sl])
    y, codes = dictlearn.encode_decode(c["d"], x)
    ev.add_ablation("site", clean, jnp.asarray(c["ablated"][sl]), tok, pos)
    ev.add_dictionary("d", clean, jnp.asarray(c["spliced"][sl]), tok, pos, x, y, codes)
  return ev


def _log_softmax(z):
  z = z.astype(np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _numpy_reference(c):
  pos, tok = c["positions"], c["tokens"]
  pred = (pos[:, :-1] > 0) & (pos[:, 1:] >= 0)
  lc = _log_softmax(c["clean"][:, :-1])
  nxt = tok[:, 1:]

  def ce(logits):
    lp = _log_softmax(logits[:, :-1])
    return -np.take_along_axis(lp, nxt[..., None], -1)[..., 0][pred].mean()

  def kl(logits):
    lp = _log_softmax(logits[:, :-1])
    return (np.exp(lc) * (lc - lp)).sum(-1)[pred].mean()

  ce_c, ce_s, ce_a = ce(c["clean"]), ce(c["spliced"]), ce(c["ablated"])
  kl_s, kl_a = kl(c["spliced"]), kl(c["ablated"])
  d = c["d"]
  keep = pos > 0
  x = c["x"][keep].astype(np.float64)
  pre = x @ np.asarray(d.w_enc, np.float64) + np.asarray(d.b_enc, np.float64)
  f = np.where(pre > np.asarray(d.threshold, np.float64), pre, 0.0)
  y = f @ np.asarray(d.w_dec, np.float64) + np.asarray(d.b_dec, np.float64)
  fvu = ((x - y) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
  nx, ny = np.linalg.norm(x, axis=-1), np.linalg.norm(y, axis=-1)
  return dict(ce_score=(ce_a - ce_s) / (ce_a - ce_c), kl_score=(kl_a - kl_s) / kl_a,
              ce_clean=ce_c, ce_sae=ce_s, ce_abl=ce_a, kl_sae=kl_s, kl_abl=kl_a,
              ev=1 - fvu, fvu=fvu, l0=(f != 0).sum(-1).mean(), l1=np.abs(f).sum(-1).mean(),
              density=(f != 0).mean(0), mse=((x - y) ** 2).mean(),
              cossim=((x * y).sum(-1) / (nx * ny)).mean(), l2_ratio=(ny / nx).mean(),
              rrb=(ny ** 2).mean() / (x * y).sum(-1).mean(), n_tok=keep.sum(),
              n_pred=pred.sum())


def _assert_matches(m, ref, dens):
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)  # noqa: E731
  close(m["model_performance_preservation"]["ce_loss_score"], ref["ce_score"])
  close(m["model_performance_preservation"]["ce_loss_without_sae"], ref["ce_clean"])
  close(m["model_performance_preservation"]["ce_loss_with_sae"], ref["ce_sae"])
  close(m["model_performance_preservation"]["ce_loss_with_ablation"], ref["ce_abl"])
  close(m["model_behavior_preservation"]["kl_div_score"], ref["kl_score"])
  close(m["model_behavior_preservation"]["kl_div_with_sae"], ref["kl_sae"])
  close(m["model_behavior_preservation"]["kl_div_with_ablation"], ref["kl_abl"])
  close(m["reconstruction_quality"]["explained_variance"], ref["ev"])
  close(m["misc_metrics"]["fvu"], ref["fvu"])
  close(m["reconstruction_quality"]["mse"], ref["mse"])
  close(m["reconstruction_quality"]["cossim"], ref["cossim"])
  close(m["shrinkage"]["l2_ratio"], ref["l2_ratio"])
  close(m["shrinkage"]["relative_reconstruction_bias"], ref["rrb"])
  close(m["sparsity"]["l0"], ref["l0"])
  close(m["sparsity"]["l1"], ref["l1"])
  np.testing.assert_array_equal(dens, ref["density"])
  assert m["token_stats"]["total_tokens_eval_reconstruction"] == ref["n_tok"]
  assert m["token_stats"]["total_predictions_eval_loss"] == ref["n_pred"]
  assert m["misc_metrics"]["dead_fraction"] == np.mean(ref["density"] == 0)
  assert m["misc_metrics"]["dense_fraction"] == np.mean(ref["density"] > 0.1)
  assert sum(m["latent_density_histogram"]["counts"]) == W


def test_matches_numpy_over_the_whole_corpus():
  c = _corpus()
  ev = _run(c, [0, 2, 5, B])
  ref = _numpy_reference(c)
  assert 0 < ref["ce_score"] < 1 and 0 < ref["kl_score"] < 1
  _assert_matches(ev.results()["d"], ref, ev.densities("d"))


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(0, B), min_size=0, max_size=4), st.integers(0, 3))
def test_any_batch_split_gives_the_same_numbers(cuts, seed):
  c = _corpus(seed)
  ref = _numpy_reference(c)
  ev = _run(c, [0, *sorted(cuts), B])
  _assert_matches(ev.results()["d"], ref, ev.densities("d"))


def test_prediction_mask_definition():
  pos = jnp.asarray([[0, 1, 2, 3, -1, -1], [-1, -1, 0, 1, 2, -1]])
  # t counts when t is neither BOS nor padding and t + 1 is not padding.
  np.testing.assert_array_equal(evals.prediction_mask(pos),
                                [[0, 1, 1, 0, 0], [0, 0, 0, 1, 0]])
  np.testing.assert_array_equal(evals.token_mask(pos), [[0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0]])


def test_exact_dictionary_scores_one_and_zero_output_scores_zero():
  c = _corpus()
  ev = evals.CorpusEval({"exact": W, "zero": W}, {"exact": "s", "zero": "s"})
  tok, pos, clean = map(jnp.asarray, (c["tokens"], c["positions"], c["clean"]))
  x = jnp.asarray(c["x"])
  _, codes = dictlearn.encode_decode(c["d"], x)
  ev.add_ablation("s", clean, jnp.asarray(c["ablated"]), tok, pos)
  ev.add_dictionary("exact", clean, clean, tok, pos, x, x, codes)
  ev.add_dictionary("zero", clean, jnp.asarray(c["ablated"]), tok, pos, x, jnp.zeros_like(x),
                    codes)
  r = ev.results()
  assert r["exact"]["model_performance_preservation"]["ce_loss_score"] == pytest.approx(1)
  assert r["exact"]["model_behavior_preservation"]["kl_div_score"] == pytest.approx(1)
  assert r["exact"]["reconstruction_quality"]["explained_variance"] == pytest.approx(1)
  assert r["exact"]["shrinkage"]["relative_reconstruction_bias"] == pytest.approx(1)
  assert r["zero"]["model_performance_preservation"]["ce_loss_score"] == 0
  assert r["zero"]["model_behavior_preservation"]["kl_div_score"] == 0
  assert r["zero"]["shrinkage"]["l2_ratio"] == 0


def test_nan_logits_at_padding_do_not_leak():
  c = _corpus()
  bad = c["spliced"].copy()
  bad[c["positions"] < 0] = np.nan
  c2 = dict(c, spliced=bad)
  m = _run(c2, [0, B]).results()["d"]
  _assert_matches(m, _numpy_reference(c), _run(c, [0, B]).densities("d"))


def test_an_ablation_that_changes_nothing_gives_no_score():
  c = _corpus()
  ev = evals.CorpusEval({"d": W}, {"d": "s"})
  tok, pos, clean = map(jnp.asarray, (c["tokens"], c["positions"], c["clean"]))
  x = jnp.asarray(c["x"])
  y, codes = dictlearn.encode_decode(c["d"], x)
  ev.add_ablation("s", clean, clean, tok, pos)
  ev.add_dictionary("d", clean, jnp.asarray(c["spliced"]), tok, pos, x, y, codes)
  m = ev.results()["d"]
  assert m["model_performance_preservation"]["ce_loss_score"] is None
  assert m["model_behavior_preservation"]["kl_div_score"] is None


def test_bad_input_is_a_clear_error():
  c = _corpus()
  ev = evals.CorpusEval({"d": W}, {"d": "s"})
  tok, pos, clean = map(jnp.asarray, (c["tokens"], c["positions"], c["clean"]))
  with pytest.raises(ValueError, match="patched_logits has shape"):
    ev.add_ablation("s", clean, clean[:, :-1], tok, pos)
  with pytest.raises(KeyError, match="no dictionary writes"):
    ev.add_ablation("elsewhere", clean, clean, tok, pos)
  x = jnp.asarray(c["x"])
  y, codes = dictlearn.encode_decode(c["d"], x)
  with pytest.raises(ValueError, match="y has shape"):
    ev.add_dictionary("d", clean, clean, tok, pos, x, y[..., :-1], codes)
  ev.add_dictionary("d", clean, clean, tok, pos, x, y, codes)
  with pytest.raises(ValueError, match="add every batch to both"):
    ev.results()
  with pytest.raises(ValueError, match="same dictionaries"):
    evals.CorpusEval({"a": 3}, {"b": "s"})
