"""GPU checks of the compiled Pallas kernel (not interpret mode), and a small tiling sweep.

  python benchmarks/gpu_checks.py [--out checks.md]          correctness vs the reference
  python benchmarks/gpu_checks.py --sweep [--out sweep.md]   Pallas tilings vs XLA, timed

Correctness runs with jax_default_matmul_precision="highest" (f32 kernel dots are then
IEEE, like the reference) and checks, per case: y against ``dictionary.forward`` and
against the XLA implementation, the count of active latents and the index sets of the
codes. bf16 compute sums in a different order than cuBLAS, so a pre-activation within
rounding of its threshold may flip: such rows are counted, not failed, below 0.1%.
Each case is independent: one failure is reported and the next case runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import dictlearn as dl
from dictlearn import pallas_encode, sparse


def emit(args, text):
  print(text, flush=True)
  if args.out:
    with open(args.out, "a") as f:
      f.write(text + "\n")


def make(seed, d_in, width, kind, dtype, l0):
  """Random dictionary with a threshold giving ~l0 actives per Gaussian token."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  d_out = d_in
  w_enc = jax.random.normal(ks[0], (d_in, width), jnp.float32)
  w_enc = w_enc / jnp.linalg.norm(w_enc, axis=0, keepdims=True)
  w = dict(w_enc=w_enc, b_enc=0.05 * jax.random.normal(ks[1], (width,)),
           threshold=jnp.zeros((width,)),
           w_dec=jax.random.normal(ks[2], (width, d_out)) / np.sqrt(d_out),
           b_dec=jnp.zeros((d_out,)))
  if kind == "sae":
    d = dl.JumpReLUSAE(**w)
  else:
    d = dl.Transcoder(**w, w_skip=jax.random.normal(ks[3], (d_in, d_out)) / np.sqrt(d_in))
  calib = jax.random.normal(ks[3], (32, d_in))
  pre = dl.pre_activations(d, calib)
  thr = jnp.quantile(pre.ravel(), 1.0 - l0 / width)
  d = d.replace(threshold=jnp.full((width,), thr))
  return d.astype(dtype) if dtype != "float32" else d


CASES = [
    # name, kind, d_in, width, tokens, dtype, l0, k, kernel overrides, x scale per row
    ("1tok-bf16-65k", "sae", 1152, 65536, 1, "bfloat16", 64, 128, {}, None),
    ("1tok-f32-65k", "sae", 1152, 65536, 1, "float32", 64, 128, {}, None),
    ("7tok-bf16-affine-16k", "affine", 1152, 16384, 7, "bfloat16", 64, 128, {}, None),
    ("128tok-bf16-262k", "sae", 2560, 262144, 128, "bfloat16", 100, 256, {}, None),
    ("1000tok-f32-65k", "sae", 1152, 65536, 1000, "float32", 64, 128, {}, None),
    ("dtail-bf16", "sae", 1000, 16384, 33, "bfloat16", 64, 128, {}, None),
    ("lost-spill", "sae", 1152, 16384, 16, "float32", 64, 128, dict(capacity=4), 3.0),
    ("overflow", "sae", 640, 16384, 8, "float32", 2000, 32, {}, None),
    ("1tok-bf16-1m", "sae", 1152, 1 << 20, 1, "bfloat16", 128, 256, {}, None),
]


def run_checks(args):
  jax.config.update("jax_default_matmul_precision", "highest")
  emit(args, f"\nPallas kernel checks on {jax.devices()[0].device_kind} (jax {jax.__version__}),"
             " precision highest\n")
  emit(args, "| case | plan | y max rel err vs forward | vs xla | count mismatch rows | "
             "index-set mismatch rows | overflow rows | result |")
  emit(args, "|---|---|---|---|---|---|---|---|")
  failures = 0
  for (name, kind, d_in, width, n, dtype, l0, k, kernel, scale) in CASES:
    if args.only and name not in args.only:
      continue
    if args.small:  # CPU smoke test of this script (interpret mode is slow).
      d_in, width, n = min(d_in, 40), min(width, 1024), min(n, 9)
    try:
      d = make(0, d_in, width, kind, dtype, l0)
      x = jax.random.normal(jax.random.PRNGKey(1), (n, d_in), jnp.float32)
      if scale is not None:  # Every other row much busier: some rows spill.
        x = x * jnp.where(jnp.arange(n) % 2 == 0, 1.0, scale)[:, None]
      cd = jnp.dtype(dtype)
      p = pallas_encode.plan(n, d_in, width, k, **kernel)
      yp, cp = sparse.encode_decode(d, x, k=k, impl=args.impl, compute_dtype=cd,
                                    kernel=kernel)
      yx, cx = sparse.encode_decode(d, x, k=k, impl="xla", compute_dtype=cd)
      yr = dl.forward(d, x, compute_dtype=cd)
      scale_y = float(jnp.abs(yr).max()) + 1e-6
      err = float(jnp.abs(yp - yr).max()) / scale_y
      err_x = float(jnp.abs(yp - yx).max()) / scale_y
      f = np.asarray(dl.encode(d, x, compute_dtype=cd))
      cnt = np.asarray(cp.count)
      count_bad = int((cnt != (f != 0).sum(-1)).sum())
      idx = np.asarray(cp.indices)
      set_bad = 0
      for r in range(n):
        m = min(int(cnt[r]), k)
        want = np.nonzero(f[r])[0]
        if cnt[r] > k:
          want = want[np.argsort(-f[r, want])][:k]
        set_bad += set(idx[r, :m].tolist()) != set(want.tolist())
      tol = 1e-4 if dtype == "float32" else 3e-2
      flips_ok = (count_bad + set_bad) <= max(0, int(0.001 * n)) if dtype != "float32" else (
          count_bad == 0 and set_bad == 0)
      ok = err < tol and err_x < tol and flips_ok
      failures += not ok
      emit(args, f"| {name} | bt{p.block_tokens} bw{p.block_width} dc{p.d_chunk} "
                 f"S{p.splits} cap{p.capacity} | {err:.2e} | {err_x:.2e} | {count_bad} | "
                 f"{set_bad} | {int(np.asarray(cp.overflow).sum())} | "
                 f"{'PASS' if ok else 'FAIL'} |")
    except Exception as e:
      failures += 1
      emit(args, f"| {name} | - | - | - | - | - | - | ERROR {type(e).__name__}: "
                 f"{str(e).splitlines()[0][:300]} |")
      traceback.print_exc(file=sys.stderr)
  emit(args, f"\n{failures} case(s) failed.")
  return failures


def timeit(fn, *a, reps=20):
  jax.block_until_ready(fn(*a))
  jax.block_until_ready(fn(*a))
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*a))
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


SWEEP = {
    1: [dict(block_width=bw, num_warps=nw) for bw in (64, 128, 256) for nw in (4, 8)],
    128: [dict(block_tokens=bt, block_width=bw) for bt in (16, 32, 64) for bw in (64, 128)],
    1024: [dict(block_tokens=bt, block_width=bw) for bt in (32, 64, 128) for bw in (64, 128)],
}


# XLA-path block widths at 1024 tokens (the default plan picks 128 MiB blocks).
XLA_SWEEP = [dict(block_width=4096), dict(block_width=16384)]


def run_sweep(args):
  d_in, width, k = 1152, 65536, 256
  sweep = SWEEP
  if args.small:  # CPU smoke test of this script.
    d_in, width = 64, 4096
    sweep = {n: cfgs[:1] for n, cfgs in SWEEP.items()}
  d = make(0, d_in, width, "sae", "bfloat16", 64)
  emit(args, f"\nPallas tilings (and XLA block widths) vs the XLA default, encode_decode "
             f"(k={k}), d_in={d_in}, width={width}, "
             f"bf16, median of 20 (ms), {jax.devices()[0].device_kind}\n")
  emit(args, "| tokens | config | plan | ms | xla ms | xla/pallas |")
  emit(args, "|---|---|---|---|---|---|")
  deadline = time.time() + args.deadline_s
  for n, configs in sweep.items():
    x = jax.random.normal(jax.random.PRNGKey(2), (n, d_in), jnp.float32)
    try:
      fx = jax.jit(lambda d, x: sparse.encode_decode(d, x, k=k, impl="xla",
                                                    compute_dtype=jnp.bfloat16))
      t_x = timeit(fx, d, x)
    except Exception as e:
      t_x = float("nan")
      emit(args, f"| {n} | xla | - | ERROR {type(e).__name__} | - | - |")
    if n == 1024:
      for cfg in XLA_SWEEP:
        if time.time() > deadline:
          continue
        try:
          fb = jax.jit(lambda d, x, cfg=cfg: sparse.encode_decode(
              d, x, k=k, impl="xla", compute_dtype=jnp.bfloat16, **cfg))
          t_b = timeit(fb, d, x)
          emit(args, f"| {n} | xla {cfg} | - | {t_b * 1e3:.3f} | {t_x * 1e3:.3f} | "
                     f"{t_x / t_b:.2f} (xla default / this) |")
        except Exception as e:
          emit(args, f"| {n} | xla {cfg} | - | ERROR {type(e).__name__} | - | - |")
    for cfg in [{}] + configs:
      if time.time() > deadline:
        emit(args, f"| {n} | {cfg or 'default'} | - | not run (deadline) | - | - |")
        continue
      try:
        p = pallas_encode.plan(n, d_in, width, k, **cfg)
        fp = jax.jit(lambda d, x, cfg=cfg: sparse.encode_decode(
            d, x, k=k, impl=args.impl, compute_dtype=jnp.bfloat16, kernel=cfg))
        t_p = timeit(fp, d, x)
        emit(args, f"| {n} | {cfg or 'default'} | bt{p.block_tokens} bw{p.block_width} "
                   f"S{p.splits} cap{p.capacity} w{p.num_warps} | {t_p * 1e3:.3f} | "
                   f"{t_x * 1e3:.3f} | {t_x / t_p:.2f} |")
      except Exception as e:
        emit(args, f"| {n} | {cfg or 'default'} | - | ERROR {type(e).__name__}: "
                   f"{str(e).splitlines()[0][:200]} | - | - |")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sweep", action="store_true")
  p.add_argument("--only", nargs="*", help="check cases by name")
  p.add_argument("--deadline-s", type=float, default=45.0)
  p.add_argument("--out")
  p.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
  p.add_argument("--interpret", action="store_true", help="Pallas interpret mode")
  args = p.parse_args()
  args.impl = "pallas_interpret" if args.interpret else "pallas"
  if jax.default_backend() != "gpu":
    print(f"note: backend is {jax.default_backend()}, not gpu; the kernel needs a GPU "
          "(tests/core/test_pallas.py runs it in interpret mode)", file=sys.stderr)
  if args.sweep:
    run_sweep(args)
  else:
    sys.exit(1 if run_checks(args) else 0)


if __name__ == "__main__":
  main()
