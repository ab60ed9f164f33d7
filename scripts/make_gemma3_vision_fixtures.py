"""Writes ``tests/fixtures/gemma3_vision/``: a tiny random Gemma 3 vision-language model saved
by transformers, and what transformers computes with it.

Run in a reference venv (not the project's), from the repository root:

  python3.11 -m venv /work/tfvenv
  /work/tfvenv/bin/pip install torch==2.13.0          # first: the CPU wheel
  /work/tfvenv/bin/pip install 'transformers>=5,<6' safetensors pillow numpy sentencepiece protobuf
  # the tiny tokenizer, written once by the project's own venv:
  .venv/bin/python -c "import sys; sys.path.insert(0, 'tests'); import gemma3_vision_tiny as t; \
      t.tokenizer().save('tests/fixtures/gemma3_vision/tokenizer.model')"
  /work/tfvenv/bin/python scripts/make_gemma3_vision_fixtures.py

The sizes are in ``tests/gemma3_vision_tiny.py``. Written into the fixture folder:

  config.json, model.safetensors   ``Gemma3ForConditionalGeneration.save_pretrained`` (float32;
                   every tensor drawn from ``SEED`` with numpy, the projector included, which
                   transformers would initialise to zero)
  tokenizer_config.json            so transformers' ``GemmaTokenizer`` reads tokenizer.model
  image_0.png, image_1.png         the two test images (RGB 70 x 40, greyscale 20 x 20)
  reference.npz    from ``Gemma3Processor`` (``Gemma3ImageProcessorPil``, 56 x 56) and the
                   model, eager attention:
    input_ids (1, S) int32, token_type_ids (1, S)   the processor's output for PROMPT
    pixel_values (2, 56, 56, 3) float32   the processor's, channels last
    image_features (2, 4, 32)   ``get_image_features(...).pooler_output``
    vision_hidden (2, 16, 32)   the SigLIP encoder's last hidden state (after post LayerNorm)
    logits (S, 384)
    resid_post, attn_z, mlp_in, mlp_out (7, S, 32 or 64)   forward hooks on
                   ``model.model.language_model.layers[L]``, ``.self_attn.o_proj`` (input),
                   ``.pre_feedforward_layernorm``, ``.post_feedforward_layernorm``
    mask_full, mask_sliding (S, S) bool   ``create_masks_for_vision_model`` (True = attend)
    greedy (6,) int32   ``generate(do_sample=False)`` with the images, KV-cached
    batch_input_ids, batch_token_type_ids, batch_attention_mask (2, B)   the processor on
                   [PROMPT, BATCH_PROMPT] with [[image 0, image 1], [image 1]], left-padded
    batch_logits (2, B, 384)   the model on that batch (pad rows are not compared)
  README.md   the versions
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import PIL
import torch
import transformers
from safetensors.numpy import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import gemma3_vision_tiny as tiny  # noqa: E402

OUT = os.path.join(HERE, "..", "tests", "fixtures", "gemma3_vision")


def _first(x):
  return x[0] if isinstance(x, tuple) else x


def build_model():
  config = transformers.Gemma3Config(**{k: v for k, v in tiny.CONFIG.items()
                                        if k not in ("architectures", "model_type")})
  model = transformers.Gemma3ForConditionalGeneration(config).to(torch.float32)
  rng = np.random.default_rng(tiny.SEED)
  with torch.no_grad():
    for name, param in sorted(model.named_parameters()):
      param.copy_(torch.from_numpy(tiny.random_value(name, tuple(param.shape), rng)))
  model.config._attn_implementation = "eager"
  return model.eval()


def processor():
  with open(os.path.join(OUT, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "GemmaTokenizer", "add_bos_token": True,
               "add_eos_token": False, "extra_special_tokens": {
                   "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                   "image_token": "<image_soft_token>"}}, f, indent=1)
  tok = transformers.AutoTokenizer.from_pretrained(OUT)
  images = transformers.Gemma3ImageProcessorPil(
      size={"height": tiny.IMAGE_SIZE, "width": tiny.IMAGE_SIZE})
  return transformers.Gemma3Processor(image_processor=images, tokenizer=tok,
                                      image_seq_length=tiny.MM_TOKENS)


def main():
  if not os.path.isfile(os.path.join(OUT, "tokenizer.model")):
    sys.exit("write tests/fixtures/gemma3_vision/tokenizer.model first (see the docstring)")
  images = tiny.images()
  for i, im in enumerate(images):
    im.save(os.path.join(OUT, f"image_{i}.png"))
  images = [PIL.Image.open(os.path.join(OUT, f"image_{i}.png")) for i in range(len(images))]
  proc = processor()
  inputs = proc(text=tiny.PROMPT, images=[images], return_tensors="pt")
  ids, types, pixels = inputs["input_ids"], inputs["token_type_ids"], inputs["pixel_values"]
  assert ids[0, 0] == 2, "BOS first"

  model = build_model()
  model.save_pretrained(OUT, safe_serialization=True)
  saved = load_file(os.path.join(OUT, "model.safetensors"))
  print("saved tensor names, e.g.:", *sorted(saved)[:3], *sorted(saved)[-3:], sep="\n  ")

  lm = model.model.language_model
  grabbed = {k: [] for k in ("resid_post", "attn_z", "mlp_in", "mlp_out")}
  handles = []
  for layer in lm.layers:
    def out_hook(kind):
      return lambda mod, inp, out: grabbed[kind].append(_first(out)[0].detach().numpy())
    handles += [
        layer.register_forward_hook(out_hook("resid_post")),
        layer.pre_feedforward_layernorm.register_forward_hook(out_hook("mlp_in")),
        layer.post_feedforward_layernorm.register_forward_hook(out_hook("mlp_out")),
        layer.self_attn.o_proj.register_forward_pre_hook(
            lambda mod, inp: grabbed["attn_z"].append(inp[0][0].detach().numpy())),
    ]
  masks = {}
  original = transformers.models.gemma3.modeling_gemma3.create_masks_for_vision_model

  def spy(**kwargs):
    out = original(**kwargs)
    masks.update(out)
    return out

  transformers.models.gemma3.modeling_gemma3.create_masks_for_vision_model = spy
  with torch.no_grad():
    out = model(input_ids=ids, pixel_values=pixels, token_type_ids=types)
    feats = model.get_image_features(pixel_values=pixels)
  transformers.models.gemma3.modeling_gemma3.create_masks_for_vision_model = original
  for h in handles:
    h.remove()

  def as_bool(mask):  # eager masks are additive floats (0 = attend) or bools
    m = mask[0, 0].numpy()
    return m if m.dtype == bool else (m == 0)

  with torch.no_grad():
    greedy = model.generate(input_ids=ids, pixel_values=pixels, token_type_ids=types,
                            max_new_tokens=tiny.NEW_TOKENS, min_new_tokens=tiny.NEW_TOKENS,
                            do_sample=False, bad_words_ids=[[0]], eos_token_id=None,
                            pad_token_id=0)
  proc.tokenizer.padding_side = "left"
  batch = proc(text=[tiny.PROMPT, tiny.BATCH_PROMPT], images=[images, images[1:]],
               padding=True, return_tensors="pt")
  with torch.no_grad():
    batch_logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                         token_type_ids=batch["token_type_ids"],
                         attention_mask=batch["attention_mask"]).logits
  arrays = dict(
      batch_input_ids=batch["input_ids"].numpy().astype(np.int32),
      batch_token_type_ids=batch["token_type_ids"].numpy().astype(np.int32),
      batch_attention_mask=batch["attention_mask"].numpy().astype(np.int32),
      batch_logits=batch_logits.numpy().astype(np.float32),
      input_ids=ids.numpy().astype(np.int32), token_type_ids=types.numpy().astype(np.int32),
      pixel_values=pixels.numpy().transpose(0, 2, 3, 1).astype(np.float32),
      image_features=feats.pooler_output.numpy().astype(np.float32),
      vision_hidden=feats.last_hidden_state.numpy().astype(np.float32),
      logits=out.logits[0].numpy().astype(np.float32),
      mask_full=as_bool(masks["full_attention"]), mask_sliding=as_bool(masks["sliding_attention"]),
      greedy=greedy[0, ids.shape[1]:].numpy().astype(np.int32),
      **{k: np.stack(v).astype(np.float32) for k, v in grabbed.items()})
  np.savez_compressed(os.path.join(OUT, "reference.npz"), **arrays)
  with open(os.path.join(OUT, "README.md"), "w") as f:
    f.write(f"Written by scripts/make_gemma3_vision_fixtures.py with transformers "
            f"{transformers.__version__}, torch {torch.__version__}, Pillow {PIL.__version__}, "
            f"numpy {np.__version__}, Python {sys.version.split()[0]}, on CPU "
            f"(image processor: {type(proc.image_processor).__name__}).\n")
  for k, v in arrays.items():
    print(f"{k:16s} {v.shape} {v.dtype}")
  print("ids", arrays["input_ids"].tolist(), "greedy", arrays["greedy"].tolist())
  total = sum(os.path.getsize(os.path.join(OUT, n)) for n in os.listdir(OUT))
  print(f"wrote {OUT} ({total} bytes)")


if __name__ == "__main__":
  main()
