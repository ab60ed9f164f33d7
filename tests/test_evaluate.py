"""dictlearn_penzai.evaluate on the tiny random Gemma: an independent numpy computation
from captured activations and logits (spliced with ``hooks.splice``, not evaluate's own
Replace hook), the exact and zero dictionaries, together vs one at a time, the corpus
reader, and the eval command's summary page in headless Chromium."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from chromium import dump_dom, html_tag

import dictlearn as dl
from dictlearn_gemma import corpus as C
from dictlearn_penzai import eval_cli, hooks
from dictlearn_penzai.evaluate import evaluate
from penzai_tiny import D_MODEL, VOCAB, tiny_model

SEQ, BATCH = 8, 3


class Tok:
  """Documents are space-separated ids; BOS is 2."""
  bos_id = 2

  def encode(self, text, add_bos=False):
    return [int(t) for t in text.split()]


@pytest.fixture(scope="module")
def model():
  return tiny_model()


def _docs(seed=0, lengths=(20, 3, 9, 15, 1, 11)):
  rng = np.random.default_rng(seed)
  return [" ".join(map(str, rng.integers(3, VOCAB, size=n))) for n in lengths]


def _sae(seed=0, threshold=0.1):
  return dl.random_dictionary(jax.random.key(seed), D_MODEL, 32, threshold=threshold,
                              meta=dl.DictMeta(site="resid_post", layer=1))


def _tc(seed=1):
  d = dl.random_dictionary(jax.random.key(seed), D_MODEL, 32, kind="transcoder",
                           threshold=0.1, meta=dl.DictMeta(kind="transcoder", site="mlp_in",
                                                           layer=2, site_out="mlp_out"))
  return d


def _rows(docs, tokens=None):
  """The corpus rule, written out again: BOS + 7 tokens per piece, padded with 0."""
  out, left = [], tokens
  for doc in docs:
    ids = [int(t) for t in doc.split()]
    for i in range(0, len(ids), SEQ - 1):
      piece = [2] + ids[i:i + SEQ - 1]
      if left is not None:
        piece = piece[:left]
        left -= len(piece)
      if len(piece) >= 2:
        out.append(piece + [0] * (SEQ - len(piece)))
  return np.asarray(out, np.int32)


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _reference(model, d, docs, tokens=None):
  """CE/KL scores, EV, L0 and densities from captured arrays, in float64 numpy."""
  toks = _rows(docs, tokens)
  src, dst = hooks.read_write_sites(model, d)
  zero = dl.JumpReLUSAE(w_enc=jnp.zeros((D_MODEL, 4)), b_enc=jnp.zeros(4),
                        threshold=jnp.full(4, 1e9), w_dec=jnp.zeros((4, D_MODEL)),
                        b_dec=jnp.zeros(D_MODEL))
  zero_tc = dl.Transcoder(**{f: getattr(zero, f) for f in
                             ("w_enc", "b_enc", "threshold", "w_dec", "b_dec")},
                          meta=dl.DictMeta(kind="transcoder"))
  clean, abl, spl, xs, ts = [], [], [], [], []
  for i in range(len(toks)):
    t = toks[i:i + 1]
    logits, cache = hooks.run_with_cache(model, t, [src, dst])
    clean.append(logits.unwrap("batch", "seq", "vocabulary")[0])
    xs.append(np.asarray(cache.array(src))[0])
    ts.append(np.asarray(cache.array(dst))[0])
    z = zero_tc if src != dst else zero
    abl.append(hooks.call(hooks.splice(model, z, (src, dst)), t)
               .unwrap("batch", "seq", "vocabulary")[0])
    spl.append(hooks.call(hooks.splice(model, d), t).unwrap("batch", "seq", "vocabulary")[0])
  clean, abl, spl = (np.stack(a) for a in (clean, abl, spl))
  x, target = np.stack(xs), np.stack(ts)
  nonpad = toks != 0
  pos = np.where(nonpad, np.cumsum(nonpad, 1) - 1, -1)
  pred = (pos[:, :-1] > 0) & (pos[:, 1:] >= 0)
  lc = _log_softmax(clean[:, :-1])
  nxt = toks[:, 1:, None]
  ce = lambda lg: -np.take_along_axis(_log_softmax(lg[:, :-1]), nxt, -1)[..., 0][pred].mean()  # noqa: E731
  kl = lambda lg: (np.exp(lc) * (lc - _log_softmax(lg[:, :-1]))).sum(-1)[pred].mean()  # noqa: E731
  keep = pos > 0
  xk, tk = x[keep].astype(np.float64), target[keep].astype(np.float64)
  pre = xk @ np.asarray(d.w_enc, np.float64) + np.asarray(d.b_enc, np.float64)
  f = np.where(pre > np.asarray(d.threshold, np.float64), pre, 0.0)
  y = f @ np.asarray(d.w_dec, np.float64) + np.asarray(d.b_dec, np.float64)
  if getattr(d, "w_skip", None) is not None:
    y = y + xk @ np.asarray(d.w_skip, np.float64)
  fvu = ((tk - y) ** 2).sum() / ((tk - tk.mean(0)) ** 2).sum()
  return dict(ce_score=(ce(abl) - ce(spl)) / (ce(abl) - ce(clean)),
              kl_score=(kl(abl) - kl(spl)) / kl(abl), ev=1 - fvu,
              l0=(f != 0).sum(-1).mean(), density=(f != 0).mean(0), n=keep.sum())


def _check(m, ref):
  np.testing.assert_allclose(m["model_performance_preservation"]["ce_loss_score"],
                             ref["ce_score"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(m["model_behavior_preservation"]["kl_div_score"],
                             ref["kl_score"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(m["reconstruction_quality"]["explained_variance"], ref["ev"],
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(m["sparsity"]["l0"], ref["l0"], rtol=1e-6)
  assert m["token_stats"]["total_tokens_eval_reconstruction"] == ref["n"]
  hist = np.histogram(np.clip(np.log10(ref["density"] + 1e-10), -10, 0),
                      bins=np.linspace(-10, 0, 41))[0]
  assert m["latent_density_histogram"]["counts"] == hist.tolist()
  assert m["misc_metrics"]["dead_fraction"] == np.mean(ref["density"] == 0)


@pytest.mark.parametrize("which", ["sae", "transcoder"])
def test_matches_numpy_from_captured_arrays(model, which):
  d = _sae() if which == "sae" else _tc()
  docs = _docs()
  m = evaluate(model, Tok(), docs, {"d": d}, tokens=40, seq_len=SEQ, batch_size=BATCH,
               progress=False)["d"]
  ref = _reference(model, d, docs, tokens=40)
  assert 40 == (_rows(docs, 40) != 0).sum()
  _check(m, ref)


def test_exact_dictionary_scores_one_zero_dictionary_scores_zero(model):
  q = np.linalg.qr(np.random.default_rng(0).normal(size=(D_MODEL, D_MODEL)))[0]
  w_enc = jnp.asarray(np.concatenate([q, -q], 1), jnp.float32)
  meta = dl.DictMeta(site="resid_post", layer=1)
  exact = dl.JumpReLUSAE(w_enc=w_enc, b_enc=jnp.zeros(2 * D_MODEL),
                         threshold=jnp.zeros(2 * D_MODEL), w_dec=w_enc.T,
                         b_dec=jnp.zeros(D_MODEL), meta=meta)
  zero = dl.JumpReLUSAE(w_enc=w_enc, b_enc=jnp.zeros(2 * D_MODEL),
                        threshold=jnp.full(2 * D_MODEL, 1e9),
                        w_dec=jnp.zeros((2 * D_MODEL, D_MODEL)), b_dec=jnp.zeros(D_MODEL),
                        meta=meta)
  r = evaluate(model, Tok(), _docs(), {"exact": exact, "zero": zero}, tokens=None,
               seq_len=SEQ, batch_size=BATCH, progress=False)
  e, z = r["exact"], r["zero"]
  assert e["model_performance_preservation"]["ce_loss_score"] == pytest.approx(1, abs=1e-3)
  assert e["model_behavior_preservation"]["kl_div_score"] == pytest.approx(1, abs=1e-4)
  assert e["reconstruction_quality"]["explained_variance"] == pytest.approx(1, abs=1e-5)
  assert z["model_performance_preservation"]["ce_loss_score"] == 0
  assert z["model_behavior_preservation"]["kl_div_score"] == 0
  assert z["sparsity"]["l0"] == 0 and z["misc_metrics"]["dead_fraction"] == 1


def test_together_equals_one_at_a_time(model):
  sae, sae2, tc = _sae(), _sae(3, 0.3), _tc()
  kw = dict(tokens=None, seq_len=SEQ, batch_size=BATCH, progress=False)
  both = evaluate(model, Tok(), _docs(1), {"a": sae, "b": sae2, "t": tc}, **kw)
  for name, d in (("a", sae), ("b", sae2), ("t", tc)):
    alone = evaluate(model, Tok(), _docs(1), [d], **kw)
    (m,) = alone.values()
    np.testing.assert_equal(m, both[name])


def test_corpus_folder_file_and_strings(tmp_path):
  (tmp_path / "b.txt").write_text("5 6 7")
  (tmp_path / "a.txt").write_text("3 4")
  (tmp_path / ".hidden").write_text("9 9 9")
  (tmp_path / "link.txt").symlink_to(tmp_path / "a.txt")
  assert list(C.documents(tmp_path)) == ["3 4", "5 6 7"]
  assert list(C.documents(tmp_path / "b.txt")) == ["5 6 7"]
  rows = list(C.sequences(Tok(), C.documents(["3 4 5 6 7 8 9 10 11", "12"]), 4, tokens=10))
  np.testing.assert_array_equal(rows, [[2, 3, 4, 5], [2, 6, 7, 8], [2, 9, 0, 0]])
  with pytest.raises(FileNotFoundError):
    list(C.documents(tmp_path / "nope"))
  with pytest.raises(TypeError):
    list(C.documents([b"bytes"]))
  name, docs = C.default_corpus()
  assert docs and all(isinstance(t, str) for t in docs)
  # Prose and code in turn: the first few documents already hold both.
  assert name.endswith("+python-stdlib") and any("def " in d for d in docs[:2])
  assert any("licen" in d.lower() or "topic" in d.lower() for d in docs[:2])
  assert C.from_argument("stdlib")[1] == C.stdlib_documents()


def test_summary_page_renders_and_names_stay_text(model, tmp_path):
  evil = '<img src=x onerror="document.title=1">"&<script>alert(1)</script>'
  r = evaluate(model, Tok(), _docs(), {evil: _sae(), "tc": _tc()}, tokens=None, seq_len=SEQ,
               batch_size=BATCH, progress=False)
  paths = eval_cli.write_results(r, tmp_path / "out", corpus="<b>corpus</b>", model="m<i>",
                                 tokens=None, seq_len=SEQ)
  assert len(paths) == 3 and all(p.exists() for p in paths)
  page = paths[-1].read_text()
  assert "<script>alert(1)" not in page and "<img src=x" not in page and "<b>corpus" not in page
  markup = re.sub(r"<script.*?</script>", "", page, flags=re.S)
  assert not re.search(r'(src|href)="https?:', markup)
  dom = dump_dom(paths[-1].as_uri(), tmp_path / "profile")
  assert "main-svg" in dom, "plotly did not draw"
  assert "data-js-errors" not in html_tag(dom), html_tag(dom)
  assert "<img" not in dom and "&lt;img src=x" in dom
  assert "&lt;b&gt;corpus&lt;/b&gt;" in dom


def test_cli_refuses_a_missing_dictionary(capsys):
  assert eval_cli.main(["--dictionary", "/no/such/sae"]) == 2
  assert "cannot load the dictionary" in capsys.readouterr().err


def test_eval_is_registered_and_described():
  import importlib.metadata
  import tomllib
  from pathlib import Path

  from dictlearn import cli
  cfg = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
  value = cfg["project"]["entry-points"]["dictlearn.commands"]["eval"]
  ep = importlib.metadata.EntryPoint("eval", value, cli.GROUP)
  assert ep.module == "dictlearn_penzai.eval_cli"
  assert cli.describe(ep).startswith("score dictionaries over a corpus")
