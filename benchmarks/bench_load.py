"""Loading a large float32 SAE as bfloat16: the old path (whole file, then convert) vs
``dictlearn.load(dtype=, sharding=, mmap=)``, side by side in one run.

Writes a d_in x width float32 Gemma Scope 2 folder to a temp dir (1152 x 262,144 is
~2.4 GB: check ``df -h /tmp``), then runs each variant in a fresh subprocess (8 forced
CPU devices) and reports:

  peak / bf16   growth of the process's peak RSS (VmHWM, reset after imports and a
                warm-up load) over the loaded dictionary's bfloat16 size
  read / shard  for sharded loads, the largest ratio over devices of the bytes requested
                from the file for a device (``dictlearn.io.ReadStats``) to the bytes of
                its shards (in the file's dtype)
  wall s        the load, from the call to the arrays being ready

Variants:
  old           the previous loader: safetensors.numpy.load_file, jnp.asarray, astype
  load+astype   ``dl.load(p).astype(bf16)``: a full float32 load, then convert
  dtype         ``dl.load(p, dtype=bf16)``
  sharded       ``dl.load(p, dtype=bf16, sharding=Mesh(8 devices, ("width",)))``
  mmap          ``dl.load(p, mmap=True, check_finite=False)`` (float32 maps, nothing read)

The file is read from the page cache (it was just written), so wall times are the CPU
side of loading, not the disk.

  python benchmarks/bench_load.py [--d-in 1152] [--width 262144] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

VARIANTS = ("old", "load+astype", "dtype", "sharded", "mmap")

CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
import dictlearn as dl
from dictlearn import io

def status(key):
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

variant, folder, small = sys.argv[1], sys.argv[2], sys.argv[3]
FIELDS = ("w_enc", "b_enc", "threshold", "w_dec", "b_dec")
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("width",))

def run(path, stats=None):
  if variant == "old":
    from safetensors.numpy import load_file
    t = {k: jnp.asarray(v) for k, v in load_file(path + "/params.safetensors").items()}
    return {k: v.astype(jnp.bfloat16) for k, v in t.items()}
  if variant == "load+astype":
    d = dl.load(path).astype(jnp.bfloat16)
  elif variant == "dtype":
    d = dl.load(path, dtype=jnp.bfloat16)
  elif variant == "sharded":
    d = dl.load(path, dtype=jnp.bfloat16, sharding=mesh, read_stats=stats)
  else:
    d = dl.load(path, mmap=True, check_finite=False, read_stats=stats)
  return {k: getattr(d, k) for k in FIELDS}

jax.block_until_ready(run(small, io.ReadStats()))  # Warm up jax and the loader.
with open("/proc/self/clear_refs", "w") as f:
  f.write("5")  # Resets VmHWM to the current RSS.
before = status("VmRSS")
stats = io.ReadStats()
t0 = time.perf_counter()
out = jax.block_until_ready(run(folder, stats))
wall = time.perf_counter() - t0
peak = status("VmHWM")
nbytes = sum(int(np.prod(v.shape)) for v in out.values()) * 2  # As bfloat16.
ratio = max((stats.bytes_read.get(dev, 0) / held for dev, held in stats.shard_bytes.items()
             if dev is not None and held), default=None)
print(json.dumps(dict(growth=peak - before, bf16=nbytes, wall=wall, read_ratio=ratio,
                      total_read=stats.total_read)))
"""


def write_sae(folder: Path, d_in: int, width: int, seed: int = 0):
  """A float32 params.safetensors written chunk by chunk (never whole in memory)."""
  folder.mkdir(parents=True, exist_ok=True)
  shapes = dict(w_enc=(d_in, width), b_enc=(width,), threshold=(width,), w_dec=(width, d_in),
                b_dec=(d_in,))
  header, pos = {}, 0
  for name, shape in shapes.items():
    n = int(np.prod(shape)) * 4
    header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [pos, pos + n]}
    pos += n
  raw = json.dumps(header).encode()
  raw += b" " * (-len(raw) % 8)
  rng = np.random.default_rng(seed)
  with open(folder / "params.safetensors", "wb") as f:
    f.write(len(raw).to_bytes(8, "little") + raw)
    for name, shape in shapes.items():
      n = int(np.prod(shape))
      for a in range(0, n, 1 << 24):
        chunk = rng.standard_normal(min(n, a + (1 << 24)) - a, np.float32) * 0.05
        if name == "threshold":
          chunk = np.abs(chunk)
        f.write(chunk.tobytes())
  (folder / "config.json").write_text(json.dumps(
      {"architecture": "jump_relu", "type": "sae", "width": width,
       "hf_hook_point_in": "model.layers.9.output",
       "hf_hook_point_out": "model.layers.9.output", "affine_connection": False}))


def run_variant(variant: str, folder: Path, small: Path) -> dict:
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  out = subprocess.run([sys.executable, "-c", CHILD, variant, str(folder), str(small)],
                       capture_output=True, text=True, env=env)
  if out.returncode:
    raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--d-in", type=int, default=1152)
  ap.add_argument("--width", type=int, default=262_144)
  ap.add_argument("--dir", default=tempfile.gettempdir())
  ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
  args = ap.parse_args()

  need = 2 * args.d_in * args.width * 4
  free = shutil.disk_usage(args.dir).free
  if free < 1.5 * need:
    raise SystemExit(f"{args.dir} has {free / 1e9:.1f} GB free, the file needs "
                     f"{need / 1e9:.1f} GB: pass a smaller --width or another --dir")
  tmp = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench_load_"))
  try:
    folder, small = tmp / "big", tmp / "small"
    write_sae(folder, args.d_in, args.width)
    write_sae(small, 8, 64)
    size = (folder / "params.safetensors").stat().st_size
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"{args.d_in} x {args.width} float32 SAE, file {size / 2**30:.2f} GiB")
    print("| variant | wall s | peak growth GiB | peak / bf16 | read / shard (max) |")
    print("|---|---|---|---|---|")
    for v in args.variants:
      r = run_variant(v, folder, small)
      ratio = "" if r["read_ratio"] is None else f"{r['read_ratio']:.3f}"
      print(f"| {v} | {r['wall']:.2f} | {r['growth'] / 2**30:.2f} | "
            f"{r['growth'] / r['bf16']:.2f} | {ratio} |", flush=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
