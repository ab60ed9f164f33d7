"""dictlearn_penzai.dashboards on the tiny random Gemma: ``collect`` equals the core
collector fed with activations captured by ``run_with_cache`` and encoded by the whole
dictionary; the logit lens through the model's unembedding; ``dictlearn dashboard`` end to
end (files, the index page in headless Chromium)."""

import json
import re

import jax
import numpy as np
import pytest
from chromium import dump_dom, html_tag

import dictlearn as dl
from dictlearn import dashboards as D
from dictlearn import evals
from dictlearn_gemma import corpus as C
from dictlearn_penzai import analysis, dashboard_cli, hooks
from dictlearn_penzai.dashboards import collect, lens_logits
from penzai_tiny import D_MODEL, VOCAB, tiny_model

SEQ, BATCH, LATENTS = 8, 3, np.arange(4, 28)
NAMES = ["<pad>", "<eos>", "<bos>", "<script>alert(1)</script>", '"&</script>'] + [
    f" t{i}" for i in range(5, VOCAB)]


class Tok:
  """Documents are space-separated ids; BOS is 2; ids decode to NAMES (some hostile)."""
  bos_id = 2

  def encode(self, text, add_bos=False):
    return [int(t) for t in text.split()]

  def decode(self, ids):
    return "".join(NAMES[int(i)] for i in ids)


@pytest.fixture(scope="module")
def model():
  return tiny_model()


def _docs(seed=0, lengths=(20, 3, 9, 15, 1, 11, 30)):
  rng = np.random.default_rng(seed)
  return [" ".join(map(str, rng.integers(3, VOCAB, size=n))) for n in lengths]


def _sae(d_model=D_MODEL):
  return dl.random_dictionary(jax.random.key(0), d_model, 32,
                              threshold=0.5 * (d_model / 16) ** 0.5,
                              meta=dl.DictMeta(site="resid_post", layer=1))


@pytest.fixture(scope="module", params=["gemma3", "gemma2"])
def any_model(request, tmp_path_factory):
  """The tiny Gemma 3, and the tiny Gemma 2 of test_gemma2 (penzai's own model)."""
  if request.param == "gemma3":
    return request.getfixturevalue("model"), D_MODEL
  import gemma2_tiny
  return (gemma2_tiny.load_model(tmp_path_factory.mktemp("g2") / "tiny"),
          gemma2_tiny.CONFIG["hidden_size"])


KW = dict(k=6, n_quantiles=3, examples_per_quantile=2)  # the CLI test's too: one compile


def test_collect_equals_the_core_collector_on_captured_activations(any_model):
  model, d_model = any_model
  d = _sae(d_model)
  got = collect(model, Tok(), _docs(), d, tokens=90, seq_len=SEQ, batch_size=BATCH,
                latents="4:28", progress=False, **KW)
  ref = D.DashboardCollector(LATENTS, **KW)
  rows = list(C.sequences(Tok(), _docs(), SEQ, tokens=90))
  for batch, _ in C.batches(rows, BATCH, SEQ):
    _, cache = hooks.run_with_cache(model, batch, ["resid_post.1"])
    pos = np.asarray(hooks.positions_from_padding(hooks.as_tokens(batch), 0).unwrap(
        "batch", "seq"))
    acts = np.asarray(dl.encode(d, cache.array("resid_post.1")))[..., LATENTS]
    ref.add(acts, batch, evals.token_mask(pos), valid=pos >= 0)
  ref = ref.results()
  assert got.tokens == ref.tokens == 90 - len(rows)  # BOS never counts
  assert got.info == {"name": "dictionary_0", "kind": "sae", "layer": 1,
                      "site_in": "resid_post.1", "site_out": "resid_post.1"}
  assert sum(f.fired for f in got.features) > 50
  for a, b in zip(got.features, ref.features):
    assert (a.latent, a.fired) == (b.latent, b.fired)
    np.testing.assert_array_equal(a.histogram, b.histogram)
    for ea, eb in zip([*a.top, *(e for q in a.quantiles for e in q.examples)],
                      [*b.top, *(e for q in b.quantiles for e in q.examples)], strict=True):
      assert (ea.seq, ea.pos, ea.tokens, ea.index) == (eb.seq, eb.pos, eb.tokens, eb.index)
      np.testing.assert_allclose(ea.acts, eb.acts, rtol=1e-5, atol=1e-6)


def test_lens_is_the_models_unembedding(model):
  rows = np.random.default_rng(0).normal(size=(3, D_MODEL)).astype(np.float32)
  for convention in ("raw", "final_norm"):
    logits = np.asarray(lens_logits(model, convention)(rows))
    for i, row in enumerate(rows):
      lens = analysis.logit_lens(model, row, k=4, convention=convention)
      np.testing.assert_array_equal(np.argsort(-logits[i])[:4], lens.top_ids)
      np.testing.assert_allclose(logits[i][lens.top_ids], lens.top_values, rtol=1e-5)


def test_cli_end_to_end_and_the_index_renders(model, tmp_path):
  sae = tmp_path / "sae"
  dl.save(_sae(), sae)
  (tmp_path / "corpus").mkdir()
  for i, doc in enumerate(_docs(1)):
    (tmp_path / "corpus" / f"{i}.txt").write_text(doc)
  out = tmp_path / "dash"
  argv = ["--dictionary", str(sae), "--corpus", str(tmp_path / "corpus"), "--tokens", "80",
          "--seq-len", str(SEQ), "--batch-size", str(BATCH), "--latents", "0:23,30",
          "--k", "6", "--quantiles", "3", "--examples-per-quantile", "2", "--scan", "tiny",
          "--out", str(out), "--no-progress"]
  assert dashboard_cli.main(argv, loaded=(model, Tok())) == 0
  files = sorted(p.name for p in (out / "features" / "tiny").iterdir())
  expect = sorted(f"{D.feature_index(1, i)}.{ext}" for i in [*range(23), 30]
                  for ext in ("json", "html"))
  assert files == expect
  doc = json.loads((out / "features" / "tiny" / f"{D.feature_index(1, 30)}.json").read_text())
  assert doc["index"] == 30 and doc["transcoder_id"] == "sae" and len(doc["top_logits"]) == 10
  assert doc["dictlearn"]["site_in"] == "resid_post.1"
  text = (out / "index.html").read_text()
  assert "<script>alert" not in text
  dom = dump_dom((out / "index.html").as_uri(), tmp_path / "profile")
  assert "data-js-errors" not in html_tag(dom), html_tag(dom)
  assert len(re.findall(r'<tr data-latent="\d+">', dom)) == 24 and "<script>alert" not in dom


def test_cli_refuses_bad_latents_naming_the_fix(tmp_path, capsys):
  dl.save(_sae(), tmp_path / "sae")
  assert dashboard_cli.main(["--dictionary", str(tmp_path / "sae"), "--latents", "0:99"]) == 2
  assert "write indices in [0, 32) as 'start:stop'" in capsys.readouterr().err
  assert dashboard_cli.main(["--dictionary", str(tmp_path / "nope")]) == 2
  assert "cannot load the dictionary" in capsys.readouterr().err


def test_dashboard_is_registered_and_described():
  import importlib.metadata
  import tomllib
  from pathlib import Path

  from dictlearn import cli
  cfg = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
  value = cfg["project"]["entry-points"]["dictlearn.commands"]["dashboard"]
  ep = importlib.metadata.EntryPoint("dashboard", value, cli.GROUP)
  assert ep.module == "dictlearn_penzai.dashboard_cli"
  assert cli.describe(ep).startswith("what each latent of a dictionary means")
  assert "dashboard" in cli.commands()
