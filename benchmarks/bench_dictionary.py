"""Dictionary forward microbenchmark: encode matmul floor vs dense vs penzai vs encode_decode.

For each row (d_in, width, tokens, weight dtype) every variant is compiled, warmed up and
then timed in one process, each as a block of back-to-back calls (``time_row`` says why
not interleaved); the table gives median wall-clock times and their ratio to the floor,
plus each variant's extra memory. Variants, all jitted, all taking the same float32
activations:

  floor    ``x @ w_enc`` alone (``dictionary.matmul``): what any exact encoder must do.
  dense    ``dictionary.forward``: dense latents, dense decode.
  penzai   the Gemma Scope 2 tutorial's SAE built from penzai layers over named axes
           (Linear, AddBias, JumpReLU, Linear, AddBias), frozen params, jitted.
  fused    ``dictlearn.encode_decode`` (--k, default 256), the backend's default;
  fused-xla / fused-pallas on GPU, both implementations.

Memory ("extra"): XLA's compiled memory analysis of each variant, temp + output bytes
(what the call allocates beyond its arguments: weights and x), i.e. the peak of the
buffer assignment, not a sampled RSS. ``--mem-1m`` compiles encode_decode at width 1m
(without allocating weights) and reports extra memory as a fraction of w_enc.

Thresholds come from data: pre-activations of a calibration batch set one threshold at
the quantile that gives the target L0 (default 64 active latents per token); the table
shows the L0 measured on the benchmark inputs. Weights: unit-norm random decoder rows,
encoder = decoder transpose, Gaussian activations.

  python benchmarks/bench_dictionary.py [--quick] [--sizes 1152x65536 ...]
      [--tokens 1 128 1024] [--dtypes float32 bfloat16] [--out table.md] [--mem-1m]

Rows whose weights plus dense latents exceed --mem-budget-gb, or whose floor call alone
takes longer than --max-call-s, are skipped and listed as such.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import dictlearn as dl
from dictlearn import sparse

# The table times bf16 weights on CPU on purpose; the library's advice to convert them
# (dictionary.check_input) is not news here.
warnings.filterwarnings("ignore", message="bfloat16 dictionary weights on CPU")

FULL_SIZES = [(d, w) for d in (640, 1152, 2560) for w in (16384, 65536, 262144)]
QUICK_SIZES = [(640, 16384), (1152, 65536)]


# ----------------------------------------------------------------------- the variants


def penzai_sae(d: dl.JumpReLUSAE):
  """The tutorial's SAE: penzai layers over named axes, params bound then frozen for jit.

  Returns (model, run) with run(model, x (tokens, d_in)) -> (tokens, d_in).
  """
  from penzai import pz

  @pz.pytree_dataclass
  class JumpReLU(pz.nn.Layer):
    """``(value > threshold) * relu(value)`` as in the tutorial."""
    threshold: pz.nn.ParameterLike

    def __call__(self, value, **_unused_side_inputs):
      return (value > self.threshold.value) * pz.nx.nmap(jax.nn.relu)(value)

  d_in, width = d.w_enc.shape
  model = pz.nn.Sequential([
      pz.nn.Linear.from_config(name="sae/w_enc", init_base_rng=None,
                               input_axes={"embedding": d_in},
                               output_axes={"latents": width}),
      pz.nn.AddBias.from_config(name="sae/b_enc", init_base_rng=None,
                                biased_axes={"latents": width}),
      JumpReLU(threshold=pz.ParameterSlot("sae/threshold")),
      pz.nn.Linear.from_config(name="sae/w_dec", init_base_rng=None,
                               input_axes={"latents": width},
                               output_axes={"embedding": d_in}),
      pz.nn.AddBias.from_config(name="sae/b_dec", init_base_rng=None,
                                biased_axes={"embedding": d_in}),
  ])
  params = [
      pz.Parameter(label="sae/w_enc.weights",
                   value=pz.nx.wrap(d.w_enc).tag("embedding", "latents")),
      pz.Parameter(label="sae/b_enc.bias", value=pz.nx.wrap(d.b_enc).tag("latents")),
      pz.Parameter(label="sae/threshold", value=pz.nx.wrap(d.threshold).tag("latents")),
      pz.Parameter(label="sae/w_dec.weights",
                   value=pz.nx.wrap(d.w_dec).tag("latents", "embedding")),
      pz.Parameter(label="sae/b_dec.bias", value=pz.nx.wrap(d.b_dec).tag("embedding")),
  ]
  frozen = pz.freeze_params(pz.bind_variables(model, params))

  def run(m, x):
    return m(pz.nx.wrap(x).tag("tokens", "embedding")).untag("tokens", "embedding").unwrap()
  return frozen, run


@dataclasses.dataclass
class Variant:
  name: str
  fn: object      # jitted callable
  args: tuple
  compiled: object = None
  times: list = dataclasses.field(default_factory=list)
  extra_bytes: int | None = None
  error: str | None = None


def make_variants(d, x, compute_dtype, k, with_penzai, impls):
  cd = compute_dtype
  vs = [
      Variant("floor", jax.jit(lambda d, x: dl.dictionary.matmul(x, d.w_enc, cd)), (d, x)),
      Variant("dense", jax.jit(lambda d, x: dl.forward(d, x, compute_dtype=cd)), (d, x)),
  ]
  if with_penzai:
    try:
      model, run = penzai_sae(d)
      vs.append(Variant("penzai", jax.jit(run), (model, x)))
    except Exception as e:  # penzai missing or changed: the other variants still run.
      vs.append(Variant("penzai", None, (), error=f"{type(e).__name__}: {e}"))
  for impl in impls:
    name = "fused" if impl is None else f"fused-{impl}"
    vs.append(Variant(name, jax.jit(
        lambda d, x, impl=impl: sparse.encode_decode(d, x, k=k, compute_dtype=cd, impl=impl)),
        (d, x)))
  return vs


def _extra_bytes(compiled) -> int | None:
  try:
    m = compiled.memory_analysis()
    return int(m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)
  except Exception:
    return None


def time_row(variants, reps):
  """Compiles and warms up the variants, then times each as a block; fills times/extra/error.

  Each variant's block is a pause, an untimed call, then ``reps`` back-to-back timed
  calls: the steady state of a generation loop. Variants are not interleaved because
  a call that builds a big temporary slows the calls after it for a while (after the
  bf16 floor or penzai layers at 1152x65k, which make 288-576 MiB float32 copies, the
  next ~40 ms of one-token fused calls ran 1.3-2x slower; 0.3 s later they did not).
  """
  for v in variants:
    if v.error:
      continue
    try:
      v.compiled = v.fn.lower(*v.args).compile()
      v.extra_bytes = _extra_bytes(v.compiled)
      jax.block_until_ready(v.compiled(*v.args))  # Warm-up (first-touch, autotuning).
    except Exception as e:
      v.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
      traceback.print_exc(file=sys.stderr)
  for v in variants:
    if v.error:
      continue
    time.sleep(0.3)
    try:
      jax.block_until_ready(v.compiled(*v.args))
      for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(v.compiled(*v.args))
        v.times.append(time.perf_counter() - t)
    except Exception as e:
      v.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


# ------------------------------------------------------------------------------ setup


def make_dictionary(d_in, width, dtype, l0, seed=0):
  """Random SAE with one threshold calibrated on data to give ~l0 actives per token."""
  key = jax.random.PRNGKey(seed)
  d = dl.random_dictionary(key, d_in, width, dtype=jnp.float32)
  calib = jax.random.normal(jax.random.PRNGKey(seed + 1), (64, d_in), jnp.float32)
  pre = jax.jit(lambda d, x: dl.pre_activations(d, x))(d, calib)
  thr = float(jnp.quantile(pre.ravel(), 1.0 - l0 / width))
  d = d.replace(threshold=jnp.full((width,), thr, jnp.float32))
  return d.astype(dtype) if jnp.dtype(dtype) != jnp.float32 else d


def fmt_ms(s):
  return "-" if s is None else (f"{s * 1e3:.3g}" if s < 1 else f"{s * 1e3:.0f}")


def fmt_mib(b):
  return "-" if b is None else f"{b / 2**20:.1f}"


def run_table(args):
  backend = jax.default_backend()
  impls = [None] if backend != "gpu" else ["xla", "pallas"]
  sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
  tokens = args.tokens or ([1, 1024] if args.quick else [1, 128, 1024])
  dtypes = args.dtypes or ["float32", "bfloat16"]
  names = ["floor", "dense"] + ([] if args.no_penzai else ["penzai"]) + [
      "fused" if i is None else f"fused-{i}" for i in impls]
  header = ("| d_in | width | tokens | dtype | L0 | " +
            " | ".join(f"{n} ms" for n in names) + " | " +
            " | ".join(f"{n} /floor" for n in names[1:]) + " | " +
            " | ".join(f"{n} MiB" for n in names) + " |")
  lines = [header, "|" + "---|" * (header.count("|") - 1)]
  skipped = []
  emit(args, "\n".join(lines))
  rows = [(size, dtype, n) for size in sizes for dtype in dtypes for n in tokens]
  if args.row_order == "tokens":  # Every size's key rows first (for a time-boxed run).
    rows = [(size, dtype, n) for dtype in dtypes for n in tokens for size in sizes]
  start = time.time()
  # Dictionaries of the current dtype stay cached (all sizes: the "tokens" order revisits
  # them); size order keeps only one, as the widest ones take most of the memory.
  cache = {}
  for (d_in, width), dtype, n in rows:
    if args.deadline_s and time.time() - start > args.deadline_s:
      skipped.append(f"{d_in}x{width} {dtype} tokens={n}: not run (--deadline-s)")
      continue
    wbytes = jnp.dtype(dtype).itemsize * d_in * width
    need = 2 * wbytes + (2 * 4 * n * width if not args.no_penzai else 0) + (
        2 * 4 * d_in * width if dtype != "float32" else 0)
    if need > args.mem_budget_gb * 2**30:
      skipped.append(f"{d_in}x{width} {dtype} tokens={n}: needs ~{need / 2**30:.1f} GiB "
                     f"> --mem-budget-gb {args.mem_budget_gb}")
      continue
    d = x = probe = vs = None  # Drop the last row's arrays before building new ones.
    try:
      if (d_in, width, dtype) not in cache:
        for key in list(cache):
          if args.row_order == "size" or key[2] != dtype:
            del cache[key]
        gc.collect()
        cache[(d_in, width, dtype)] = make_dictionary(d_in, width, dtype, args.l0)
      d = cache[(d_in, width, dtype)]
      x = jax.random.normal(jax.random.PRNGKey(7 + n), (n, d_in), jnp.float32)
      cd = jnp.dtype(dtype)
      # Probe the floor once: rows too slow for this machine are skipped, and said so.
      probe = make_variants(d, x, cd, args.k, False, [])[:1]
      time_row(probe, 1)
      if probe[0].error:
        raise RuntimeError(probe[0].error)
      t_floor = probe[0].times[0]
      if t_floor > args.max_call_s:
        skipped.append(f"{d_in}x{width} {dtype} tokens={n}: floor call {t_floor:.1f} s "
                       f"> --max-call-s {args.max_call_s}")
        continue
      # About --rep-seconds of floor time per variant, between 3 and --reps runs.
      reps = int(min(args.reps, max(3, args.rep_seconds // max(t_floor, 1e-9))))
      l0 = float(jax.jit(lambda d, x: (dl.encode(d, x) != 0).sum(-1).mean())(d, x[:64]))
      vs = make_variants(d, x, cd, args.k, not args.no_penzai, impls)
      time_row(vs, reps)
    except Exception as e:
      skipped.append(f"{d_in}x{width} {dtype} tokens={n}: {type(e).__name__}: "
                     f"{str(e).splitlines()[0][:200]}")
      traceback.print_exc(file=sys.stderr)
      continue
    med = {v.name: (statistics.median(v.times) if v.times else None) for v in vs}
    mem = {v.name: v.extra_bytes for v in vs}
    for v in vs:
      if v.error:
        skipped.append(f"{d_in}x{width} {dtype} tokens={n} {v.name}: {v.error}")
    fl = med.get("floor")
    cells = [str(d_in), str(width), str(n), dtype, f"{l0:.0f}"]
    cells += [fmt_ms(med.get(nm)) for nm in names]
    cells += [("-" if (med.get(nm) is None or not fl) else f"{med[nm] / fl:.2f}")
              for nm in names[1:]]
    cells += [fmt_mib(mem.get(nm)) for nm in names]
    emit(args, "| " + " | ".join(cells) + " |")
    del vs
  if skipped:
    emit(args, "\nSkipped:\n" + "\n".join(f"- {s}" for s in skipped))


def mem_check_1m(args):
  """encode_decode's extra memory at width 1m, from the compiled memory analysis."""
  d_in, width = args.mem_d_in, 1 << 20
  emit(args, f"\nExtra memory of encode_decode at d_in={d_in}, width={width} "
             "(compiled temp + output, as a fraction of w_enc):\n")
  emit(args, "| dtype | tokens | w_enc MiB | fused extra MiB | fraction | dense extra MiB |")
  emit(args, "|---|---|---|---|---|---|")
  for dtype in args.dtypes or ["float32", "bfloat16"]:
    dt = jnp.dtype(dtype)
    d = jax.eval_shape(lambda: dl.random_dictionary(jax.random.PRNGKey(0), 8, 8)).replace(
        w_enc=jax.ShapeDtypeStruct((d_in, width), dt),
        b_enc=jax.ShapeDtypeStruct((width,), dt),
        threshold=jax.ShapeDtypeStruct((width,), dt),
        w_dec=jax.ShapeDtypeStruct((width, d_in), dt),
        b_dec=jax.ShapeDtypeStruct((d_in,), dt))
    for n in args.mem_tokens:
      x = jax.ShapeDtypeStruct((n, d_in), jnp.float32)
      try:
        fused = jax.jit(lambda d, x: sparse.encode_decode(d, x, k=args.k, compute_dtype=dt))
        e = _extra_bytes(fused.lower(d, x).compile())
        dense = jax.jit(lambda d, x: dl.forward(d, x, compute_dtype=dt))
        de = _extra_bytes(dense.lower(d, x).compile())
        wb = d_in * width * dt.itemsize
        emit(args, f"| {dtype} | {n} | {wb / 2**20:.0f} | {fmt_mib(e)} | "
                   f"{(e / wb if e is not None else float('nan')):.3%} | {fmt_mib(de)} |")
      except Exception as ex:
        emit(args, f"| {dtype} | {n} | - | error: {type(ex).__name__}: "
                   f"{str(ex).splitlines()[0][:120]} | - | - |")


def machine_line():
  cpu = platform.processor() or ""
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
    for line in out.splitlines():
      if line.startswith("Model name"):
        cpu = line.split(":", 1)[1].strip()
  except Exception:
    pass
  dev = jax.devices()[0]
  return (f"{datetime.date.today()}, jax {jax.__version__}, backend {jax.default_backend()} "
          f"({dev.device_kind}, {jax.device_count()} device(s)), CPU {cpu}, "
          f"{os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f}")


def emit(args, text):
  print(text, flush=True)
  if args.out:
    with open(args.out, "a") as f:
      f.write(text + "\n")


def parse_size(s):
  d, w = s.lower().split("x")
  mult = {"k": 1024, "m": 1 << 20}
  w = int(w[:-1]) * mult[w[-1]] if w[-1] in mult else int(w)
  return int(d), w


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="two sizes, tokens 1 and 1024")
  p.add_argument("--sizes", nargs="*", type=parse_size, help="d_inxwidth, e.g. 1152x65536 or 1152x64k")
  p.add_argument("--tokens", nargs="*", type=int)
  p.add_argument("--dtypes", nargs="*", choices=["float32", "bfloat16"])
  p.add_argument("--k", type=int, default=256, help="code slots of encode_decode")
  p.add_argument("--l0", type=float, default=64.0, help="target active latents per token")
  p.add_argument("--reps", type=int, default=5, help="timed runs per variant (after warm-up)")
  # 6 s: rows with a ~1 s floor (1024 tokens at d_in 1152, width 65k on 2 cores) still
  # get 5 runs; with 3, their medians moved by +-10% between runs.
  p.add_argument("--rep-seconds", type=float, default=6.0,
                 help="fewer runs (at least 3) when reps x the floor time exceeds this")
  p.add_argument("--no-penzai", action="store_true")
  p.add_argument("--mem-budget-gb", type=float, default=14.0)
  p.add_argument("--max-call-s", type=float, default=30.0)
  p.add_argument("--mem-1m", action="store_true", help="also the width-1m memory check")
  p.add_argument("--mem-only", action="store_true", help="only the width-1m memory check")
  p.add_argument("--mem-d-in", type=int, default=1152)
  p.add_argument("--mem-tokens", nargs="*", type=int, default=[1, 128, 1024, 4096])
  p.add_argument("--row-order", choices=["size", "tokens"], default="size",
                 help="tokens: each size's 1-token rows first, then the next token count")
  p.add_argument("--deadline-s", type=float, default=0.0,
                 help="start no new row after this many seconds (0: no limit)")
  p.add_argument("--out", help="append the markdown here too")
  args = p.parse_args(argv)
  emit(args, f"\n{machine_line()}\n")
  if not args.mem_only:
    run_table(args)
  if args.mem_1m or args.mem_only:
    mem_check_1m(args)


if __name__ == "__main__":
  main()
