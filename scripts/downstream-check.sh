#!/usr/bin/env bash
# foveal as a dependency, as a user's engine sees it (issue 15, item 2):
#  1. a crate generated outside the workspace (a temporary folder) depends on
#     foveal by path, builds and runs an op on the CPU (no CUDA anywhere);
#  2. where nvcc is on the path (`eval "$(scripts/install-cuda.sh --env)"`),
#     the same crate builds with foveal's feature `cuda`, compiling the kernels
#     from foveal-sys's sources. It shares CARGO_TARGET_DIR (and the lock file)
#     with the caller, so the other dependencies are reused; cargo still builds
#     foveal-sys again for this crate (measured: every kernel for sm_80 +
#     sm_90a + compute_80 PTX took 3 min 49 s on two cores), so the check
#     builds sm_90a only unless FOVEAL_CUDA_ARCHS / FOVEAL_CUDA_PTX say
#     otherwise: the workspace's own build covers every architecture;
#  3. `cargo package` of foveal-sys, foveal and foveal-candle: the .cu sources,
#     the header and the checked-in bindings are inside foveal-sys's package;
#     foveal-sys and foveal are verified (cargo builds each from its packaged
#     crate; foveal against the packaged foveal-sys through cargo's local
#     registry of the packages being assembled; foveal-sys without its feature
#     `cuda` compiles nothing, and builds without nvcc). foveal-candle is
#     packaged with --no-verify: verifying it rebuilds candle, tokenizers and
#     image from scratch in the packaged crate's own profile (unoptimised
#     dependencies: many minutes on two cores), and what it would check, that
#     it compiles against the packaged foveal, the examples and tests do.
# Usage: scripts/downstream-check.sh   (from anywhere; about 30 s without nvcc)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "== a crate outside the workspace, depending on foveal by path: $work/engine"
mkdir -p "$work/engine/src"
cat >"$work/engine/Cargo.toml" <<TOML
[package]
name = "engine"
version = "0.1.0"
edition = "2021"
publish = false

[dependencies]
foveal = { path = "$repo/kernels-rs" }

[features]
cuda = ["foveal/cuda"]

# As in foveal's workspace, so the kernels built there are reused here.
[profile.release]
debug = "line-tables-only"

[workspace]
TOML
cat >"$work/engine/src/main.rs" <<'RUST'
//! select_keep on the CPU: a user's first call, and a refused one.
use foveal::select_keep::cpu::select_keep;
use foveal::{KeepRule, KeepSet, RowLayout, RowSpec, View};

fn main() -> Result<(), foveal::Error> {
    let rows = RowLayout::new(8, &[RowSpec { start: 0, end: 8, visual: (1..7).collect() }])?;
    let logits = [3.0, -2.0, 1.0, 0.5, -1.0, 2.0];
    let rule = KeepRule { max_ratio: Some(0.5), ..KeepRule::default() };
    let mut keep = KeepSet::new(&rows);
    select_keep(View::contiguous(&logits, [1, 6])?, &rows, &rule, &mut keep)?;
    // sigmoid > 0.5 keeps 0, 2, 3, 5; at most floor(0.5 * 6) = 3: the 3 largest.
    assert_eq!(keep.kept(0), &[0, 2, 5]);
    let bad = KeepRule { threshold: 2.0, ..rule };
    let err = select_keep(View::contiguous(&logits, [1, 6])?, &rows, &bad, &mut keep).unwrap_err();
    assert!(matches!(err, foveal::Error::Value { arg: "threshold", .. }), "{err}");
    println!("downstream engine: kept {:?}; refused: {err}", keep.kept(0));
    Ok(())
}
RUST
# The workspace's lock file: the same dependency versions, so the same builds in the shared target folder.
cp "$repo/Cargo.lock" "$work/engine/"
(cd "$work/engine" && time cargo run --release)

if command -v nvcc >/dev/null; then
  echo "== the same crate with foveal's feature cuda ($(nvcc --version | grep -o 'release [0-9.]*'))"
  (cd "$work/engine" && FOVEAL_CUDA_ARCHS="${FOVEAL_CUDA_ARCHS:-90a}" FOVEAL_CUDA_PTX="${FOVEAL_CUDA_PTX-}" \
    bash -c 'time cargo build --release --features cuda')
else
  echo "== no nvcc on the path: the CUDA build of the downstream crate is skipped (CI runs it after installing the pinned toolchain)"
fi

echo "== cargo package: foveal-sys's package holds the kernels' sources, header and bindings"
cd "$repo"
list="$(cargo package --list -p foveal-sys --allow-dirty 2>/dev/null)"
for f in $(cd kernels-cuda && ls src/*.cu src/*.cuh) include/foveal.h src/bindings.rs build.rs; do
  grep -qx "$f" <<<"$list" || { echo "foveal-sys's package lacks $f"; exit 1; }
done
echo "   $(grep -c '\.cu$' <<<"$list") .cu files, $(grep -c '\.cuh$' <<<"$list") .cuh, include/foveal.h, src/bindings.rs"

echo "== cargo package, verified: foveal-sys, then foveal against the packaged foveal-sys"
time cargo package -p foveal-sys -p foveal --allow-dirty
echo "== cargo package --no-verify: foveal-candle (why: see the top of this script)"
cargo package -p foveal-sys -p foveal -p foveal-candle --no-verify --allow-dirty
for c in foveal-sys foveal foveal-candle; do
  test -s "$CARGO_TARGET_DIR/package/$c-0.1.0.crate" || { echo "no $c-0.1.0.crate"; exit 1; }
done
echo "== downstream check done"
