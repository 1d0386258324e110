#!/usr/bin/env bash
# Install the pinned CUDA 13.0 toolchain (nvcc, nvvm, cudart, crt headers, CCCL)
# from PyPI into a user-local virtual environment, and print how to point the
# build at it. CUDA 13.0 exactly: the GPU machines run driver 580, which rejects
# PTX from newer toolkits, and an unpinned nvidia-nvvm pulls a newer PTX ISA that
# the 13.0 ptxas refuses.
#
#   scripts/install-cuda.sh            # install (idempotent), print the exports
#   scripts/install-cuda.sh --env      # print only `export ...` lines, for eval
#
# Prefix: $FOVEAL_CUDA_PREFIX, default ~/.cache/foveal/cuda-13.0.
set -euo pipefail

prefix="${FOVEAL_CUDA_PREFIX:-$HOME/.cache/foveal/cuda-13.0}"
env_only=0
for arg in "$@"; do
  case "$arg" in
    --env) env_only=1 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

toolchain_pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-cccl==13.0.85
)

log() { [ "$env_only" = 1 ] || echo "$@"; }

if [ ! -x "$prefix/venv/bin/python" ]; then
  log "creating $prefix/venv"
  mkdir -p "$prefix"
  python3 -m venv "$prefix/venv"
fi
py="$prefix/venv/bin/python"
cuda_home="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13"

stamp="$prefix/.installed-toolchain"
if [ ! -f "$stamp" ] || [ ! -x "$cuda_home/bin/nvcc" ]; then
  log "installing ${toolchain_pins[*]}"
  "$py" -m pip install --quiet --disable-pip-version-check "${toolchain_pins[@]}" >&2
  touch "$stamp"
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
