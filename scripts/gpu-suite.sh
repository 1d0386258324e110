#!/usr/bin/env bash
# The GPU suite: every op's CUDA path and every method's whole model against
# the CPU, the GPU benchmark beside its PyTorch baselines, the main job on the
# GPU, then compute-sanitizer. The GPU machine has no Rust toolchain and is
# lent for 15 minutes of device time in all, so the suite runs in halves and
# phases:
#
#   scripts/gpu-suite.sh build     # here: release binaries with CUDA, stripped
#                                  # and packed into .gpu-carry/ (fails above
#                                  # 60 MiB: the device tool carries 64 MiB)
#
# then, through the device tool, in the repository root on the GPU machine:
#
#   run(command="bash scripts/gpu-suite.sh phase1", carry=[".gpu-carry"], timeout_s=420)
#   run(command="bash scripts/gpu-suite.sh phase2", carry=[".gpu-carry"], timeout_s=420)
#
# phase1 (about 5 minutes at most): the GPU tests of every op and every
#   method with a bounded number of random cases, the benchmark in its quick
#   mode (copy bandwidth, bf16 matrix rate, one or two shapes per op) with the
#   PyTorch baselines, and the main job.
# phase2 (only if device time remains): compute-sanitizer memcheck, racecheck
#   and synccheck on the op tests with few cases, and the full benchmark.
#
# Every step has a time limit, writes its log under $OUT as it goes, and a
# failing step does not stop the others. The reply's tail is one summary
# table (also $OUT/summary.md). A step fails when its command fails, when it
# ran no test, or when any test skipped: FOVEAL_REQUIRE_GPU=1 makes a missing
# driver, a failed cuInit or a missing cuBLAS a test failure, never a skip.
# Back here, `python3 scripts/gpu-report.py OUT1 [OUT2]` writes the
# committed record docs/gpu-runs/DATE-GPU.md from those logs.
#
# $OUT returns at most 8 files, so each phase writes exactly these:
#   phase1: summary.md env.txt tests.log models.log bench.md bench.log torch.json main.log
#   phase2: summary.md env.txt memcheck.log racecheck.log synccheck.log bench-full.md bench-full.log torch-full.json
set -uo pipefail
cd "$(dirname "$0")/.."
carry=.gpu-carry
# The carry's limit with room for the working tree (the device tool takes 64 MiB in all).
carry_limit_mib=60

die() { echo "gpu-suite.sh: $*" >&2; exit 1; }

# ---------------------------------------------------------------------------
# build (here)
# ---------------------------------------------------------------------------

# The executable of test target `gpu` in cargo's JSON messages on stdin.
gpu_test_executable() {
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        print(m["executable"])
'
}

build() {
  scripts/install-cuda.sh --runtime >/dev/null || die "scripts/install-cuda.sh --runtime failed"
  eval "$(scripts/install-cuda.sh --env)" || die "scripts/install-cuda.sh --env failed"
  # candle's CUDA kernels for the H100/H200 only (one architecture: minutes, not tens).
  export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
  rm -rf "$carry" && mkdir -p "$carry/bin" || die "cannot make $carry"
  # The two GPU test binaries: every op's (foveal-tests, test `gpu`) and
  # every method's whole model (foveal-candle, test `gpu`).
  local pkg exe
  for pkg in foveal-tests:test-ops foveal-candle:test-models; do
    exe=$(cargo test --release -p "${pkg%%:*}" --features cuda --test gpu --no-run --message-format=json |
      gpu_test_executable) || die "building the GPU tests of ${pkg%%:*} failed"
    [ -n "$exe" ] && [ -f "$exe" ] || die "no GPU test executable for ${pkg%%:*}"
    cp "$exe" "$carry/bin/${pkg#*:}" || die "copying $exe failed"
  done
  cargo build --release -p foveal-bench --features cuda --bin gpu_bench || die "building gpu_bench failed"
  cargo build --release -p foveal-candle --features cuda --bin foveal || die "building the main job failed"
  local target
  target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])') ||
    die "cargo metadata failed"
  cp "$target/release/gpu_bench" "$target/release/foveal" "$carry/bin/" || die "copying gpu_bench and foveal failed"
  strip "$carry"/bin/* || die "strip failed"
  git rev-parse HEAD >"$carry/bin/COMMIT" 2>/dev/null || echo unknown >"$carry/bin/COMMIT"
  git status --porcelain --untracked-files=no | grep -q . && echo "(with uncommitted changes)" >>"$carry/bin/COMMIT"
  # One xz stream with a window larger than all binaries together: the kernels
  # and candle's PTX repeat across the binaries, and only a window that spans
  # them finds the repetition.
  local unpacked
  unpacked=$(du -sm "$carry/bin" | cut -f1)
  tar -C "$carry" -cf - bin | xz -6 --lzma2=preset=6,dict=512MiB -T1 >"$carry/bin.tar.xz" || die "packing failed"
  rm -rf "$carry/bin"
  local bytes mib
  bytes=$(stat -c %s "$carry/bin.tar.xz")
  mib=$(( (bytes + 1048575) / 1048576 ))
  echo "carry: $carry/bin.tar.xz, $mib MiB packed ($unpacked MiB unpacked), limit $carry_limit_mib MiB"
  [ "$mib" -le "$carry_limit_mib" ] || die "the carry is $mib MiB, over the $carry_limit_mib MiB limit: the device tool would refuse it"
  echo "next: run(command=\"bash scripts/gpu-suite.sh phase1\", carry=[\"$carry\"], timeout_s=420)"
}

# ---------------------------------------------------------------------------
# device phases (the GPU machine)
# ---------------------------------------------------------------------------

out="${OUT:-/tmp/foveal-gpu-out}"
work=/tmp/foveal-gpu
bin="$work/bin"
started=$(date +%s)
# The phase's budget in seconds: steps get what is left of it, so the summary
# always prints inside the device call's limit.
budget="${FOVEAL_SUITE_BUDGET:-400}"

summary_rows=()
failed=0

# Appends a row to the summary: step, status, seconds, detail.
record() {
  summary_rows+=("| $1 | $2 | $3 | $4 |")
  echo "== $1: $2 ($3 s) $4"
}

# Seconds left of the phase's budget, at most $1.
time_left() {
  local left=$(( budget - ($(date +%s) - started) ))
  (( left > $1 )) && left=$1
  (( left < 0 )) && left=0
  echo "$left"
}

# Runs a step: name, log file, time limit (s), command... Its output goes to
# the log; the status counts a timeout (124) as a failure.
step() {
  local name=$1 log=$2 limit=$3; shift 3
  local t0=$(date +%s) left rc
  left=$(time_left "$limit")
  if (( left < 5 )); then
    record "$name" "NOT RUN" 0 "no time left in the phase's budget"
    failed=1
    return 125
  fi
  echo "== $name: $* (limit ${left} s)" >>"$log"
  timeout --kill-after=10 "$left" "$@" >>"$log" 2>&1
  rc=$?
  STEP_SECONDS=$(( $(date +%s) - t0 ))
  return $rc
}

# Test counts of a libtest log: "passed failed ignored" summed over every
# "test result:" line.
test_counts() {
  awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1); if ($(i) ~ /^ignored;?$/) g += $(i-1) } }
       END { printf "%d %d %d\n", p, f, g }' "$1"
}

# A test step: name, log, limit, binary, args... It passes only when the
# binary exits 0, ran at least one test, and no test skipped.
test_step() {
  local name=$1 log=$2 limit=$3; shift 3
  local rc p f g skips
  step "$name" "$log" "$limit" "$@"
  rc=$?
  (( rc == 125 )) && return 0 # not run, recorded by step
  read -r p f g < <(test_counts "$log")
  skips=$(grep -c '^SKIP' "$log")
  if (( rc == 0 && p > 0 && skips == 0 )); then
    record "$name" ok "$STEP_SECONDS" "$p passed, $f failed, $g ignored"
  else
    local why="exit $rc"
    (( rc == 124 || rc == 137 )) && why="timed out"
    (( p + f == 0 )) && why="$why, no test ran"
    (( skips > 0 )) && why="$why, $skips skipped"
    record "$name" FAILED "$STEP_SECONDS" "$why; $p passed, $f failed, $g ignored"
    failed=1
  fi
}

# A plain step: it passes when the command exits 0.
plain_step() {
  local name=$1 log=$2 limit=$3; shift 3
  local rc
  step "$name" "$log" "$limit" "$@"
  rc=$?
  (( rc == 125 )) && return 0 # not run, recorded by step
  if (( rc == 0 )); then record "$name" ok "$STEP_SECONDS" ""
  else record "$name" FAILED "$STEP_SECONDS" "exit $rc$( (( rc == 124 || rc == 137 )) && echo ', timed out')"; failed=1; fi
}

prepare() {
  mkdir -p "$out" "$work" || die "cannot make $out and $work"
  [ -f "$carry/bin.tar.xz" ] || die "$carry/bin.tar.xz is missing: run 'scripts/gpu-suite.sh build' here and carry $carry"
  rm -rf "$bin" && tar -C "$work" -xJf "$carry/bin.tar.xz" || die "unpacking $carry/bin.tar.xz failed"
  {
    echo "commit: $(tr '\n' ' ' <"$bin/COMMIT")"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1)"
    nvidia-smi 2>&1 | head -n 12
  } >"$out/env.txt"
  nvidia-smi --query-gpu=name --format=csv,noheader >/dev/null 2>&1 ||
    { cat "$out/env.txt"; die "no GPU here (nvidia-smi failed): the device phases run on the GPU machine"; }
  # candle's CUDA backend links the driver, cuBLAS, cuRAND and NVRTC: the
  # machine's own (the driver's folder; the others beside its PyTorch).
  local libdirs
  libdirs=$(find /usr /opt /lib \( -name 'libcuda.so.1' -o -name 'libcublas.so.13*' -o -name 'libcublasLt.so.13*' \
    -o -name 'libcurand.so.10*' -o -name 'libnvrtc.so.13*' \) -not -path '*/stubs/*' 2>/dev/null |
    xargs -r -n1 dirname | sort -u | paste -sd:)
  export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  {
    echo "LD_LIBRARY_PATH: $LD_LIBRARY_PATH"
    for b in "$bin"/test-models "$bin"/gpu_bench "$bin"/foveal; do
      echo "ldd $(basename "$b"): $(ldd "$b" 2>&1 | grep -c 'not found') libraries not found"
      ldd "$b" 2>&1 | grep 'not found'
    done
  } >>"$out/env.txt"
  export FOVEAL_REQUIRE_GPU=1
}

finish() {
  {
    echo "# GPU suite, $1"
    echo
    sed 's/^/    /' "$out/env.txt" | head -n 3
    echo
    echo "| step | status | seconds | detail |"
    echo "|---|---|---|---|"
    printf '%s\n' "${summary_rows[@]}"
  } >"$out/summary.md"
  echo
  cat "$out/summary.md"
  return $failed
}

phase1() {
  prepare
  # Bounded random cases: every test still runs every path it names.
  export FOVEAL_GPU_CASES="${FOVEAL_GPU_CASES:-12}"
  test_step ops-tests "$out/tests.log" 120 "$bin/test-ops" --test-threads=8
  test_step model-tests "$out/models.log" 120 "$bin/test-models" --test-threads=3
  unset FOVEAL_GPU_CASES
  bench quick "$out/bench.md" "$out/bench.log" "$out/torch.json" 150
  plain_step main "$out/main.log" 60 "$bin/foveal"
  finish phase1
}

# The benchmark: mode (quick|full), table, log, torch JSON, limit. The case
# list comes from gpu_bench itself, so the PyTorch baselines time the same
# shapes; a failed baseline leaves the benchmark running without it.
bench() {
  local mode=$1 table=$2 log=$3 torch=$4 limit=$5
  local flag=()
  [ "$mode" = quick ] && flag=(--quick)
  local cases="$work/cases-$mode.json"
  plain_step "bench-cases-$mode" "$log" 20 bash -c "\"$bin/gpu_bench\" --list-cases ${flag[*]} >\"$cases\""
  local torch_arg=()
  if [ -s "$cases" ]; then
    step "torch-baselines-$mode" "$log" "$(( limit / 3 ))" bash -c "PYTHONUNBUFFERED=1 python3 bench/torch_baselines.py \"$cases\" >\"$torch\""
    local rc=$?
    if (( rc == 125 )); then :
    elif (( rc == 0 )) && [ -s "$torch" ]; then
      record "torch-baselines-$mode" ok "$STEP_SECONDS" "$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["cases"]), "cases")' "$torch" 2>&1)"
      torch_arg=(--torch "$torch")
    else
      record "torch-baselines-$mode" FAILED "$STEP_SECONDS" "exit $rc"
      failed=1
    fi
  fi
  plain_step "bench-$mode" "$log" "$limit" "$bin/gpu_bench" "${flag[@]}" "${torch_arg[@]}" --out "$table"
}

# compute-sanitizer, probed once: some machines refuse it (gVisor: "Device
# not supported"); then the sanitizer steps say so instead of passing.
sanitizer_probe() {
  SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer 2>/dev/null | head -n 1)
  if [ -z "$SANITIZER" ]; then
    record sanitizer-probe FAILED 0 "compute-sanitizer not found"
    failed=1
    return 1
  fi
  local log="$out/memcheck.log"
  FOVEAL_GPU_CASES=1 step sanitizer-probe "$log" 60 "$SANITIZER" --tool memcheck --error-exitcode 9 \
    "$bin/test-ops" window_mean::matches_cpu_f32 --exact --test-threads=1
  local rc=$? p
  (( rc == 125 )) && return 1
  read -r p _ _ < <(test_counts "$log")
  if (( rc == 0 && p == 1 )) && grep -q 'ERROR SUMMARY: 0 errors' "$log"; then
    record sanitizer-probe ok "$STEP_SECONDS" "$SANITIZER runs here"
    return 0
  fi
  record sanitizer-probe FAILED "$STEP_SECONDS" "compute-sanitizer does not run here (exit $rc, $p tests): $(grep -m1 -iE 'not supported|error' "$log")"
  failed=1
  return 1
}

# A sanitizer step: tool, limit. Errors are counted from its ERROR SUMMARY.
sanitizer_step() {
  local tool=$1 limit=$2 log="$out/$1.log"
  local extra=()
  [ "$tool" = racecheck ] && extra=(--racecheck-report all)
  FOVEAL_GPU_CASES="${FOVEAL_SANITIZER_CASES:-3}" test_step "$tool" "$log" "$limit" \
    "$SANITIZER" --tool "$tool" "${extra[@]}" --error-exitcode 9 "$bin/test-ops" --test-threads=4
  local errors
  errors=$(grep -oE 'ERROR SUMMARY: [0-9]+' "$log" | awk '{s += $3} END {print s + 0}')
  echo "$tool: $errors errors reported" >>"$log"
  summary_rows[-1]="${summary_rows[-1]% |} ($errors sanitizer errors) |"
}

phase2() {
  prepare
  if sanitizer_probe; then
    sanitizer_step memcheck 90
    sanitizer_step racecheck 90
    sanitizer_step synccheck 60
  fi
  bench full "$out/bench-full.md" "$out/bench-full.log" "$out/torch-full.json" 240
  finish phase2
}

case "${1:-}" in
  build) build ;;
  phase1) phase1 ;;
  phase2) phase2 ;;
  *) echo "usage: $0 build|phase1|phase2" >&2; exit 2 ;;
esac
