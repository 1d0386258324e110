#!/usr/bin/env bash
# Install the pinned CUDA 13.0 toolchain (nvcc, nvvm, cudart, crt headers, CCCL,
# and the SASS readers cuobjdump and nvdisasm) from PyPI into a user-local
# virtual environment, and print how to point the build at it. CUDA 13.0
# exactly: the GPU machines run driver 580, which rejects PTX from newer
# toolkits, and an unpinned nvidia-nvvm pulls a newer PTX ISA that the 13.0
# ptxas refuses.
#
#   scripts/install-cuda.sh            # install (idempotent), print the exports
#   scripts/install-cuda.sh --env      # print only `export ...` lines, for eval
#   scripts/install-cuda.sh --runtime  # also what linking candle-core's "cuda"
#                                      # feature needs (foveal-candle --features
#                                      # cuda): cuBLAS, cuRAND, NVRTC, unversioned
#                                      # .so names, and a libcuda link stub
#
# Prefix: $FOVEAL_CUDA_PREFIX, default ~/.cache/foveal/cuda-13.0.
set -euo pipefail

prefix="${FOVEAL_CUDA_PREFIX:-$HOME/.cache/foveal/cuda-13.0}"
env_only=0
runtime=0
for arg in "$@"; do
  case "$arg" in
    --env) env_only=1 ;;
    --runtime) runtime=1 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

toolchain_pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-cccl==13.0.85
  # SASS readers (scripts/kernel-report.py, `cuobjdump -sass`): PyPI has no 13.0
  # wheel of either; 13.2.51 is the oldest. They only read the 13.0 cubins
  # (they generate no code), so the newer version changes nothing built.
  nvidia-cuda-cuobjdump==13.2.51
  nvidia-cuda-nvdisasm==13.2.51
)

runtime_pins=(
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
  nvidia-cuda-nvrtc==13.0.88
)

log() { [ "$env_only" = 1 ] || echo "$@"; }
# Every step that can fail says which one failed (set -e alone exits silently).
die() { echo "install-cuda.sh: $*" >&2; exit 1; }
trap 'echo "install-cuda.sh: failed at line $LINENO: $BASH_COMMAND" >&2' ERR

if [ ! -x "$prefix/venv/bin/python" ]; then
  log "creating $prefix/venv"
  mkdir -p "$prefix"
  python3 -m venv "$prefix/venv" || die "python3 -m venv $prefix/venv failed (Debian: apt-get install python3-venv)"
fi
py="$prefix/venv/bin/python"
cuda_home="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13"

# The stamp holds the pins it installed: a changed pin list installs again.
stamp="$prefix/.installed-toolchain"
if [ "$(cat "$stamp" 2>/dev/null)" != "${toolchain_pins[*]}" ] || [ ! -x "$cuda_home/bin/nvcc" ] ||
  [ ! -x "$cuda_home/bin/nvdisasm" ]; then
  log "installing ${toolchain_pins[*]}"
  "$py" -m pip install --quiet --disable-pip-version-check "${toolchain_pins[@]}" >&2 ||
    die "pip could not install ${toolchain_pins[*]} (is PyPI reachable?)"
  for tool in nvcc nvdisasm cuobjdump; do
    [ -x "$cuda_home/bin/$tool" ] || die "the toolchain installed but $cuda_home/bin/$tool is missing"
  done
  echo "${toolchain_pins[*]}" >"$stamp"
fi

if [ "$runtime" = 1 ] && [ ! -f "$prefix/.installed-runtime" ]; then
  log "installing ${runtime_pins[*]}"
  "$py" -m pip install --quiet --disable-pip-version-check "${runtime_pins[@]}" >&2 ||
    die "pip could not install ${runtime_pins[*]} (is PyPI reachable?)"
  # The linker wants unversioned names.
  for lib in cublas cublasLt cudart nvrtc curand; do
    real=$(ls "$cuda_home"/lib/lib"$lib".so.* 2>/dev/null | sort | head -n 1)
    [ -n "$real" ] || die "lib$lib.so.* is missing from $cuda_home/lib after the runtime install"
    ln -sf "$(basename "$real")" "$cuda_home/lib/lib$lib.so"
  done
  # A link-time stand-in for the driver library (the GPU machine's real
  # libcuda.so.1 is loaded at run time): one empty function for every driver
  # entry point cudarc declares. cudarc's build script searches lib/stubs.
  mkdir -p "$cuda_home/lib/stubs"
  # cudarc's source, unpacked by cargo: `cargo metadata` downloads and
  # unpacks every package of the lock file's graph (`cargo fetch` only
  # downloads the archives).
  root="$(cd "$(dirname "$0")/.." && pwd)"
  cudarc_src=$(cargo metadata --format-version 1 --all-features --manifest-path "$root/Cargo.toml" 2>/dev/null |
    "$py" -c 'import json, sys, os
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "cudarc":
        print(os.path.dirname(p["manifest_path"]))
        break') || true
  [ -n "$cudarc_src" ] && [ -f "$cudarc_src/src/driver/sys/mod.rs" ] ||
    die "cudarc's source was not found through cargo metadata (run cargo fetch in $root and check the network)"
  grep -ohE '^\s+fn cu[A-Z][A-Za-z0-9_]*\(' "$cudarc_src/src/driver/sys/mod.rs" | sed -E 's/^\s+fn (\w+)\(/void \1(void) {}/' | sort -u >"$prefix/libcuda_stub.c"
  [ -s "$prefix/libcuda_stub.c" ] || die "no driver entry points found in $cudarc_src/src/driver/sys/mod.rs"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda_home/lib/stubs/libcuda.so" "$prefix/libcuda_stub.c" ||
    die "gcc could not build the libcuda link stub"
  touch "$prefix/.installed-runtime"
fi

if [ "$env_only" = 1 ]; then
  echo "export CUDA_HOME=\"$cuda_home\""
  echo "export NVCC=\"$cuda_home/bin/nvcc\""
  echo "export PATH=\"$cuda_home/bin:\$PATH\""
  exit 0
fi

"$cuda_home/bin/nvcc" --version | tail -n 2
cat <<MSG

CUDA 13.0 toolchain ready. Point builds at it with:

  eval "\$($0 --env)"
  cargo build -p foveal --features cuda

(or set NVCC=$cuda_home/bin/nvcc alone; foveal-sys's build.rs reads NVCC, CUDA_HOME, then PATH.)
MSG
