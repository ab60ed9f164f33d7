"""Analysis: top latents, token HTML, logit lens, reconstruction metrics, per-token loss.

The metrics are checked against a direct computation written out in the test (numpy,
BOS left out), not against the library's own helpers.
"""

import html
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

import dictlearn
from dictlearn_penzai import analysis, hooks, sites

from penzai_tiny import D_MODEL, VOCAB, tiny_model

SEQ = 9


@pytest.fixture(scope="module")
def model():
  return tiny_model()


@pytest.fixture(scope="module")
def ids():
  rng = np.random.default_rng(1)
  out = rng.integers(3, VOCAB, size=(2, SEQ)).astype(np.int32)
  out[:, 0] = 2
  return out


def _sae(site, seed=0, threshold=0.2):
  return dictlearn.random_dictionary(jax.random.key(seed), D_MODEL, 48, threshold=threshold,
                                     meta=dictlearn.DictMeta(site=site.kind, layer=site.layer))


def _np_ce(logits, ids):
  z = logits[:, :-1].astype(np.float64)
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]


# ------------------------------------------------------------------ top latents


def test_top_latents_per_token_and_prompt(model, ids):
  site = sites.resid_post(2)
  sae = _sae(site)
  _, cache = hooks.run_with_cache(model, ids, [site])
  f = np.asarray(dictlearn.encode(sae, cache.array(site)))
  for reduce in ("max", "mean"):
    top = analysis.top_latents(sae, cache[site], k=5, reduce=reduce)
    assert top.values.shape == (2, SEQ, 5) and top.prompt_indices.shape == (2, 5)
    np.testing.assert_allclose(top.values, -np.sort(-f, -1)[..., :5], rtol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(f, top.indices, -1), top.values)
    pooled = f[:, 1:].max(1) if reduce == "max" else f[:, 1:].mean(1)  # BOS left out
    np.testing.assert_allclose(top.prompt_values, -np.sort(-pooled, -1)[:, :5], rtol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(pooled, top.prompt_indices, -1),
                               top.prompt_values, rtol=1e-5)
    assert f"{reduce} over {SEQ - 1} tokens" in str(top)
  # A mask leaves tokens out of the prompt ranking; plain (seq, d) arrays work too.
  mask = np.ones((2, SEQ), bool)
  mask[:, 5:] = False
  top = analysis.top_latents(sae, cache.array(site), k=3, mask=mask)
  np.testing.assert_allclose(top.prompt_values, -np.sort(-f[:, 1:5].max(1), -1)[:, :3],
                             rtol=1e-5)
  one = analysis.top_latents(sae, cache.array(site)[0], k=3)
  assert one.values.shape == (1, SEQ, 3)
  acts = analysis.latent_activations(sae, cache[site], int(top.prompt_indices[0, 0]))
  np.testing.assert_allclose(acts, f[..., int(top.prompt_indices[0, 0])], rtol=1e-6)
  with pytest.raises(ValueError, match="out of range"):
    analysis.latent_activations(sae, cache[site], 48)


# ------------------------------------------------------------------ HTML


def test_token_activation_html_is_escaped_and_self_contained(tmp_path):
  toks = ["<script>", " a&b", "\n", " \"q\"", "x"]
  vals = [0.0, 1.5, -3.0, 3.0, float("nan")]
  out = analysis.token_activation_html(toks, vals, title="latent <7>")
  assert isinstance(out, str) and out._repr_html_() == out
  assert "<script>" not in out and "&lt;script&gt;" in out
  assert "latent &lt;7&gt;" in out
  assert "\u21b5" in out  # a newline token stays visible
  spans = re.findall(r'<span title="([^"]*)" data-value="([^"]*)" style="background-color:'
                     r'rgba\((\d+,\d+,\d+),([0-9.]+)\)', out)
  assert len(spans) == len(toks)
  assert float(spans[3][3]) == pytest.approx(1.0)  # |3| is the max: full colour
  assert float(spans[1][3]) == pytest.approx(0.5)
  assert spans[2][2] != spans[3][2]  # negative and positive in different colours
  assert float(spans[0][3]) == 0.0
  assert "1.5" in html.unescape(spans[1][0])  # hover text carries the value
  assert "http" not in out and "<script" not in out  # nothing external, no scripts
  page = tmp_path / "tokens.html"
  out.save(page)
  text = page.read_text(encoding="utf-8")
  assert text.startswith("<!DOCTYPE html>") and out in text
  with pytest.raises(ValueError, match="5 tokens but 2 values"):
    analysis.token_activation_html(toks, [1, 2])


# ------------------------------------------------------------------ logit lens


def test_logit_lens_conventions(model):
  direction = np.random.default_rng(2).normal(size=D_MODEL).astype(np.float32)
  tail = analysis.unembedding_tail(model)
  (norm,) = [t for t in tail if isinstance(t, pz.nn.RMSLayerNorm)]
  (decode,) = [t for t in tail if isinstance(t, pz.nn.EmbeddingDecode)]
  table = np.asarray(decode.table.embeddings.value.unwrap("vocabulary", "embedding"))
  gain = np.asarray(pz.select(norm).at_instances_of(pz.nn.Linear).get_sequence()[0]
                    .weights.value.unwrap("embedding"))
  raw = table @ direction
  normed = direction / np.sqrt(np.mean(direction ** 2) + 1e-6)
  through = table @ (normed * gain)
  for conv, want in (("raw", raw), ("final_norm", through)):
    lens = analysis.logit_lens(model, direction, k=4, convention=conv)
    np.testing.assert_array_equal(lens.top_ids, np.argsort(-want, kind="stable")[:4])
    np.testing.assert_array_equal(lens.bottom_ids, np.argsort(want, kind="stable")[:4])
    np.testing.assert_allclose(lens.top_values, want[lens.top_ids], rtol=1e-4, atol=1e-4)
  # The rankings differ exactly by the norm's gain: raw with the gain folded in agrees.
  folded = analysis.logit_lens(model, direction * gain, k=4, convention="raw")
  np.testing.assert_array_equal(folded.top_ids,
                                analysis.logit_lens(model, direction, k=4).top_ids)

  class Tok:
    def decode(self, ids):
      return "".join(f"<{i}>" for i in ids)

  lens = analysis.logit_lens(model, direction, k=2, tokenizer=Tok())
  assert lens.top_tokens == tuple(f"<{i}>" for i in lens.top_ids)
  assert "logit lens (final_norm)" in str(lens)
  with pytest.raises(ValueError, match="convention"):
    analysis.logit_lens(model, direction, convention="tutorial")


# ------------------------------------------------------------------ metrics


def test_reconstruction_report_matches_direct_computation(model, ids):
  site = sites.resid_mid(1)
  sae = _sae(site, seed=3)
  report = analysis.reconstruction_report(model, ids, sae)
  clean, cache = hooks.run_with_cache(model, ids, [site])
  x = np.asarray(cache.array(site), np.float64)[:, 1:]  # BOS left out
  f = np.asarray(dictlearn.encode(sae, cache.array(site)))[:, 1:]
  y = np.asarray(dictlearn.forward(sae, cache.array(site)), np.float64)[:, 1:]
  fvu = ((x - y) ** 2).sum() / ((x - x.reshape(-1, D_MODEL).mean(0)) ** 2).sum()
  assert report.fvu == pytest.approx(fvu, rel=1e-4)
  assert report.l0 == pytest.approx((f != 0).sum(-1).mean(), rel=1e-6)
  assert report.mse == pytest.approx(((x - y) ** 2).mean(), rel=1e-4)
  # Delta loss: splice by hand (a layer written here, not the library's hook) and compare.
  spliced_model = (pz.select(model).at_instances_of(sites.HookPoint)
                   .where(lambda h: (h.kind, h.layer) == ("resid_mid", 1))
                   .insert_after(_HandSplice(sae)))
  l_clean = np.asarray(clean.unwrap("batch", "seq", "vocabulary"))
  l_spliced = np.asarray(hooks.call(spliced_model, ids).unwrap("batch", "seq", "vocabulary"))
  ce_clean, ce_spliced = _np_ce(l_clean, ids), _np_ce(l_spliced, ids)
  assert report.clean_loss == pytest.approx(ce_clean.mean(), rel=1e-4)
  assert report.delta_loss == pytest.approx(ce_spliced.mean() - ce_clean.mean(), rel=1e-3,
                                            abs=1e-5)
  assert report.n_tokens == 2 * (SEQ - 1)
  assert "resid_mid.1: FVU" in str(report)


@pz.pytree_dataclass
class _HandSplice(pz.nn.Layer):
  sae: dictlearn.JumpReLUSAE

  def __call__(self, x, **side):
    arr = x.unwrap("batch", "seq", "embedding")
    y = dictlearn.forward(self.sae, arr).astype(arr.dtype)
    y = jnp.concatenate([arr[:, :1], y[:, 1:]], axis=1)
    return pz.nx.wrap(y).tag("batch", "seq", "embedding")


def test_transcoder_report_and_per_token_loss(model, ids):
  tc = dictlearn.random_dictionary(
      jax.random.key(4), D_MODEL, 48, kind="transcoder", affine=True, threshold=0.1,
      meta=dictlearn.DictMeta(kind="transcoder", site="mlp_in", layer=2))
  report = analysis.reconstruction_report(model, ids, tc)
  assert (report.site_in, report.site_out) == ("mlp_in.2", "mlp_out.2")
  _, cache = hooks.run_with_cache(model, ids, ["mlp_in.2", "mlp_out.2"])
  target = np.asarray(cache.array("mlp_out.2"), np.float64)[:, 1:]
  pred = np.asarray(dictlearn.forward(tc, cache.array("mlp_in.2")), np.float64)[:, 1:]
  fvu = ((target - pred) ** 2).sum() / ((target - target.reshape(-1, D_MODEL).mean(0)) ** 2).sum()
  assert report.fvu == pytest.approx(fvu, rel=1e-4)
  loss = analysis.per_token_loss(model, ids, tc)
  assert loss.clean.shape == loss.spliced.shape == loss.mask.shape == (2, SEQ - 1)
  assert loss.mask.all()
  assert loss.spliced.mean() - loss.clean.mean() == pytest.approx(report.delta_loss, rel=1e-4,
                                                                  abs=1e-6)
  fig = analysis.per_token_loss_figure(loss, [f"t{i}" for i in range(SEQ)], title="tc")
  assert [t.name for t in fig.data] == ["clean", "spliced"]
  np.testing.assert_allclose(np.asarray(fig.data[0].y, float), loss.clean[0], rtol=1e-6)
  assert list(fig.layout.xaxis.ticktext) == [f"t{i}" for i in range(1, SEQ)]
  with pytest.raises(ValueError, match="pass the whole prompt"):
    analysis.per_token_loss_figure(loss, ["a"])


def test_padding_is_left_out(model, ids):
  """Left padding (positions -1) and BOS count nowhere; results match the unpadded run."""
  site = sites.resid_post(1)
  sae = _sae(site, seed=5)
  pad = 3
  padded = np.concatenate([np.zeros((2, pad), np.int32), ids], 1)
  pos = np.concatenate([-np.ones((2, pad), np.int32),
                        np.broadcast_to(np.arange(SEQ, dtype=np.int32), (2, SEQ))], 1)
  a = analysis.reconstruction_report(model, ids, sae)
  b = analysis.reconstruction_report(model, padded, sae, token_positions=pos)
  c = analysis.reconstruction_report(model, padded, sae)  # positions from pad id 0
  for r in (b, c):
    assert r.n_tokens == a.n_tokens
    for field in ("fvu", "l0", "mse", "clean_loss", "delta_loss"):
      assert getattr(r, field) == pytest.approx(getattr(a, field), rel=1e-3, abs=1e-5), field
