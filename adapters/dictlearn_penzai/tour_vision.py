"""``dictlearn tour --image PATH``: what an SAE sees in an image, on a Gemma 3 4B, 12B or 27B.

Loads the model with its vision tower and the SAE, puts the image in the prompt as Gemma 3's
processor does (``dictlearn_penzai.vision.prepare``), prints the model's greedy
continuation, the SAE's top latents over the image's soft tokens only, the strongest one's
activation over the whole prompt (image tokens shown as ``<img k>``) and the SAE's FVU and
L0 on the image tokens, and writes the same as an HTML report. The transcoder and steering steps of the text tour are left out.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from dictlearn_penzai.vision import BOI_TEXT


def run(args, report, step, fail) -> int:
  """The image tour; ``report``, ``step`` and ``fail`` are ``tour``'s report, step timer and
  error printer. Returns the exit status."""
  import dictlearn as dl
  from dictlearn_penzai import analysis as A
  from dictlearn_penzai import hooks, sites
  from dictlearn_penzai import vision as V
  from dictlearn_penzai.loading import load_gemma

  if not args.model:
    return fail("--image needs --model: a Gemma 3 4B, 12B or 27B folder with its vision weights "
                "(the default 270M reads text only)")
  if not Path(args.image).is_file():
    return fail(f"no image at {args.image}")
  with step("Load the SAE and the model (with its vision tower)") as s:
    try:
      sae = dl.load(args.sae)
    except FileNotFoundError as e:
      return fail(f"cannot load the SAE {args.sae!r}: {e}")
    model, tok = load_gemma(args.model)
    if tok is None:
      return fail(f"no tokenizer with {args.model}: put its tokenizer.model beside the weights")
    try:
      stitch = V.vision_of(model)
    except ValueError as e:
      return fail(str(e))
    site = sites.as_site(args.site) if args.site else sites.site_of(sae)
    width = hooks.site_width(model, sites.check_site(model, site))
    if width is not None and width != sae.d_in:
      return fail(f"the SAE expects d_in={sae.d_in} but the site {site} of this model carries "
                  f"{width}: pick a dictionary trained for this model")
    c = stitch.vision_config
    print(f"   model {Path(args.model).name} (images {c.image_size}px -> "
          f"{c.mm_tokens_per_image} tokens); SAE {sae.d_in}x{sae.width} at {site}")
    report.add(s.title, f"<p>model <code>{html.escape(str(args.model))}</code><br>"
               f"SAE <code>{html.escape(args.sae)}</code> ({sae.d_in} &rarr; {sae.width} "
               f"latents, site {site})<br>image <code>{html.escape(str(args.image))}</code> "
               f"({c.image_size} &times; {c.image_size} px, {c.mm_tokens_per_image} soft "
               "tokens)</p>")

  prompt = args.image_prompt if BOI_TEXT in args.image_prompt else BOI_TEXT + args.image_prompt
  try:
    inputs = V.prepare(model, tok, prompt, [args.image])
  except (ValueError, FileNotFoundError) as e:
    return fail(str(e))
  strings = inputs.token_strings(tok)

  with step("What the model says about the image (greedy)") as s:
    new = V.generate_greedy(model, inputs, args.new_tokens, stop_ids=(tok.eos_id,))
    cont = tok.decode([int(i) for i in new], skip_special_tokens=True)
    print(f"   {args.image_prompt}\033[1m{cont}\033[0m")
    report.add(s.title, f"<p>{html.escape(args.image_prompt)}<b>{html.escape(cont)}</b></p>",
               section_id="image-continuation")

  with step(f"Which latents fire on the image's {int(inputs.image_positions.sum())} tokens") as s:
    _, cache = hooks.run_with_cache(model, inputs.tokens, [site], **inputs.side_inputs)
    top = A.top_latents(sae, cache[site], k=10, mask=inputs.image_positions)
    latent = int(top.prompt_indices[0, 0])
    print("\n".join("   " + line for line in top.table(0).splitlines()))
    acts = A.latent_activations(sae, cache[site], latent)[0]
    on_image = np.asarray(acts)[inputs.image_positions[0]]
    print(f"   latent {latent}: max {on_image.max():.3g} on the image, "
          f"{np.asarray(acts)[~inputs.image_positions[0]][1:].max(initial=0):.3g} on the text")
    highlight = A.token_activation_html(strings, acts, title=f"latent {latent} over the prompt")
    report.add(s.title, "<pre>" + html.escape(top.table(0)) + "</pre>" + str(highlight),
               section_id="image-top-latents")

  with step(f"How well the SAE reconstructs {site} on the image's tokens") as s:
    # Over image tokens only; the next-token loss there is not meaningful (nobody predicts
    # soft tokens), so the report shows FVU and L0.
    rep = A.reconstruction_report(model, inputs.tokens, sae, site,
                                  mask=inputs.image_positions, side_inputs=inputs.side_inputs)
    print(f"   FVU {rep.fvu:.2%}  L0 {rep.l0:.1f} over {rep.n_tokens} image tokens")
    report.add(s.title, f"<table><tr><th>FVU</th><th>L0</th><th>image tokens</th></tr>"
               f"<tr><td>{rep.fvu:.2%}</td><td>{rep.l0:.1f}</td><td>{rep.n_tokens}</td></tr>"
               "</table>", section_id="image-reconstruction")
  return 0


__all__ = ["run"]
