"""Attribution graphs: dictlearn against circuit-tracer 0.5 on the real Gemma 3 270M (CPU).

One run, each side in its own subprocess (so each peak RSS is its own process's):

- prepare (this venv): the prompt's token ids and the transcoders' thresholds, from our
  clean run of the 270M (written to a temporary folder both sides read);
- ours (this venv): ``dictlearn_penzai.circuits.attribute`` twice on the same prompt (the
  first call compiles, the second reuses the compiled rows);
- circuit-tracer (``--ct-python``, default /work/ctvenv/bin/python): the model loaded as
  scripts/make_circuit_fixtures.py loads it (transformers 4.57 dequantizes the same GGUF,
  TransformerLens backend, circuit-tracer's shared-RoPE bug fixed), then its ``attribute``.

Target 1 (default): 18 per-layer transcoders with affine skip (the ``skip`` fixture case:
seed, width and scales from tests/fixtures/circuits/skip.npz, thresholds chosen for this
prompt as the fixture script chooses them, so no latent sits within 0.05 of its
threshold), a 13-token prompt (the first 13 ids of reference prompt 1, BOS first), 5 logits
at desired_logit_prob 0.95, every active feature. Both graphs are compared (active
features, logits, adjacency) so the times are of the same graph.

Target 2 (``--long``): a ``--n-tokens`` (default 1024) prompt (the reference prompts' ids
concatenated after one BOS, repeated), the same seeded transcoders with per-layer quantile
thresholds (``--firing`` latents per position and layer on average), max_feature_nodes
``--max-feature-nodes`` (4096); ours only unless ``--long-peer``.

Peak memory is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end of each worker;
"before" is the RSS after loading (before the first attribution call), and "during" the
highest RSS sampled every 5 ms while attribution runs. Batch sizes default to each tool's
own default (ours 64, circuit-tracer 0.5's 512). circuit-tracer's "Forward pass" phase
runs the prompt ``batch_size`` times over (``input_ids.expand(batch_size, -1)``, so each
backward pass has a batch of cotangents), so its batch size sets that phase's cost.

  python benchmarks/bench_circuits.py                     # target 1
  python benchmarks/bench_circuits.py --long --n-tokens 256
  python benchmarks/bench_circuits.py --batch-size 64     # both tools at 64 rows
  python benchmarks/bench_circuits.py --warm-cache        # + ours in a second process
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
CASE = FIXTURES / "circuits" / "skip.npz"
PROMPT_INDEX = 1  # "The capital of France is Paris, and the capital of Italy is": 14 ids
N_SHORT = 13
MAX_N_LOGITS = 5
DESIRED_LOGIT_PROB = 0.95
OURS_BATCH = 64   # dictlearn_penzai.circuits.attribute's default
CT_BATCH = 512    # circuit_tracer.attribute's default (0.5.0)
GB = 1024 ** 3


# --- memory --------------------------------------------------------------------------

def rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maxrss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class RSSSampler:
  """The highest RSS seen every ``interval`` seconds while the block runs."""

  def __init__(self, interval=0.005):
    self.interval, self.peak, self._stop = interval, 0, threading.Event()

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, rss_bytes())
      self._stop.wait(self.interval)

  def __enter__(self):
    self.peak = rss_bytes()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, rss_bytes())


# --- prompt and transcoders -----------------------------------------------------------

def prompt_ids(n_tokens: int) -> np.ndarray:
  prompts = json.load(open(FIXTURES / "gemma3_270m_reference.json"))["prompts"]
  if n_tokens <= len(prompts[PROMPT_INDEX]["ids"]):
    ids = prompts[PROMPT_INDEX]["ids"][:n_tokens]
  else:  # every prompt without its BOS, after one BOS, repeated
    body = [i for p in prompts for i in p["ids"][1:]]
    ids = [2] + (body * (n_tokens // len(body) + 1))[:n_tokens - 1]
  assert ids[0] == 2 and 2 not in ids[1:], ids[:4]
  return np.asarray(ids, np.int64)


def quantile_thresholds(pre, firing):
  """One threshold per layer: its (1 - firing / width) quantile over non-BOS positions."""
  width = pre.shape[-1]
  q = 1.0 - firing / width
  return np.stack([np.full(width, np.quantile(pre[L, 1:], q), np.float32)
                   for L in range(pre.shape[0])])


def case_params(spec):
  """The seeded skip transcoders (Gemma Scope 2 layout, numpy) for ``spec``."""
  sys.path.insert(0, str(ROOT / "tests"))
  import circuit_transcoders as CT
  return CT.make_plt(int(spec["seed"]), spec["thresholds"], int(spec["width"]),
                     spec["enc_scale"], spec["dec_scale"], spec["skip_scale"])


# --- workers -------------------------------------------------------------------------

def load_ours():
  from dictlearn_penzai.loading import load_gemma3
  from dictlearn_penzai.train_cli import default_model
  model, _ = load_gemma3(default_model())
  return model


def worker_prepare(args):
  from dictlearn import attribution
  from dictlearn_penzai import circuits
  sys.path.insert(0, str(ROOT / "tests"))
  import circuit_transcoders as CT
  z = np.load(CASE)
  seed, width = int(z["seed"]), int(z["width"])
  ids = prompt_ids(args.n_tokens)
  lin = circuits.linearizable(load_ours())
  mlp_in = np.asarray(attribution.clean_run(lin.model, lin.embeddings(ids)).mlp_in)
  pre = np.stack([mlp_in[L] @ w + b for L, (w, b) in enumerate(
      CT.encoder(seed, L, width, z["enc_scale"][L]) for L in range(len(mlp_in)))])
  if args.target == "short":
    thresholds = CT.choose_thresholds(pre, seed)
  else:
    thresholds = quantile_thresholds(pre, args.firing)
  firing = (pre > thresholds[:, None])[:, 1:]
  np.savez(args.spec, ids=ids, thresholds=thresholds, seed=seed, width=width,
           enc_scale=z["enc_scale"], dec_scale=z["dec_scale"], skip_scale=z["skip_scale"],
           mean_firing=firing.sum(-1).mean(), positions_without=(~firing.any((0, 2))).sum())


def _save_result(args, res, arrays):
  res["peak_rss"] = maxrss_bytes()
  np.savez(args.result, meta=np.array(json.dumps(res)), **arrays)


def worker_ours(args):
  import jax
  import jaxlib
  import dictlearn
  from dictlearn_penzai import circuits
  spec = np.load(args.spec)
  if args.jax_cache:
    from dictlearn import cache
    cache.enable_compilation_cache(args.jax_cache)
  t0 = time.perf_counter()
  model = load_ours()
  tcs = {L: dictlearn.Transcoder(
      w_enc=jax.numpy.asarray(p["w_enc"]), b_enc=jax.numpy.asarray(p["b_enc"]),
      threshold=jax.numpy.asarray(p["threshold"]), w_dec=jax.numpy.asarray(p["w_dec"]),
      b_dec=jax.numpy.asarray(p["b_dec"]),
      w_skip=jax.numpy.asarray(p["affine_skip_connection"]))
      for L, p in enumerate(case_params(spec))}
  res = {"tool": "dictlearn", "load_s": time.perf_counter() - t0, "batch_size": args.batch_size,
         "rss_before": rss_bytes(), "peak_before": maxrss_bytes(), "calls": [],
         "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__}}
  ids = spec["ids"]
  kw = dict(max_n_logits=MAX_N_LOGITS, desired_logit_prob=DESIRED_LOGIT_PROB,
            max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size,
            progress=args.target == "long")  # (a bar costs nothing next to a long row)
  for _ in range(args.repeats):
    with RSSSampler() as s:
      t = time.perf_counter()
      g = circuits.attribute(model, ids, tcs, **kw)
      dt = time.perf_counter() - t
    res["calls"].append({"wall_s": dt, "rss_during": s.peak})
    print(f"  dictlearn call {len(res['calls'])}: {dt:.2f} s", file=sys.stderr, flush=True)
  res["n_active"] = len(g.active_features)
  res["rows"] = len(g.selected_features) + len(g.logit_tokens)
  _save_result(args, res, {
      "active_features": g.active_features, "selected_features": g.selected_features,
      "logit_tokens": g.logit_tokens, "logit_probabilities": g.logit_probabilities,
      "adjacency": g.adjacency if args.keep_adjacency else np.zeros((0, 0), np.float32)})


def worker_ct(args):
  import torch
  sys.path.insert(0, str(ROOT / "scripts"))
  import make_circuit_fixtures as F
  from circuit_tracer import __version__ as ct_version
  from circuit_tracer import attribute
  spec = np.load(args.spec)
  t0 = time.perf_counter()
  _, tok, hf = F.load_hf()
  rm, rope_bug = F.build_replacement(hf, tok, F.to_circuit_tracer("skip", case_params(spec)))
  assert rope_bug, "circuit-tracer no longer shares the RoPE tables: recheck fix_rope"
  del hf  # (the replacement model holds its own TransformerLens weights)
  import gc
  gc.collect()
  res = {"tool": "circuit-tracer", "load_s": time.perf_counter() - t0,
         "batch_size": args.batch_size, "rss_before": rss_bytes(),
         "peak_before": maxrss_bytes(), "calls": [],
         "versions": {"torch": torch.__version__, "circuit_tracer": ct_version,
                      "torch_threads": torch.get_num_threads()}}
  ids = [int(i) for i in spec["ids"]]
  torch.manual_seed(0)
  for _ in range(args.repeats):
    log = io.StringIO()
    with RSSSampler() as s, contextlib.redirect_stderr(log):
      t = time.perf_counter()
      g = attribute(ids, rm, max_n_logits=MAX_N_LOGITS, desired_logit_prob=DESIRED_LOGIT_PROB,
                    max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size,
                    verbose=True)
      dt = time.perf_counter() - t
    phases = {m.group(1): float(m.group(2)) for m in re.finditer(
        r"^(\w[\w ]*?) completed in ([\d.]+)s", log.getvalue(), re.M)}
    res["calls"].append({"wall_s": dt, "rss_during": s.peak, "phases": phases})
    print(f"  circuit-tracer call {len(res['calls'])}: {dt:.2f} s {phases}", file=sys.stderr,
          flush=True)
  res["n_active"] = len(g.active_features)
  res["rows"] = len(g.selected_features) + len(g.logit_targets)
  _save_result(args, res, {
      "active_features": g.active_features.numpy(),
      "selected_features": g.selected_features.numpy(),
      "logit_tokens": np.array([t.vocab_idx for t in g.logit_targets]),
      "logit_probabilities": g.logit_probabilities.numpy(),
      "adjacency": (g.adjacency_matrix.numpy() if args.keep_adjacency
                    else np.zeros((0, 0), np.float32))})


WORKERS = {"prepare": worker_prepare, "ours": worker_ours, "ct": worker_ct}


# --- the run -------------------------------------------------------------------------

def run_worker(python, name, common, result=None, extra=()):
  cmd = [python, __file__, "--worker", name, *common, *extra]
  if result:
    cmd += ["--result", result]
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false")
  t = time.perf_counter()
  subprocess.run(cmd, check=True, env=env)
  wall = time.perf_counter() - t
  if result is None:
    return None
  z = np.load(result)
  meta = json.loads(str(z["meta"]))
  meta["process_s"] = wall
  return meta, {k: z[k] for k in z.files if k != "meta"}


def compare(a, b):
  """Whether two graphs are the same graph: active features, selection, logits, edges."""
  out = {"active_equal": bool(np.array_equal(a["active_features"], b["active_features"])),
         "selected_equal": bool(np.array_equal(a["selected_features"], b["selected_features"])),
         "logits_equal": bool(np.array_equal(a["logit_tokens"], b["logit_tokens"]))}
  if out["active_equal"] and a["adjacency"].shape == b["adjacency"].shape and a["adjacency"].size:
    d = np.abs(a["adjacency"].astype(np.float64) - b["adjacency"])
    out["adj_max_abs_diff_rel"] = float(d.max() / np.abs(b["adjacency"]).max())
    scale = np.abs(b["adjacency"]).max(axis=1, keepdims=True)
    out["adj_max_diff_rel_to_row_max"] = float((d / np.maximum(scale, 1e-30)).max())
  return out


def machine_line(versions, load):
  cpu = "?"
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  with open("/proc/meminfo") as f:
    mem = int(f.readline().split()[1]) / 1024 ** 2
  v = ", ".join(f"{k} {x}" for k, x in versions.items() if x is not None)
  return (f"machine: {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.machine()}, "
          f"Python {platform.python_version()}; {v}; load average before "
          f"{'/'.join(f'{x:.2f}' for x in load)}")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--long", action="store_true", help="target 2 (ours only, see --long-peer)")
  ap.add_argument("--long-peer", action="store_true", help="circuit-tracer on target 2 too")
  ap.add_argument("--n-tokens", type=int, default=None,
                  help=f"prompt length (default {N_SHORT}, with --long 1024)")
  ap.add_argument("--max-feature-nodes", type=int, default=None,
                  help="default: every active feature (target 1), 4096 with --long")
  ap.add_argument("--firing", type=float, default=2.0,
                  help="--long: latents firing per position and layer, on average")
  ap.add_argument("--batch-size", type=int, default=None, help="rows per pass, both tools")
  ap.add_argument("--ours-batch-size", type=int, default=None, help=f"default {OURS_BATCH}")
  ap.add_argument("--ct-batch-size", type=int, default=None, help=f"default {CT_BATCH}")
  ap.add_argument("--repeats", type=int, default=2, help="attribution calls per tool")
  ap.add_argument("--no-peer", action="store_true", help="ours only")
  ap.add_argument("--ct-python", default="/work/ctvenv/bin/python")
  ap.add_argument("--warm-cache", action="store_true",
                  help="ours again in a new process that finds the first one's programs in "
                       "JAX's persistent compilation cache (as a second dictlearn command)")
  ap.add_argument("--jax-cache", help=argparse.SUPPRESS)
  ap.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
  ap.add_argument("--spec", help=argparse.SUPPRESS)
  ap.add_argument("--result", help=argparse.SUPPRESS)
  ap.add_argument("--target", choices=["short", "long"], help=argparse.SUPPRESS)
  ap.add_argument("--keep-adjacency", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    return WORKERS[args.worker](args)

  long = args.long
  n_tokens = args.n_tokens or (1024 if long else N_SHORT)
  mfn = args.max_feature_nodes if args.max_feature_nodes is not None else (4096 if long else None)
  ours_bs = args.ours_batch_size or args.batch_size or OURS_BATCH
  ct_bs = args.ct_batch_size or args.batch_size or CT_BATCH
  peer = not args.no_peer and (not long or args.long_peer)
  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory() as tmp:
    spec = os.path.join(tmp, "spec.npz")
    common = ["--spec", spec, "--n-tokens", str(n_tokens), "--target",
              "long" if long else "short", "--firing", str(args.firing),
              "--repeats", str(args.repeats)]
    if mfn is not None:
      common += ["--max-feature-nodes", str(mfn)]
    if not long:
      common += ["--keep-adjacency"]
    t = time.perf_counter()
    run_worker(sys.executable, "prepare", common)
    s = np.load(spec)
    print(f"# prepared {n_tokens} tokens in {time.perf_counter() - t:.0f} s: "
          f"{float(s['mean_firing']):.2f} latents firing per layer and position, "
          f"{int(s['positions_without'])} positions without any", file=sys.stderr, flush=True)
    results = {}
    ours_args = ["--batch-size", str(ours_bs)]
    if args.warm_cache:
      ours_args += ["--jax-cache", os.path.join(tmp, "jax-cache")]
    results["dictlearn"] = run_worker(sys.executable, "ours", common, os.path.join(tmp, "o.npz"),
                                      ours_args)
    if args.warm_cache:
      results["dictlearn, warm cache"] = run_worker(
          sys.executable, "ours", common, os.path.join(tmp, "w.npz"), ours_args)
    if peer:
      results["circuit-tracer"] = run_worker(args.ct_python, "ct", common,
                                             os.path.join(tmp, "c.npz"),
                                             ["--batch-size", str(ct_bs)])

  ours, ours_g = results["dictlearn"]
  print(f"# bench_circuits: Gemma 3 270M (GGUF Q4_K_M dequantized, float32), 18 per-layer "
        f"transcoders with skip (width {int(s['width'])}, seed {int(s['seed'])}), {n_tokens} "
        f"tokens, max_n_logits {MAX_N_LOGITS}, desired_logit_prob {DESIRED_LOGIT_PROB}, "
        f"max_feature_nodes {mfn}")
  print("| tool | tokens | batch | n_active | rows | call | wall s | RSS before GB | "
        "RSS during GB | peak RSS GB | load s | ratio ct/dictlearn |")
  print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
  ct = results.get("circuit-tracer")
  ct_wall = ct[0]["calls"][0]["wall_s"] if ct else None
  for name, (m, _) in results.items():
    for i, c in enumerate(m["calls"]):
      label = {("dictlearn", 0): "1st (compiles)", ("dictlearn", 1): "2nd (compiled)"}.get(
          (name, i), f"{i + 1}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(i + 1, 'th')}")
      ratio = ("" if ct_wall is None or not name.startswith("dictlearn")
               else f"{ct_wall / c['wall_s']:.2f}")
      if name == "circuit-tracer" and i == 0:
        ratio = "1.00"
      print(f"| {name} | {n_tokens} | {m['batch_size']} | {m['n_active']} | {m['rows']} | "
            f"{label} | {c['wall_s']:.2f} | {m['rss_before'] / GB:.2f} | "
            f"{c['rss_during'] / GB:.2f} | {m['peak_rss'] / GB:.2f} | {m['load_s']:.1f} | "
            f"{ratio} |")
  if ct:
    print(f"| peak RSS ratio ct/dictlearn | | | | | | | {ct[0]['rss_before'] / ours['rss_before']:.2f} | "
          f"{max(c['rss_during'] for c in ct[0]['calls']) / max(c['rss_during'] for c in ours['calls']):.2f} | "
          f"{ct[0]['peak_rss'] / ours['peak_rss']:.2f} | | |")
  calls = ours["calls"]
  if len(calls) > 1:
    print(f"\ndictlearn: compile + first-call overhead ~ {calls[0]['wall_s'] - calls[1]['wall_s']:.2f} s "
          f"(1st - 2nd call); rows ~ {calls[1]['wall_s'] / ours['rows'] * 1e3:.1f} ms per row "
          f"(2nd call / rows)")
  if ct:
    for i, c in enumerate(ct[0]["calls"]):
      print(f"circuit-tracer call {i + 1} phases (s): " + ", ".join(
          f"{k} {v:.2f}" for k, v in c["phases"].items()))
    if not long:
      print("graphs agree: " + json.dumps(compare(ours_g, ct[1])))
  versions = dict(ours["versions"])
  if ct:
    versions.update(ct[0]["versions"])
  print(machine_line(versions, load_before))
  return 0


if __name__ == "__main__":
  sys.exit(main())
