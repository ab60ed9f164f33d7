"""One process of tests/test_distributed.py's many-process run on the tiny random Gemma.

``python distributed_worker_penzai.py PORT NUM_PROCESSES PROCESS_ID WORKDIR`` joins the
run, then every process:

1. ``harvest``s mlp_in.2 and mlp_out.2 of :data:`TEXTS` into WORKDIR/acts with a token
   limit (each process its block, process 0 merges the parts);
2. the same in memory without a limit -> WORKDIR/<site>_<i>.npy (this process's rows; the
   same sites and batch shape, so no new compilation);
3. ``evaluate``s :func:`dictionaries` over :data:`TEXTS` -> WORKDIR/eval_<i>.json (every
   process writes its copy of the reduced result).

The test imports the settings below for its one-process references.
"""

import json
import os
import sys

import numpy as np

SEQ_LEN, HARVEST_BATCH, EVAL_SEQ, EVAL_BATCH, MAX_TOKENS = 9, 4, 8, 3, 200
TEXTS = [f"{i} the quick brown fox jumps over the lazy dog {'ab' * i} pack my box with "
         f"five dozen jugs; sphinx of black quartz, judge my vow {i * 7}" for i in range(9)]


class CharTokenizer:
  """One id per character, as tests/test_harvest.py's."""
  bos_id = 2

  def encode(self, text, add_bos=True):
    from penzai_tiny import VOCAB
    return ([2] if add_bos else []) + [3 + ord(c) % (VOCAB - 3) for c in text]


def model():
  from penzai_tiny import tiny_model
  return tiny_model(seed=3)


def sites():
  from dictlearn_penzai import sites as S
  return [S.mlp_in(2), S.mlp_out(2)]


def dictionaries():
  """One transcoder (each dictionary costs compilations of its spliced run: one keeps the
  test short on a busy machine; CorpusEval's reduction treats every one alike)."""
  import jax
  import dictlearn as dl
  from penzai_tiny import D_MODEL
  tc = dl.random_dictionary(jax.random.key(1), D_MODEL, 32, kind="transcoder",
                            threshold=0.1, meta=dl.DictMeta(kind="transcoder", site="mlp_in",
                                                            layer=2, site_out="mlp_out"))
  return {"tc": tc}


def run(m, workdir, tag: str):
  """Every step above; ``tag`` names this process's files."""
  from dictlearn_penzai.evaluate import evaluate
  from dictlearn_penzai.harvesting import harvest
  pair = sites()
  harvest(m, CharTokenizer(), TEXTS, pair, seq_len=SEQ_LEN, batch_size=HARVEST_BATCH,
          out=os.path.join(workdir, "acts"), max_tokens=MAX_TOKENS, progress=False,
          model_name="tiny")
  rows = harvest(m, CharTokenizer(), TEXTS, pair, seq_len=SEQ_LEN,
                 batch_size=HARVEST_BATCH, progress=False)
  for s, a in rows.items():
    np.save(os.path.join(workdir, f"{s.kind}_{s.layer}_{tag}.npy"), a)
  results = evaluate(m, CharTokenizer(), TEXTS, dictionaries(), tokens=None,
                     seq_len=EVAL_SEQ, batch_size=EVAL_BATCH, progress=False)
  with open(os.path.join(workdir, f"eval_{tag}.json"), "w") as f:
    json.dump(results, f)


def main(port: str, num_processes: str, process_id: str, workdir: str) -> None:
  from dictlearn import distributed as dist
  dist.initialize(f"localhost:{port}", int(num_processes), int(process_id))
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
  run(model(), workdir, process_id)
  dist.barrier("done")


if __name__ == "__main__":
  main(*sys.argv[1:5])
