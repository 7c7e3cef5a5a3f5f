#!/usr/bin/env bash
# The accelerator figures in one table: the CGDR training step (train_step.py, sd14: ours bf16 against
# PyTorch bf16 eager and torch.compile), sampling (sample.py, sd14: ours against diffusers fp16 with
# SDPA) and the MSID pretraining step (msid_step.py, vit_b, 100k identities), with MFU against the
# chip's measured bf16 matmul peak and the peak memory per device. Every measurement has a time
# limit (below): on an accelerator they add up to 7.4 minutes, so the whole stays under 8.
# --sdxl (or F2D_SDXL=1) adds SDXL 1.0 base at 1024 px (train_step.py and sample.py --preset sdxl, random
# weights, batch 2), opt-in because it needs up to 18 more minutes (most of it building 3.4B random
# parameters and compiling, on both sides); with --cpu-smoke it runs the tiny_sdxl train step only.
#
#   benchmarks/accelerator.sh               # on a machine with one GPU or TPU
#   benchmarks/accelerator.sh --sdxl        # and the SDXL rows
#   benchmarks/accelerator.sh --cpu-smoke   # the same pipeline on the cpu presets, fewest steps (or F2D_CPU_SMOKE=1)
#
# Writes to $OUT if set, else runs/accelerator/ (--out DIR overrides both): results.json (every
# benchmark's --json output, merged), table.md (what is printed last) and accelerator.log (all output).
# PYTHON (default python3) runs everything; wheels in $F2D_WHEELS (default .whl/) are installed
# first, into /tmp/f2d-site (for a machine whose Python lacks some of this project's pins).
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=${F2D_CPU_SMOKE:-0}
sdxl=${F2D_SDXL:-0}
out=${OUT:-runs/accelerator}
while [ $# -gt 0 ]; do
  case $1 in
    --cpu-smoke) smoke=1 ;;
    --sdxl) sdxl=1 ;;
    --out) out=$2; shift ;;
    -h|--help) sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) echo "benchmarks/accelerator.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
PYTHON=${PYTHON:-python3}
raw=$out/raw
mkdir -p "$raw" && rm -f "$raw"/*.json "$out/results.json" "$out/table.md" || exit
exec > >(tee "$out/accelerator.log") 2>&1
started=$SECONDS

if compgen -G "${F2D_WHEELS:-.whl}/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/f2d-site \
    "${F2D_WHEELS:-.whl}"/*.whl || exit
  export PYTHONPATH=/tmp/f2d-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ "$smoke" = 1 ]; then
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=
fi
backend=$("$PYTHON" -c 'import jax; print(jax.default_backend())') || { echo "error: JAX does not import" >&2; exit 1; }
if [ "$backend" = cpu ] && [ "$smoke" != 1 ]; then
  echo "benchmarks/accelerator.sh: JAX sees no GPU or TPU (backend: cpu); these figures need one." >&2
  echo "To test this script itself on CPU: benchmarks/accelerator.sh --cpu-smoke (or F2D_CPU_SMOKE=1)." >&2
  exit 1
fi

# Sizes and time limits (seconds per measurement). Accelerator: the presets with enough steps for
# a stable median; CPU smoke: the fewest steps, torch.compile given too little time on purpose (the
# "not measured" path runs too).
if [ "$smoke" = 1 ]; then
  sd=cpu msid=cpu torch_dtype=fp32
  peak_args=(--size 256 --chain 2 --repeats 2 --dtype float32)
  step_args=(--steps 1 --warmup 0 --batch 1)
  sample_args=(--steps 2 --repeats 1 --batch 1)
  msid_args=(--steps 1 --warmup 0 --batch 2 --devices 1 --identities 1000)
  t_peak=60 t_train=(300 120 20) t_sample=300 t_msid=(120 60 20)
  sdxl_train=tiny_sdxl sdxl_sample= t_sdxl_train=(300 120 20) t_sdxl_sample=0 sdxl_step_args=("${step_args[@]}")
else
  sd=sd14 msid=vit_b torch_dtype=bf16
  peak_args=(--size 8192 --chain 16 --repeats 10 --dtype bfloat16)
  step_args=(--steps 10 --warmup 3)
  sample_args=(--steps 30 --repeats 2)
  msid_args=(--steps 10 --warmup 3 --identities 100000)
  t_peak=20 t_train=(115 35 75) t_sample=50 t_msid=(40 25 35)
  sdxl_train=sdxl sdxl_sample=sdxl t_sdxl_train=(300 150 300) t_sdxl_sample=160
  sdxl_step_args=(--steps 5 --warmup 2)
fi

# run NAME LIMIT MEASUREMENTS COMMAND...: COMMAND --timeout LIMIT --json $raw/NAME.json, so each of
# its measurements (child processes) stops at LIMIT seconds; the whole is killed past
# LIMIT x MEASUREMENTS + 15 s. Where it writes no JSON, one that says so stands in.
run() {
  local name=$1 limit=$2 measurements=$3 t=$SECONDS status=0
  shift 3
  echo "== $name: at most $limit s per measurement"
  timeout -k 10 $((limit * measurements + 15)) "$@" --timeout "$limit" --json "$raw/$name.json" || status=$?
  echo "== $name: exit status $status, $((SECONDS - t)) s"
  [ -s "$raw/$name.json" ] || printf '{"results": [], "skipped": ["%s: exit status %s, no result (see %s)"]}\n' \
    "$name" "$status" accelerator.log >"$raw/$name.json"
}

# compare NAME PRESET OURS_LIMIT EAGER_LIMIT COMPILE_LIMIT ARGS...: ours, PyTorch eager and PyTorch
# torch.compile, one run each (each with its own limit), of benchmarks/SCRIPT.py, NAME being SCRIPT or
# SCRIPT-VARIANT (a row of its own).
compare() {
  local name=$1 preset=$2 limits=("$3" "$4" "$5")
  shift 5
  local command=("$PYTHON" "benchmarks/${name%%-*}.py" --preset "$preset" "$@")
  run "$name.ours" "${limits[0]}" 1 "${command[@]}" --skip-torch
  run "$name.eager" "${limits[1]}" 1 "${command[@]}" --skip-jax --torch-compile off --torch-dtypes "$torch_dtype"
  run "$name.compile" "${limits[2]}" 1 "${command[@]}" --skip-jax --torch-compile only --torch-dtypes "$torch_dtype"
}

echo "== peak: at most $t_peak s"
timeout -k 10 "$t_peak" "$PYTHON" benchmarks/accelerator.py peak "$raw/peak.json" "${peak_args[@]}"
echo "== peak: exit status $?, $((SECONDS - started)) s"
compare train_step "$sd" "${t_train[@]}" "${step_args[@]}"
run sample "$t_sample" 2 "$PYTHON" benchmarks/sample.py --preset "$sd" "${sample_args[@]}"
compare msid_step "$msid" "${t_msid[@]}" "${msid_args[@]}"
if [ "$sdxl" = 1 ]; then
  compare train_step-sdxl "$sdxl_train" "${t_sdxl_train[@]}" "${sdxl_step_args[@]}"
  [ -n "$sdxl_sample" ] && run sample-sdxl "$t_sdxl_sample" 2 "$PYTHON" benchmarks/sample.py --preset "$sdxl_sample" \
    "${sample_args[@]}"
fi

echo
"$PYTHON" benchmarks/accelerator.py table "$out" && rm -r "$raw"
echo
echo "total wall time: $((SECONDS - started)) s; results in $out/ (results.json, table.md, accelerator.log)"
