"""Gemma 2 (penzai's own model, with HookPoints) against transformers, and Gemma Scope 1 on it.

The tiny random Gemma 2 of ``gemma2_tiny`` is rebuilt from its seed; the reference outputs
come from transformers' ``Gemma2ForCausalLM`` (``scripts/make_gemma2_fixtures.py``,
``fixtures/gemma2_tiny.npz``).
"""

import os

import gemma2_tiny
import jax.numpy as jnp
import numpy as np
import pytest
from gemma_layouts import flat_layout
from penzai import pz

import dictlearn as dl
import dictlearn_penzai as dp
from dictlearn_gemma.config import Gemma2Config, get_preset
from dictlearn_gemma.loading import load_checkpoint
from dictlearn_gemma.params import init_gemma_params
from dictlearn_penzai.gemma2_model import from_gemma2_params
from dictlearn_penzai.hooks import attach

# Only the shared folder has a tokenizer.model; the others need none.
pytestmark = pytest.mark.filterwarnings("ignore:no tokenizer.model found")

REF = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "gemma2_tiny.npz"))
PROMPT = REF["prompt"][None]  # (1, 20)
SITES = ("resid_post", "attn_z", "attn_out", "mlp_in", "mlp_out")
CONFIG = Gemma2Config.from_hf_config(gemma2_tiny.CONFIG)


def _load(source, **kw):
  return dp.load_gemma(source, **kw)[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  path = gemma2_tiny.write_folder(tmp_path_factory.mktemp("gemma2") / "tiny")
  gemma2_tiny.tokenizer().save(os.path.join(path, "tokenizer.model"))
  return path


@pytest.fixture(scope="module")
def model(folder):
  return _load(folder)


@pytest.fixture(scope="module")
def logits(model):
  return np.asarray(dp.forward_logits(model, PROMPT))[0]


@pytest.fixture(scope="module")
def clean(model):
  """The activations at every site of every layer, from one run."""
  sites = [f"{kind}.{i}" for kind in dl.sites.KINDS for i in range(4)]
  return dp.run_with_cache(model, PROMPT, sites)[1]


@pz.pytree_dataclass
class SetTo(pz.nn.Layer):
  """Replaces its input by a fixed value (for checking a splice by hand)."""

  value: pz.nx.NamedArray

  def __call__(self, x, **_unused_side_inputs):
    return self.value


def rel_err(got, want):
  return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


# ------------------------------------------------------------------ parity


def test_logits_match_transformers(logits):
  assert np.abs(logits - REF["logits"]).max() < 1e-4


def test_sites_match_transformers(clean):
  cache = clean
  for kind in SITES:
    for i in range(4):
      assert rel_err(cache.array(f"{kind}.{i}")[0], REF[kind][i]) < 1e-4, f"{kind}.{i}"
  # output_hidden_states[i] is block i's input (the embeddings scaled by sqrt(d) for i=0).
  for i in range(4):
    assert rel_err(cache.array(f"resid_pre.{i}")[0], REF["hidden_states"][i]) < 1e-4


def test_every_site_has_a_hookpoint(model):
  assert dp.sites.model_sites(model) == {k: [0, 1, 2, 3] for k in dl.sites.KINDS}
  assert dp.model_config(model) == CONFIG
  # attn_z carries the grouped-query head axes, flattened to 4 heads x 16 in o_proj order.
  assert dp.hooks.site_width(model, dl.sites.attn_z(1)) == 64


def test_kv_cached_greedy_matches_transformers(model):
  new = dp.generate_tokens(model, PROMPT[0], max_new_tokens=len(REF["greedy"]), stop_ids=())
  np.testing.assert_array_equal(new, REF["greedy"])


def test_soft_caps_bound_the_logits(tmp_path):
  """Weights scaled by 4: the final cap (8) binds, and transformers agrees on the result."""
  scaled = _load(gemma2_tiny.write_folder(tmp_path / "scaled", scale=float(REF["scale"])))
  capped = np.asarray(dp.forward_logits(scaled, PROMPT))[0]
  assert np.abs(capped).max() <= CONFIG.final_logit_softcap
  assert np.abs(capped - REF["scaled_logits"]).max() < 1e-4
  assert isinstance(scaled.body.sublayers[-1], pz.nn.TanhSoftCap)
  uncapped = np.asarray(dp.forward_logits(
      pz.select(scaled).at(lambda m: m.body.sublayers[-1]).remove_from_parent(), PROMPT))[0]
  assert np.abs(uncapped).max() > 2 * CONFIG.final_logit_softcap
  # Every block soft-caps its attention logits before the mask: a window on even blocks.
  for i, attn in enumerate(pz.select(scaled).at_instances_of(pz.nn.Attention).get_sequence()):
    cap, mask, _ = attn.query_key_to_attn.sublayers[1:]
    assert isinstance(cap, pz.nn.TanhSoftCap) and float(cap.soft_cap) == CONFIG.attn_logit_softcap
    if i % 2 == 0:
      assert isinstance(mask, pz.nn.ApplyCausalSlidingWindowAttentionMask)
      assert mask.sliding_window_size == CONFIG.sliding_window
    else:
      assert isinstance(mask, pz.nn.ApplyCausalAttentionMask)


# ------------------------------------------------------------------ formats


def test_flax_tree_and_gguf_give_the_same_model(folder, logits, tmp_path):
  ckpt = load_checkpoint(folder)
  assert (ckpt.architecture, ckpt.config) == ("gemma2", CONFIG)
  assert not any("_query_norm" in k for k in ckpt.params)
  # One .safetensors file: its folder's config.json says Gemma 2.
  one = load_checkpoint(os.path.join(folder, "model.safetensors"))
  assert one.architecture == "gemma2" and one.params.keys() == ckpt.params.keys()
  # The flax (Kaggle FLAT) layout of the same tree; a custom size needs its config.
  flax_model = from_gemma2_params(flat_layout(ckpt.params), CONFIG)
  np.testing.assert_allclose(dp.forward_logits(flax_model, PROMPT)[0], logits, atol=1e-5)
  # GGUF: llama.cpp's names, norms stored as 1 + scale; it does not record
  # query_pre_attn_scalar, so this custom size passes its config.
  path = gemma2_tiny.write_gguf(tmp_path / "tiny.gguf")
  assert load_checkpoint(path).config.replace(query_pre_attn_scalar=24, rms_norm_eps=1e-6) == CONFIG
  gguf_model = _load(path, config=CONFIG)
  np.testing.assert_allclose(dp.forward_logits(gguf_model, PROMPT)[0], logits, atol=1e-5)


def test_orbax_checkpoint_is_recognised_as_gemma2(folder, logits, tmp_path):
  """A Kaggle-layout orbax checkpoint (FLAT tree): Gemma 2 by its norms, size by config."""
  ocp = pytest.importorskip("orbax.checkpoint")
  params = {k: np.asarray(v) for k, v in load_checkpoint(folder).params.items()}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "kaggle" / "gemma2-tiny", flat_layout(params))
  checkpointer.wait_until_finished()
  ckpt = load_checkpoint(tmp_path / "kaggle", config=CONFIG)
  assert ckpt.architecture == "gemma2"
  orbax_model = _load(tmp_path / "kaggle", config=CONFIG)
  np.testing.assert_allclose(dp.forward_logits(orbax_model, PROMPT)[0], logits, atol=1e-5)
  with pytest.raises(ValueError, match="match no preset"):
    load_checkpoint(tmp_path / "kaggle")  # No soft-caps or window in a flax tree.


def test_wrong_configs_and_models_are_refused(folder, tmp_path):
  with pytest.raises(ValueError, match="Gemma 2 model; config is a Gemma3Config"):
    _load(folder, config=get_preset("tiny"))
  with pytest.raises(ValueError, match="'gemma2' model .* loads with dictlearn_penzai.load_gemma"):
    dp.load_gemma3(folder)  # The Gemma 3 loader stays Gemma 3 only, and says where to go.
  with pytest.raises(ValueError, match="'gemma2'.* loads with dictlearn_penzai.load_gemma"):
    dp.load_gemma3(gemma2_tiny.write_gguf(tmp_path / "tiny.gguf"))
  with pytest.raises(ValueError, match="does not match the checkpoint: num_layers=26"):
    _load(folder, config="2b")
  params = load_checkpoint(folder).params
  with pytest.raises(ValueError, match="match no preset"):
    from_gemma2_params(params)  # A flax tree of a custom size carries no soft-caps.
  gemma1 = {k: v for k, v in params.items() if "post_" not in k}
  with pytest.raises(ValueError, match="looks like gemma1"):
    from_gemma2_params(gemma1, CONFIG)
  with pytest.raises(ValueError, match="missing 1 tensor"):
    from_gemma2_params({k: v for k, v in params.items() if "layer_3/mlp/linear" not in k},
                       CONFIG)


# ------------------------------------------------------------------ Gemma Scope 1


def write_gs1(root, repo, layer, w_enc, w_dec, b_enc, b_dec, threshold, l0=5):
  """A Gemma Scope 1 folder: ``<repo>/layer_L/width_W/average_l0_N/params.npz``."""
  path = root / repo / f"layer_{layer}" / f"width_{w_enc.shape[1]}" / f"average_l0_{l0}"
  path.mkdir(parents=True)
  np.savez(path / "params.npz", W_enc=w_enc, W_dec=w_dec, b_enc=b_enc, b_dec=b_dec,
           threshold=threshold)
  return path


def identity_gs1(root, repo, layer):
  """An exact dictionary: W_enc = W_dec = I and thresholds below every value."""
  eye = np.eye(64, dtype=np.float32)
  zero = np.zeros(64, np.float32)
  return write_gs1(root, repo, layer, eye, eye, zero, zero, np.full(64, -1e6, np.float32))


@pytest.mark.parametrize("repo,layer,site", [
    ("gemma-scope-tiny-pt-res", 2, "resid_post.2"), ("gemma-scope-tiny-pt-mlp", 1, "mlp_out.1"),
    ("gemma-scope-tiny-pt-att", 3, "attn_z.3")])
def test_exact_gs1_dictionary_changes_nothing(model, logits, tmp_path, repo, layer, site):
  sae = dl.load(identity_gs1(tmp_path, repo, layer))
  assert dl.sites.site_of(sae) == dl.sites.Site.parse(site)
  spliced = np.asarray(dp.forward_logits(dp.splice(model, sae), PROMPT))[0]
  np.testing.assert_allclose(spliced, logits, atol=1e-5)


def test_gs1_splice_is_the_dictionary_on_the_captured_activation(model, clean, tmp_path):
  sae = dl.load(random_gs1(tmp_path, "gemma-scope-tiny-pt-res", 2))
  x = clean.array("resid_post.2")
  recon = dl.forward(sae, x)
  assert 0 < float((dl.encode(sae, x) > 0).mean()) < 1  # Some latents fire, not all.
  # BOS (position 0) is left alone; every other position becomes the reconstruction.
  want = jnp.concatenate([x[:, :1], recon[:, 1:]], axis=1)
  spliced_logits, got = dp.run_with_cache(dp.splice(model, sae), PROMPT, ["resid_post.2"])
  np.testing.assert_allclose(got.array("resid_post.2"), want, atol=1e-5)
  # The rest of the model from there: the same as writing that value in by hand.
  by_hand = attach(model, "resid_post.2", SetTo(value=pz.nx.wrap(want).tag(
      "batch", "seq", "embedding")))
  np.testing.assert_allclose(
      spliced_logits.unwrap("batch", "seq", "vocabulary"),
      dp.forward_logits(by_hand, PROMPT), atol=1e-5)


def random_gs1(root, repo, layer, seed=0, width=32):
  """A random Gemma Scope 1 dictionary on the tiny model whose latents fire now and then."""
  rng = np.random.default_rng(seed)
  return write_gs1(
      root, repo, layer, (rng.standard_normal((64, width)) / 8).astype(np.float32),
      (rng.standard_normal((width, 64)) / 4).astype(np.float32), np.zeros(width, np.float32),
      (0.1 * rng.standard_normal(64)).astype(np.float32), np.full(width, 0.5, np.float32))


@pytest.mark.slow  # About 40 s of CPU: the tour compiles a dozen programs.
def test_tour_runs_on_gemma2_with_gemma_scope_1(folder, tmp_path, capsys):
  from dictlearn_penzai import tour
  sae = random_gs1(tmp_path, "gemma-scope-tiny-pt-res", 2)
  transcoder = random_gs1(tmp_path, "gemma-scope-tiny-pt-transcoders", 1, seed=1)
  out = tmp_path / "report.html"
  assert tour.main(["--model", folder, "--sae", str(sae), "--transcoder", str(transcoder),
                    "--prompt", "the cat sat on the mat and looked at the dog",
                    "--steer-prompt", "my favourite thing is", "--new-tokens", "3",
                    "--out", str(out)]) == 0
  page = out.read_text()
  for sid in ("continuation", "sae-metrics", "top-latents", "logit-lens", "steering",
              "transcoder-metrics", "per-token-loss"):
    assert f'id="{sid}"' in page, sid
  printed = capsys.readouterr().out
  assert "SAE 64x32 at resid_post.2" in printed and "mlp_in.1 -> mlp_out.1" in printed
  from chromium import dump_dom, html_tag
  dom = dump_dom(out.as_uri(), tmp_path / "profile")
  assert "main-svg" in dom, "plotly did not draw the loss plot"
  assert "data-js-errors" not in html_tag(dom), html_tag(dom)


def test_clamp_and_ablate_on_gemma2_are_the_edit_at_the_site(model, clean, tmp_path):
  """clamp writes x + (v - f_i) w_dec[i] at the site (every position but BOS); ablating
  every latent removes all of the reconstruction but the bias: x - (recon - b_dec)."""
  sae = dl.load(random_gs1(tmp_path, "gemma-scope-tiny-pt-res", 2))
  x = clean.array("resid_post.2")
  f = dl.encode(sae, x)
  latent = int(np.argmax(np.asarray((f > 0).sum(axis=(0, 1)))))
  want = x + (3.0 - f[..., latent:latent + 1]) * sae.w_dec[latent]
  want = jnp.concatenate([x[:, :1], want[:, 1:]], axis=1)
  got = dp.run_with_cache(dp.clamp(model, sae, [latent], 3.0), PROMPT, ["resid_post.2"])[1]
  np.testing.assert_allclose(got.array("resid_post.2"), want, atol=1e-4)
  everything = dp.run_with_cache(dp.ablate(model, sae, range(sae.width)), PROMPT,
                                 ["resid_post.2"])[1]
  want = x - (dl.forward(sae, x) - sae.b_dec)
  np.testing.assert_allclose(everything.array("resid_post.2")[:, 1:], want[:, 1:], atol=1e-4)


def test_kv_cached_sampling_with_a_gs1_splice(model, tmp_path):
  sae = dl.load(identity_gs1(tmp_path, "gemma-scope-tiny-pt-att", 1))
  new = dp.generate_tokens(dp.splice(model, sae), PROMPT[0], max_new_tokens=len(REF["greedy"]),
                           stop_ids=())
  np.testing.assert_array_equal(new, REF["greedy"])



def test_load_gemma_still_loads_gemma3(tmp_path):
  """The same entry point gives Gemma 3 for a Gemma 3 folder, as load_gemma3 does."""
  from test_gemma3_loaders import write_hf_folder
  config = get_preset("tiny")
  params = init_gemma_params(config, seed=1)
  write_hf_folder(tmp_path / "gemma3", params, config)
  model = _load(tmp_path / "gemma3")
  assert dp.model_config(model) == config
  tokens = np.array([[2, 40, 41, 7, 300, 12]])
  np.testing.assert_allclose(dp.forward_logits(model, tokens),
                             dp.forward_logits(dp.from_gemma_params(params), tokens), atol=1e-5)
  with pytest.raises(ValueError, match="Gemma 3 model; config is a Gemma2Config"):
    _load(tmp_path / "gemma3", config=CONFIG)
  with pytest.raises(ValueError, match="looks like gemma3"):
    from_gemma2_params(params, CONFIG)


def test_dictlearn_eval_scores_an_exact_gs1_dictionary_one_on_gemma2(folder, tmp_path):
  import json
  from dictlearn_penzai import eval_cli
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  (corpus / "a.txt").write_text("the cat sat on the mat and looked at the dog " * 6)
  exact = identity_gs1(tmp_path, "gemma-scope-tiny-pt-res", 2)
  assert eval_cli.main(["--model", folder, "--dictionary", str(exact), "--corpus", str(corpus),
                        "--tokens", "120", "--seq-len", "16", "--out", str(tmp_path / "out"),
                        "--no-progress"]) == 0
  [result] = (tmp_path / "out").glob("*.json")
  m = json.loads(result.read_text())["eval_result_metrics"]
  assert m["model_performance_preservation"]["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
  assert m["model_behavior_preservation"]["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-5)
