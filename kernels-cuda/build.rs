//! Compiles foveal's CUDA kernels with nvcc when the feature `cuda` is on.
//!
//! nvcc is found through `NVCC`, then `CUDA_HOME` (`$CUDA_HOME/bin/nvcc`), then
//! `PATH` (scripts/install-cuda.sh installs the pinned CUDA 13.0 toolchain).
//! Targets: machine code for each architecture of `FOVEAL_CUDA_ARCHS`
//! (default `80,90a`) plus PTX for `FOVEAL_CUDA_PTX` (default `80`; empty for
//! none), so newer GPUs JIT the PTX. The CUDA runtime is linked statically:
//! a binary built with the feature runs on a machine without a GPU, where the
//! runtime reports no device instead of failing to load.
//!
//! With `DOCS_RS` set (docs.rs sets it; CI's doc build too) nothing is
//! compiled: documentation needs only the checked-in bindings, and docs.rs
//! has no nvcc.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DOCS_RS");
    #[cfg(feature = "cuda")]
    if std::env::var_os("DOCS_RS").is_none() {
        cuda::build();
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::env;
    use std::path::{Path, PathBuf};

    const SOURCES: &[&str] = &[
        "src/glimpse_scores.cu",
        "src/select_keep.cu",
        "src/compact_kv.cu",
        "src/window_mean.cu",
        "src/multiscale_gather.cu",
        "src/text_guided_select.cu",
        "src/region_descriptors.cu",
        "src/route_topk.cu",
        "src/gaze_decode.cu",
        "src/gaze_route_decode.cu",
        "src/cross_attention.cu",
        "src/pos_conv1d.cu",
        "src/token_pack.cu",
        "src/glance_fusion.cu",
        "src/status.cu",
    ];
    const HEADERS: &[&str] = &[
        "include/foveal.h",
        "src/common.cuh",
        "src/top_select.cuh",
        "src/gaze_attend.cuh",
        "src/gaze_plan.cuh",
        "src/gaze_merge.cuh",
        "src/attention_tile.cuh",
    ];

    pub fn build() {
        for f in SOURCES.iter().chain(HEADERS) {
            println!("cargo:rerun-if-changed={f}");
        }
        for var in [
            "NVCC",
            "CUDA_HOME",
            "PATH",
            "FOVEAL_CUDA_ARCHS",
            "FOVEAL_CUDA_PTX",
        ] {
            println!("cargo:rerun-if-env-changed={var}");
        }
        let nvcc = find_nvcc().unwrap_or_else(|| {
            panic!(
                "foveal-sys: the feature `cuda` is on but no nvcc was found (looked at $NVCC, \
                 $CUDA_HOME/bin/nvcc and PATH). Install the pinned CUDA 13.0 toolchain with \
                 scripts/install-cuda.sh and run `eval \"$(scripts/install-cuda.sh --env)\"`."
            )
        });
        warn_unless_pinned(&nvcc);
        let cuda_root = nvcc
            .parent()
            .and_then(Path::parent)
            .expect("nvcc lies in <root>/bin")
            .to_path_buf();

        // cc takes nvcc from NVCC (in CUDA mode it treats `compiler()` as a host compiler).
        env::set_var("NVCC", &nvcc);
        let mut build = cc::Build::new();
        // Kernels are always optimised and never built with device debug (-G),
        // whatever the cargo profile: tests must time and race-check real code.
        build
            .cuda(true)
            .cudart("static")
            .debug(false)
            .opt_level(3)
            .include("include")
            .flag("-std=c++17");
        build
            .flag("--expt-relaxed-constexpr")
            .flag("-Xptxas=-warn-spills");
        for arch in env_list("FOVEAL_CUDA_ARCHS", "80,90a") {
            build.flag(format!("-gencode=arch=compute_{arch},code=sm_{arch}"));
        }
        for arch in env_list("FOVEAL_CUDA_PTX", "80") {
            build.flag(format!("-gencode=arch=compute_{arch},code=compute_{arch}"));
        }
        // One nvcc call per source, in whole-program mode. Given several .cu
        // files at once, cc compiles them with --device-c (relocatable device
        // code), and in that mode ptxas keeps warp shuffles as calls to
        // out-of-line helpers on sm_80 (every shfl.sync of glimpse_scores, 1,140
        // calls) and on sm_90a in places, with the register spills of the call
        // ABI. No kernel calls device code in another file, so none needs it.
        let objects = compile_each(&build, SOURCES);
        // The archive of the objects (no device link: nothing is relocatable).
        cc::Build::new().objects(&objects).compile("foveal_kernels");

        for dir in ["lib", "lib64", "lib/x64"] {
            let d = cuda_root.join(dir);
            if d.is_dir() {
                println!("cargo:rustc-link-search=native={}", d.display());
            }
        }
        println!("cargo:rustc-link-lib=static=cudart_static");
        for lib in ["dl", "rt", "pthread", "stdc++"] {
            println!("cargo:rustc-link-lib={lib}");
        }
    }

    /// Compiles each source on its own (so without --device-c), on as many
    /// threads as cargo allows (NUM_JOBS), and returns the objects.
    fn compile_each(build: &cc::Build, sources: &[&str]) -> Vec<PathBuf> {
        let jobs = env::var("NUM_JOBS")
            .ok()
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(1)
            .clamp(1, sources.len().max(1));
        let chunk = sources.len().div_ceil(jobs).max(1);
        std::thread::scope(|scope| {
            let workers: Vec<_> = sources
                .chunks(chunk)
                .map(|files| {
                    scope.spawn(move || {
                        files
                            .iter()
                            .flat_map(|f| build.clone().file(f).compile_intermediates())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().expect("an nvcc worker panicked"))
                .collect()
        })
    }

    fn env_list(var: &str, default: &str) -> Vec<String> {
        let v = env::var(var).unwrap_or_else(|_| default.to_string());
        v.split([',', ';', ' '])
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Warns (it does not fail: another 12.x or 13.x nvcc builds these
    /// kernels too) when `nvcc` is not the pinned 13.0, which CI builds and
    /// checks with and which cudarc's `cuda-13000` matches.
    fn warn_unless_pinned(nvcc: &Path) {
        let out = std::process::Command::new(nvcc).arg("--version").output();
        let text = out
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        if !text.contains("release 13.0,") {
            let line = text
                .lines()
                .last()
                .unwrap_or("no version printed")
                .trim()
                .to_string();
            println!(
                "cargo:warning=foveal-sys: {} is not the pinned CUDA 13.0 nvcc ({line}); \
                 `eval \"$(scripts/install-cuda.sh --env)\"` puts the pinned one first",
                nvcc.display()
            );
        }
    }

    fn find_nvcc() -> Option<PathBuf> {
        if let Some(p) = env::var_os("NVCC")
            .map(PathBuf::from)
            .filter(|p| p.is_file())
        {
            return Some(p);
        }
        if let Some(p) = env::var_os("CUDA_HOME")
            .map(|h| PathBuf::from(h).join("bin/nvcc"))
            .filter(|p| p.is_file())
        {
            return Some(p);
        }
        env::split_paths(&env::var_os("PATH")?)
            .map(|d| d.join("nvcc"))
            .find(|p| p.is_file())
    }
}
