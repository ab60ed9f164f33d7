"""Writes ``tests/fixtures/gemma2_tiny.npz``: transformers' outputs for the tiny random Gemma 2.

Run in a reference venv (not the project's), from the repository root:

  python3.11 -m venv /work/tfvenv
  /work/tfvenv/bin/pip install torch==2.13.0          # first: the CPU wheel
  /work/tfvenv/bin/pip install 'transformers>=5,<6' safetensors numpy
  /work/tfvenv/bin/python scripts/make_gemma2_fixtures.py

The weights are not stored: ``tests/gemma2_tiny.py`` rebuilds the same safetensors folder
from its seed, here and in the tests. Recorded, all float32 from ``Gemma2ForCausalLM`` with
eager attention (the soft-capped path):

  prompt           (20,)        token ids (BOS first; longer than the window of 8)
  logits           (20, 320)    final (soft-capped) logits
  hidden_states    (5, 20, 64)  ``output_hidden_states`` (embeddings, then each layer's)
  resid_post, attn_out, mlp_in, mlp_out   (4, 20, 64)   forward hooks, one row per layer:
                   ``model.layers[L]`` output, ``post_attention_layernorm``,
                   ``pre_feedforward_layernorm``, ``post_feedforward_layernorm`` outputs
  attn_z           (4, 20, 64)  ``self_attn.o_proj`` input (heads x head_dim)
  greedy           (8,)         ``generate(do_sample=False)`` (KV-cached), the pad id 0 banned
  scaled_logits    (20, 320)    logits of the same weights scaled by 4 (the caps bind)
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import gemma2_tiny  # noqa: E402

OUT = os.path.join(HERE, "..", "tests", "fixtures", "gemma2_tiny.npz")
SCALE = 4.0


def _load(folder):
  model = transformers.AutoModelForCausalLM.from_pretrained(
      folder, dtype=torch.float32, attn_implementation="eager")
  assert type(model).__name__ == "Gemma2ForCausalLM", type(model)
  return model.eval()


def _first(x):
  return x[0] if isinstance(x, tuple) else x


def main():
  ids = torch.tensor([gemma2_tiny.PROMPT])
  with tempfile.TemporaryDirectory() as tmp:
    model = _load(gemma2_tiny.write_folder(os.path.join(tmp, "tiny")))
    grabbed = {k: [] for k in ("resid_post", "attn_out", "mlp_in", "mlp_out", "attn_z")}
    handles = []
    for layer in model.model.layers:
      def out_hook(kind):
        return lambda mod, inp, out: grabbed[kind].append(_first(out)[0].detach().numpy())
      handles += [
          layer.register_forward_hook(out_hook("resid_post")),
          layer.post_attention_layernorm.register_forward_hook(out_hook("attn_out")),
          layer.pre_feedforward_layernorm.register_forward_hook(out_hook("mlp_in")),
          layer.post_feedforward_layernorm.register_forward_hook(out_hook("mlp_out")),
          layer.self_attn.o_proj.register_forward_pre_hook(
              lambda mod, inp: grabbed["attn_z"].append(inp[0][0].detach().numpy())),
      ]
    with torch.no_grad():
      out = model(ids, output_hidden_states=True)
    for h in handles:
      h.remove()
    with torch.no_grad():
      greedy = model.generate(ids, max_new_tokens=gemma2_tiny.NEW_TOKENS, do_sample=False,
                              bad_words_ids=[[0]], eos_token_id=None, pad_token_id=0,
                              min_new_tokens=gemma2_tiny.NEW_TOKENS)
    scaled = _load(gemma2_tiny.write_folder(os.path.join(tmp, "scaled"), scale=SCALE))
    with torch.no_grad():
      scaled_logits = scaled(ids).logits[0].numpy()
  arrays = dict(
      prompt=np.asarray(gemma2_tiny.PROMPT, np.int32),
      logits=out.logits[0].numpy().astype(np.float32),
      hidden_states=np.stack([h[0].numpy() for h in out.hidden_states]).astype(np.float32),
      greedy=greedy[0, ids.shape[1]:].numpy().astype(np.int32),
      scaled_logits=scaled_logits.astype(np.float32),
      scale=np.float32(SCALE),
      transformers_version=np.array(transformers.__version__),
      torch_version=np.array(torch.__version__),
      **{k: np.stack(v).astype(np.float32) for k, v in grabbed.items()})
  np.savez_compressed(OUT, **arrays)
  for k, v in arrays.items():
    print(f"{k:14s} {v.shape} {v.dtype}")
  print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
  main()
