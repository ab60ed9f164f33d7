"""Harvesting activations into shards that training streams, and the `dictlearn train` CLI."""

import json

import numpy as np
import pytest

import dictlearn as dl
import dictlearn.train
from dictlearn_penzai import hooks, sites
from dictlearn_penzai.harvesting import harvest, token_rows

from penzai_tiny import VOCAB, tiny_model


class CharTokenizer:
  """A stand-in tokenizer: one id per character (any object with encode/bos_id works)."""
  bos_id = 2

  def encode(self, text, add_bos=True):
    return ([2] if add_bos else []) + [3 + ord(c) % (VOCAB - 3) for c in text]


TEXTS = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen jugs",
         "sphinx of black quartz, judge my vow"]


@pytest.fixture(scope="module")
def model():
  return tiny_model(seed=3)


def test_rows_start_with_bos_and_cover_the_corpus():
  rows = list(token_rows(CharTokenizer(), TEXTS, seq_len=9))
  assert all(r[0] == 2 and r.shape == (9,) for r in rows)
  n_chars = sum(len(t) for t in TEXTS)
  assert len(rows) == n_chars // 8
  assert list(token_rows(CharTokenizer(), TEXTS, 9, max_rows=2)).__len__() == 2


def test_harvested_shards_equal_the_model_activations(model, tmp_path):
  tok, wanted = CharTokenizer(), [sites.resid_post(1), sites.mlp_in(2), sites.mlp_out(2)]
  folders = harvest(model, tok, TEXTS, wanted, seq_len=9, batch_size=4, out=tmp_path,
                    progress=False, model_name="tiny")
  rows = np.stack(list(token_rows(tok, TEXTS, 9)))
  _, cache = hooks.run_with_cache(model, rows, wanted, pad_id=None)
  for s in wanted:
    meta = json.loads((tmp_path / f"{s.kind}_{s.layer}" / "meta.json").read_text())
    assert (meta["site"], meta["layer"], meta["excludes_bos"]) == (s.kind, s.layer, True)
    assert meta["rows"] == rows.shape[0] * 8  # BOS rows left out.
    got = np.concatenate([np.load(tmp_path / f"{s.kind}_{s.layer}" / sh["file"])
                          for sh in meta["shards"]])
    want = np.asarray(cache.array(s))[:, 1:].reshape(-1, got.shape[-1])
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    assert folders[s].endswith(f"{s.kind}_{s.layer}")


def test_harvest_in_memory_respects_max_tokens(model):
  out = harvest(model, CharTokenizer(), TEXTS, "resid_post.0", seq_len=5, batch_size=2,
                max_tokens=10, progress=False)
  (acts,) = out.values()
  assert acts.shape == (12, 16)  # ceil(10 / 4) rows of 4 tokens.


def test_fit_streams_the_shards_and_names_the_site(model, tmp_path):
  src, dst = sites.mlp_in(1), sites.mlp_out(1)
  folders = harvest(model, CharTokenizer(), TEXTS * 4, [src, dst], seq_len=9, batch_size=4,
                    out=tmp_path, progress=False)
  t, hist = dl.train.fit(folders[src], targets=folders[dst], kind="transcoder", width=32,
                         target_l0=4, steps=5, batch_size=16, learning_rate=1e-3,
                         progress=False)
  assert isinstance(t, dl.Transcoder) and (t.meta.site, t.meta.layer) == ("mlp_in", 1)
  assert np.isfinite(hist["loss"]).all()


def test_empty_corpus_is_a_clear_error(model):
  with pytest.raises(ValueError, match="fewer than"):
    harvest(model, CharTokenizer(), ["hi"], "resid_post.0", seq_len=8, progress=False)


def test_train_cli_end_to_end_on_the_270m(tmp_path, capsys):
  from dictlearn_penzai import train_cli
  out = tmp_path / "sae"
  assert train_cli.main(["--layer", "3", "--width", "64", "--tokens", "1200", "--steps", "8",
                         "--batch-size", "128", "--seq-len", "64", "--loss-norm-cap", "2",
                         "--no-encoder-center", "--out", str(out)]) == 0
  d = dl.load(out)
  assert (d.meta.site, d.meta.layer, d.d_in, d.width) == ("resid_post", 3, 640, 64)
  assert "saved sae" in capsys.readouterr().out
