"""Interventions at a site: dense vs fused splice and ablate, side by side in one process.

What the penzai hooks ran before ``dictlearn.interventions`` (the dense path: the
(tokens x width) latents, a dense decode) against what they run now:

  splice-dense   ``interventions.splice(..., fused=False)``: ``dictionary.forward``
  splice-fused   ``interventions.splice``: ``encode_decode``
  ablate-dense   ``x + decode(f') - decode(f)`` from dense latents (the old EditLatents)
  ablate-fused   ``interventions.edit_latents(ablate=...)``: the edited latents' own
                 encoder columns and decoder rows only

Times are medians of back-to-back jitted calls (``bench_dictionary.time_row``); "extra"
is XLA's compiled temp + output bytes. Weights: random SAE, threshold calibrated to ~64
active latents per token (``bench_dictionary.make_dictionary``).

  python benchmarks/bench_interventions.py [--sizes 1152x65536] [--tokens 1 128]
      [--dtypes bfloat16 float32] [--reps 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import warnings

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_dictionary as bd  # noqa: E402

import dictlearn as dl  # noqa: E402
from dictlearn import interventions as iv  # noqa: E402

warnings.filterwarnings("ignore", message="bfloat16 dictionary weights on CPU")

ABLATE = (3, 17, 101)


def _dense_ablate(d, x):
  f = dl.encode(d, x)
  f2 = f.at[..., jnp.asarray(ABLATE)].set(0.0)
  return x + dl.decode(d, f2, x) - dl.decode(d, f, x)


def variants(d, x, mask):
  # The mask is an argument, not a constant, so XLA cannot fold the intervention away.
  return [
      bd.Variant("splice-dense", jax.jit(lambda d, x, m: iv.splice(d, x, mask=m, fused=False)),
                 (d, x, mask)),
      bd.Variant("splice-fused", jax.jit(lambda d, x, m: iv.splice(d, x, mask=m)), (d, x, mask)),
      bd.Variant("ablate-dense", jax.jit(lambda d, x, m: jnp.where(
          m[..., None], _dense_ablate(d, x), x)), (d, x, mask)),
      bd.Variant("ablate-fused", jax.jit(lambda d, x, m: iv.edit_latents(
          d, x, ablate=ABLATE, mask=m)), (d, x, mask)),
  ]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", nargs="+", default=["1152x65536"])
  ap.add_argument("--tokens", nargs="+", type=int, default=[1, 128])
  ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
  ap.add_argument("--reps", type=int, default=20)
  args = ap.parse_args(argv)
  print(f"# interventions, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()})\n")
  print("| d_in x width | dtype | tokens | variant | ms | vs dense | extra MiB |")
  print("|---|---|---|---|---|---|---|")
  for size in args.sizes:
    d_in, width = map(int, size.split("x"))
    for dtype in args.dtypes:
      d = bd.make_dictionary(d_in, width, dtype, l0=64)
      for n in args.tokens:
        x = jax.random.normal(jax.random.PRNGKey(n), (1, n, d_in), jnp.float32)
        mask = iv.active_positions(jnp.arange(1, n + 1)[None])  # a decode step: no BOS
        vs = variants(d, x, mask)
        bd.time_row(vs, args.reps)
        med = {v.name: statistics.median(v.times) if v.times else None for v in vs}
        for v in vs:
          base = med[v.name.split("-")[0] + "-dense"]
          t = med[v.name]
          ratio = "-" if t is None or base is None else f"{base / t:.2f}x faster"
          if v.name.endswith("dense"):
            ratio = "1"
          mib = "-" if v.extra_bytes is None else f"{v.extra_bytes / 2**20:.1f}"
          print(f"| {d_in}x{width} | {dtype} | {n} | {v.name} | {bd.fmt_ms(t)} | {ratio} "
                f"| {mib} |" + (f" {v.error}" if v.error else ""), flush=True)
        del vs


if __name__ == "__main__":
  main()
