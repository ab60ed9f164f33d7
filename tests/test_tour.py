"""The tour end to end on the real Gemma 3 270M, its report in headless Chromium, its errors."""

import re

import jax
import pytest
from chromium import dump_dom, html_tag

import dictlearn as dl
from dictlearn_penzai import tour

SECTIONS = ("continuation", "sae-metrics", "top-latents", "logit-lens", "steering",
            "transcoder-metrics", "per-token-loss")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("tour") / "report.html"
  assert tour.main(["--out", str(out), "--new-tokens", "8"]) == 0
  return out


def test_tour_report_has_every_section(report):
  page = report.read_text()
  for sid in SECTIONS:
    assert f'id="{sid}"' in page, sid
  # The numbers are real: an FVU percentage, an L0 and a signed delta loss in each table.
  assert len(re.findall(r"<td>\d+\.\d\d%</td><td>\d+\.\d</td><td>[+-]\d\.\d{4}</td>", page)) == 2
  # Offline: no remote resources (plotly.js is inline; its own code mentions URLs).
  markup = re.sub(r"<script.*?</script>", "", page, flags=re.S)
  assert "<script" in page and not re.search(r'(src|href)="https?:', markup)


def test_report_renders_in_headless_chromium(report, tmp_path):
  dom = dump_dom(report.as_uri(), tmp_path / "profile")
  assert 'id="per-token-loss"' in dom
  assert "main-svg" in dom, "plotly did not draw the loss plot"
  assert dom.count('class="dictlearn-tokens"') >= 1 and "background-color:rgba(220,38,38" in dom
  assert "data-js-errors" not in html_tag(dom), html_tag(dom)  # Set by the report's error hook.


def test_missing_model_file_is_a_short_error(capsys):
  assert tour.main(["--model", "/no/such/model.gguf"]) == 2
  assert "no model at /no/such/model.gguf" in capsys.readouterr().err


def test_hub_reference_offline_says_use_a_local_folder(capsys):
  with pytest.raises(SystemExit):
    tour.main(["--sae", "google/gemma-scope-2-270m-pt/resid_post/layer_9_width_16k_l0_small"])
  assert "local" in capsys.readouterr().err


def test_dictionary_for_another_model_is_refused(tmp_path, capsys):
  wrong = dl.random_dictionary(jax.random.key(0), 1152, 16,
                               meta=dl.DictMeta(site="resid_post", layer=9))
  dl.save(wrong, tmp_path / "sae")
  assert tour.main(["--sae", str(tmp_path / "sae")]) == 2
  assert "d_in=1152" in capsys.readouterr().err
