#!/usr/bin/env bash
# The whole GPU suite: every op's CUDA path against its CPU reference,
# compute-sanitizer memcheck and racecheck on the GPU tests, the GPU
# benchmark and the main job on the GPU.
#
# The GPU machine has no Rust toolchain, so this runs in two halves:
#
#   scripts/gpu-suite.sh build     # here: build release binaries with CUDA,
#                                  # strip and compress them into .gpu-carry/
#                                  # (git-ignored, well under the 64 MiB carry limit)
#
# then, through the device tool, in the repository root on the GPU machine:
#
#   run(command="bash scripts/gpu-suite.sh device", carry=[".gpu-carry"], timeout_s=600)
#
# The device half writes every log and the benchmark table under $OUT
# (suite.log, tests.log, memcheck.log, racecheck.log, bench.md, main.log)
# and exits non-zero if any step failed. FOVEAL_GPU_CASES scales the number
# of random cases of the GPU tests (the sanitizers run with fewer).
set -uo pipefail
cd "$(dirname "$0")/.."
carry=.gpu-carry

build() {
  set -e
  scripts/install-cuda.sh --runtime >/dev/null
  eval "$(scripts/install-cuda.sh --env)"
  # candle's CUDA kernels, for the H100/H200 only (one architecture: minutes, not tens).
  export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
  rm -rf "$carry" && mkdir -p "$carry/bin"
  # Test executables with the CUDA paths: every op's (tests crate) and each
  # method's whole model on the GPU against the CPU (foveal-candle's *_gpu tests).
  {
    cargo test --release -p foveal-tests --features cuda --no-run --message-format=json
    cargo test --release -p foveal-candle --features cuda --tests --no-run --message-format=json
  } 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        name = m["target"]["name"]
        if "foveal-candle" not in m["package_id"] or name.endswith("_gpu"):
            print(name, m["executable"])
' | while read -r name exe; do cp "$exe" "$carry/bin/test-$name"; done
  cargo build --release -p foveal-bench --features cuda --bin gpu_bench
  cargo build --release -p foveal-candle --features cuda --bin foveal
  cp target/release/gpu_bench "$carry/bin/gpu_bench"
  cp target/release/foveal "$carry/bin/foveal"
  strip "$carry"/bin/*
  tar -C "$carry" -cJf "$carry/bin.tar.xz" bin && rm -rf "$carry/bin"
  ls -l "$carry"
  echo "carry $carry to the device and run: bash scripts/gpu-suite.sh device"
}

device() {
  local out="${OUT:-/tmp/foveal-gpu-out}" work=/tmp/foveal-gpu failed=0
  mkdir -p "$out" "$work"
  tar -C "$work" -xJf "$carry/bin.tar.xz"
  local bin="$work/bin"
  # candle's CUDA backend links cuBLAS, cuRAND and NVRTC: the machine's own, beside its PyTorch.
  local libdirs
  libdirs=$(find /usr /opt /lib -name 'libcublas.so.13*' -o -name 'libcurand.so.10*' -o -name 'libnvrtc.so.13*' 2>/dev/null | xargs -r -n1 dirname | sort -u | paste -sd:)
  export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  step() { # name, command...
    local name=$1; shift
    echo "== $name: $*" | tee -a "$out/suite.log"
    if "$@" >>"$out/$name.log" 2>&1; then echo "   ok" | tee -a "$out/suite.log"
    else echo "   FAILED (exit $?)" | tee -a "$out/suite.log"; failed=1; fi
  }
  if ! nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$out/suite.log"; then
    echo "no GPU here: the device half runs on the GPU machine" >&2
    return 3
  fi
  local sanitizer
  sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
  for t in "$bin"/test-*; do
    step tests "$t" --test-threads=1
  done
  export FOVEAL_GPU_CASES="${FOVEAL_SANITIZER_CASES:-8}"
  for t in "$bin"/test-*; do
    step memcheck "$sanitizer" --tool memcheck --error-exitcode 9 "$t" gpu --test-threads=1
    step racecheck "$sanitizer" --tool racecheck --racecheck-report all --error-exitcode 9 "$t" gpu --test-threads=1
  done
  unset FOVEAL_GPU_CASES
  step bench "$bin/gpu_bench" --out "$out/bench.md"
  step main "$bin/foveal"
  tail -n 3 "$out"/tests.log
  cat "$out/suite.log"
  [ -f "$out/bench.md" ] && cat "$out/bench.md"
  return $failed
}

case "${1:-}" in
  build) build ;;
  device) device ;;
  *) echo "usage: $0 build|device" >&2; exit 2 ;;
esac
