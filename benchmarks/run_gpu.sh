#!/usr/bin/env bash
# One GPU session for dictlearn's fused encode-decode (about 5-6 minutes on an H200).
#
#   OUT=/some/dir bash benchmarks/run_gpu.sh
#
# Assumes a Python with jax[cuda] already installed (no network needed). Steps, each in
# its own process under its own time limit, so one failure or hang loses only itself:
#
#   install   pip install -e . --no-deps (falls back to PYTHONPATH), and any wheels in
#             .whl/ (penzai, ordered_set, treescope: the device machine has no index;
#             `pip download --no-deps -d .whl penzai ordered-set treescope` here and
#             carry .whl along)                                               <= 40 s
#   checks    the compiled Pallas kernel vs the reference and the XLA path     <= 70 s
#             -> $OUT/gpu_checks.md
#   sweep     a few Pallas tilings vs XLA at d_in 1152, width 65k, bf16        <= 55 s
#             -> $OUT/pallas_sweep.md
#   table     the benchmark table: d_in 1152/2560/5376 x width 65k/262k/1m (paired),
#             tokens 1/4096/128/1024, bf16 then f32, floor/dense/penzai/fused-xla/
#             fused-pallas, up to 20 timed runs each; rows ordered so every size gets
#             its 1-token rows first; no new row after 135 s                 <= 165 s
#             -> $OUT/bench_gpu.md
#   mem1m     encode_decode extra memory at width 1m (compile only)           <= 30 s
#             -> $OUT/mem_1m_gpu.md
#
# Worst case 360 s of limits; typically ~5 minutes.
#
# Every step's stdout/stderr is in $OUT/<step>.log, exit codes in $OUT/status.txt.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD:$PWD/adapters${PYTHONPATH:+:$PYTHONPATH}"
# Room for the widest rows (5376 x 1m f32 weights are 45 GB) next to the latents.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"

log() { echo "[$(date +%T)] $*" | tee -a "$OUT/run_gpu.log"; }
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  log "start $name (limit ${limit}s)"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  log "end $name rc=$rc"
  echo "$name $rc" >>"$OUT/status.txt"
}

T0=$(date +%s)
# Offline first (needs setuptools>=77 present); then pip's isolated build (needs an index);
# either way PYTHONPATH above already makes the checkout importable.
step install 40 bash -c "'$PY' -m pip install --no-deps --no-build-isolation -q -e . ||
  '$PY' -m pip install --no-deps -q -e .
  if ls .whl/*.whl >/dev/null 2>&1; then '$PY' -m pip install --no-deps --no-index -q .whl/*.whl; fi"
{
  "$PY" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__); print(jax.devices())"
  "$PY" -c "import penzai; print('penzai', penzai.__version__)" || echo "penzai missing: the penzai column will be empty"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
} >"$OUT/env.txt" 2>&1

# RUN_GPU_DRYRUN=1: the same plumbing on a CPU machine, tiny shapes, interpret mode.
SIZES="1152x64k 2560x256k 5376x1m"; TOKENS="1 4096 128 1024"; CHECK=""; MEMD=1152
if [ -n "${RUN_GPU_DRYRUN:-}" ]; then
  SIZES="64x4k"; TOKENS="1 16"; CHECK="--small --interpret"; MEMD=16
fi

step checks 70 "$PY" benchmarks/gpu_checks.py $CHECK --out "$OUT/gpu_checks.md"
[ -z "${RUN_GPU_DRYRUN:-}" ] && \
  step sweep 55 "$PY" benchmarks/gpu_checks.py --sweep --deadline-s 40 --out "$OUT/pallas_sweep.md"
step table 165 "$PY" benchmarks/bench_dictionary.py \
  --sizes $SIZES --tokens $TOKENS \
  --dtypes bfloat16 float32 --row-order tokens --reps 20 \
  --mem-budget-gb 115 --max-call-s 20 --deadline-s 135 --out "$OUT/bench_gpu.md"
step mem1m 30 "$PY" benchmarks/bench_dictionary.py --mem-only --mem-tokens 1 1024 4096 \
  --mem-d-in $MEMD --dtypes bfloat16 float32 --out "$OUT/mem_1m_gpu.md"

log "done in $(( $(date +%s) - T0 )) s; results in $OUT"
cat "$OUT/status.txt"
