#!/usr/bin/env bash
# Device check for kernelkit on a GPU machine without network: build with CUDA, run the CUDA and
# Triton tests on the real GPU, the CUDA kernels under compute-sanitizer (memcheck, racecheck,
# synccheck), the Monarch, sparse and VQ benchmarks, and write a summary.
#
# Run from the repository root:  OUT=/some/dir bash bench/device_check.sh
# Everything goes under $OUT (default ./device-out), 7 files (the device tool returns at most 8; no plots):
#   env.log  build.log  tests.log  sanitizer.log  bench.log  bench_cuda.csv  SUMMARY.md
# bench_cuda.csv holds every family's CSV one after the other, each under a '# family: NAME' line.
# Steps never abort the script; each one's exit code and seconds are in SUMMARY.md.  The whole run
# is kept under BUDGET_S seconds (default 460): each step's timeout is cut to the time left.
# Knobs: PYTHON (default python), BUDGET_S, BENCH_REPEATS (default 20), KERNELKIT_CUDA_ARCHS
# (default: this card's compute capability), KERNELKIT_JOBS (default: nproc).
set -euo pipefail

OUT="${OUT:-./device-out}"
PY="${PYTHON:-python}"
BUDGET_S="${BUDGET_S:-480}"
BENCH_REPEATS="${BENCH_REPEATS:-20}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
START=$(date +%s)
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET || true   # the Triton kernels must run on the GPU here

declare -A RC SECS
STEPS=()

# step NAME LOG MAX_SECONDS CMD... : run CMD with a timeout, append its output to $OUT/LOG.
step() {
  local name=$1 log=$2 max=$3; shift 3
  local left=$(( START + BUDGET_S - $(date +%s) - 15 ))
  local limit=$(( max < left ? max : left ))
  STEPS+=("$name")
  if (( limit < 10 )); then
    RC[$name]="skipped (time budget)"; SECS[$name]=0
    echo "### $name: skipped, time budget of ${BUDGET_S}s spent" >> "$OUT/$log"
    return 0
  fi
  echo "### $name (timeout ${limit}s): $*" >> "$OUT/$log"
  local t0=$(date +%s) rc=0
  timeout -k 10 "$limit" "$@" >> "$OUT/$log" 2>&1 || rc=$?
  RC[$name]=$rc; SECS[$name]=$(( $(date +%s) - t0 ))
  (( rc == 124 || rc == 137 )) && RC[$name]="$rc (timed out after ${limit}s)"
  echo "### $name: exit ${RC[$name]} in ${SECS[$name]}s" >> "$OUT/$log"
  return 0
}

# (a) machine and versions
step env env.log 60 nvidia-smi
step versions env.log 60 "$PY" -c '
import sys, torch
print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
for m in ("triton", "pybind11", "setuptools", "pytest", "pytest_benchmark", "matplotlib", "numpy"):
    try: print(m, __import__(m).__version__)
    except Exception as e: print(m, "MISSING", e)'
step nvcc env.log 30 bash -c 'command -v nvcc || ls /usr/local/cuda/bin/nvcc; (nvcc --version || /usr/local/cuda/bin/nvcc --version)'

# (b) build with CUDA, offline (no build isolation: the build deps are already installed)
CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d '. ' || true)
export KERNELKIT_CUDA_ARCHS="${KERNELKIT_CUDA_ARCHS:-${CAP:-80;90}}"
export KERNELKIT_JOBS="${KERNELKIT_JOBS:-$(nproc)}"
echo "KERNELKIT_CUDA_ARCHS=$KERNELKIT_CUDA_ARCHS KERNELKIT_JOBS=$KERNELKIT_JOBS" >> "$OUT/build.log"
step build build.log 240 env KERNELKIT_BUILD_CUDA=1 "$PY" -m pip install --no-index --no-build-isolation --no-deps -v -e .
step import build.log 60 "$PY" -c 'import kernelkit; print(kernelkit.backends("cuda"))'

# (c) tests on the real GPU (failures are recorded, not fatal)
step tests_cuda tests.log 150 "$PY" -m pytest tests -m cuda -q -p no:cacheprovider -rfEs

# (c2) the CUDA kernels under compute-sanitizer: out-of-bounds and misaligned accesses (memcheck,
# with torch's caching allocator off so that every tensor is its own allocation), shared-memory
# races (racecheck) and barrier misuse (synccheck).  Small shapes only: the tools are slow.
CS=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || echo compute-sanitizer)
for tool in memcheck racecheck synccheck; do
  step "sanitizer_$tool" sanitizer.log 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$CS" --tool "$tool" \
    --error-exitcode 3 "$PY" -m pytest tests/test_monarch_cuda.py tests/test_sparse_cuda.py tests/test_vq_cuda.py tests/test_ot_cuda.py tests/test_mfac_cuda.py tests/test_rbf_cuda.py -m cuda -k sanitizer_cases \
    -q -p no:cacheprovider -x
done
step tests_triton tests.log 120 "$PY" -m pytest tests/test_monarch_triton.py tests/test_sparse_triton.py tests/test_vq_triton.py tests/test_ot_triton.py tests/test_mfac_triton.py tests/test_rbf_triton.py -q -p no:cacheprovider -rfE

# (d) benchmarks (each family's table and goal check in bench.log, its CSV in $OUT)
CSV_DIR=$(mktemp -d)
step bench_monarch bench.log 150 "$PY" -m kernelkit.bench --family monarch --device cuda --out "$CSV_DIR" \
  --repeats "$BENCH_REPEATS"
step bench_sparse bench.log 150 "$PY" -m kernelkit.bench --family sparse --device cuda --out "$CSV_DIR" \
  --repeats "$BENCH_REPEATS"
step bench_vq bench.log 150 "$PY" -m kernelkit.bench --family vq --device cuda --out "$CSV_DIR" \
  --repeats "$BENCH_REPEATS"
step bench_ot bench.log 150 "$PY" -m kernelkit.bench --family ot --device cuda --out "$CSV_DIR" \
  --repeats "$BENCH_REPEATS"
step bench_mfac bench.log 150 "$PY" -m kernelkit.bench --family mfac --device cuda --out "$CSV_DIR" \
  --repeats "$BENCH_REPEATS"
step bench_rbf bench.log 120 "$PY" -m kernelkit.bench --family rbf --device cuda --out "$CSV_DIR" \
  --repeats "$BENCH_REPEATS" --batch 262144
for f in "$CSV_DIR"/*_cuda.csv; do
  [[ -e "$f" ]] || continue
  echo "# family: $(basename "$f" _cuda.csv)"
  cat "$f"
  echo
done > "$OUT/bench_cuda.csv"

# (e) summary
S="$OUT/SUMMARY.md"
{
  echo "# kernelkit device check"
  echo
  echo "- card: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n1 || echo unknown)"
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)')"
  echo "- KERNELKIT_CUDA_ARCHS=$KERNELKIT_CUDA_ARCHS, total $(( $(date +%s) - START ))s (budget ${BUDGET_S}s)"
  echo "- $(grep -E '^(python|torch|triton) ' "$OUT/env.log" | tr '\n' ';' | sed 's/;$//; s/;/; /g')"
  echo
  echo "| step | exit code | seconds |"
  echo "|---|---|---|"
  for s in "${STEPS[@]}"; do echo "| $s | ${RC[$s]} | ${SECS[$s]} |"; done
  echo
  echo "## pytest"
  echo '```'
  grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error|errors|deselected)|no tests ran|^(FAILED|ERROR) ' "$OUT/tests.log" | head -n 40 || echo "(no pytest summary line found)"
  echo '```'
  if [[ "${RC[build]}" != "0" ]]; then
    echo
    echo "## build (last 40 lines)"
    echo '```'
    tail -n 40 "$OUT/build.log"
    echo '```'
  fi
  echo
  echo "## compute-sanitizer"
  echo '```'
  grep -E '^========= (ERROR SUMMARY|[A-Z].*(Invalid|Race|Barrier|error))|^### sanitizer_.*exit' "$OUT/sanitizer.log" | head -n 30 || echo "(no sanitizer output)"
  echo '```'
  echo
  echo "## bench"
  echo '```'
  sed -n '/^== [a-z]* on cuda/,/^CSV: /p' "$OUT/bench.log" | grep -v '^###' || true
  grep -q '^== [a-z]* on cuda' "$OUT/bench.log" || tail -n 40 "$OUT/bench.log"
  echo '```'
} > "$S"
cat "$S"

for s in "${STEPS[@]}"; do [[ "${RC[$s]}" == "0" ]] || exit 1; done
exit 0
