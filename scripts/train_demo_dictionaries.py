"""Trains the tour's demo dictionaries on the Gemma 3 270M; writes them into the package.

  python scripts/train_demo_dictionaries.py [--activations DIR] [--only sae|transcoder]

``--activations DIR`` keeps the harvest in DIR (and reuses it when DIR already holds one).
About 5 minutes of harvesting and 3 of training per dictionary on a 2-core CPU.

One harvest over the default corpus (``dictlearn_gemma.corpus.default_corpus``: English
prose and Python code, interleaved) collects resid_post, mlp_in and mlp_out of layer 9 (the middle of 18 layers; a Gemma Scope 2 sweep layer), then:

* an SAE on resid_post(9), width 2048, target L0 32;
* an affine transcoder mlp_in(9) -> mlp_out(9), width 2048, target L0 32.

Both are saved in the Gemma Scope 2 layout as bfloat16 under
``adapters/dictlearn_penzai/demo/{sae,transcoder}`` (about 5 MB each).
"""

import argparse
import sys
import tempfile
from pathlib import Path

import jax.numpy as jnp

import dictlearn as dl
import dictlearn.train
from dictlearn_penzai import sites
from dictlearn_gemma import corpus
from dictlearn_penzai.harvesting import harvest
from dictlearn_penzai.loading import load_gemma3
from dictlearn_penzai.train_cli import default_model, parser

LAYER, WIDTH, TARGET_L0, TOKENS = 9, 2048, 32.0, 400_000
# `dictlearn train`'s defaults; everything else is fit's.
_CLI = parser()
TRAIN = dict(steps=_CLI.get_default("steps"), batch_size=_CLI.get_default("batch_size"),
             learning_rate=_CLI.get_default("lr"), seed=_CLI.get_default("seed"))
OUT = Path(__file__).resolve().parents[1] / "adapters" / "dictlearn_penzai" / "demo"


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--activations", help="keep (or reuse) the harvest in this folder")
  ap.add_argument("--only", choices=["sae", "transcoder"])
  args = ap.parse_args()
  src, mid, dst = sites.resid_post(LAYER), sites.mlp_in(LAYER), sites.mlp_out(LAYER)
  with tempfile.TemporaryDirectory() as tmp:
    acts = Path(args.activations or tmp)
    corpus_name, docs = corpus.default_corpus()
    if (acts / "resid_post_9" / "meta.json").exists():
      folders = {s: str(acts / f"{s.kind}_{s.layer}") for s in (src, mid, dst)}
    else:
      model, tok = load_gemma3(default_model())
      folders = harvest(model, tok, corpus.documents(docs), [src, mid, dst], seq_len=128, batch_size=8,
                        out=acts, max_tokens=TOKENS, model_name="gemma-3-270m")
    jobs = {
        "sae": dict(data=folders[src], kind="sae", site=src, site_out=src, targets=None),
        "transcoder": dict(data=folders[mid], kind="transcoder", site=mid, site_out=dst,
                           targets=folders[dst]),
    }
    for name, job in jobs.items():
      if args.only and name != args.only:
        continue
      meta = dl.DictMeta(kind=job["kind"], site=job["site"].kind, layer=LAYER,
                         site_out=job["site_out"].kind, model_name="gemma-3-270m",
                         hook_point_in=job["site"].hook_point,
                         hook_point_out=job["site_out"].hook_point,
                         source=f"scripts/train_demo_dictionaries.py ({TOKENS} tokens of "
                                f"{corpus_name})")
      d, hist = dl.train.fit(job["data"], kind=job["kind"], width=WIDTH, target_l0=TARGET_L0,
                             targets=job["targets"], affine=True, meta=meta, **TRAIN)
      d = d.replace(meta=d.meta.replace(l0=round(float(hist["l0"][-1]), 2)))
      dl.save(d.astype(jnp.bfloat16), OUT / name)
      print(f"{name}: FVU {hist['fvu'][-1]:.3f}  L0 {hist['l0'][-1]:.1f}  "
            f"dead {hist['dead_fraction'][-1]:.2%}", flush=True)


if __name__ == "__main__":
  sys.exit(main())
