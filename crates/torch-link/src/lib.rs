//! Build-script helper shared by every crate whose binaries or tests link libtorch.
//!
//! torch-sys adds no rpath to final binaries, and the default `--as-needed` link drops
//! `libtorch_cuda.so` (then CUDA is never available). Calling [`emit`] from a `build.rs` fixes both,
//! so `cargo build`, `cargo test` and `cargo run` work with no exported variables.

use std::path::PathBuf;

/// Prints the cargo directives that give every binary, test and bench of the calling package an rpath to
/// `$LIBTORCH/lib` and keep `libtorch_cuda.so` (and `libc10_cuda.so`) linked when libtorch has them.
pub fn emit() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Some(libtorch) = std::env::var_os("LIBTORCH") else {
        println!("cargo:warning=LIBTORCH is not set; run scripts/setup (it links third_party/libtorch)");
        return;
    };
    let lib = PathBuf::from(libtorch).join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,-lc10_cuda,--as-needed");
    }
}

/// The CUDA header folders (`nvidia/cu13/include` and its `cccl`) of the torch wheel's nvidia packages, next to
/// `torch/` in site-packages, when `libtorch` (`$LIBTORCH`) is a CUDA build and scripts/setup installed those
/// headers (nvidia-cuda-crt, nvidia-cuda-cccl); `None` otherwise. C++ shims that include libtorch's CUDA headers
/// (`c10/cuda/...`) compile against them.
pub fn cuda_includes(libtorch: &std::path::Path) -> Option<Vec<PathBuf>> {
    if !libtorch.join("lib/libc10_cuda.so").exists() {
        return None;
    }
    let torch = libtorch.canonicalize().ok()?;
    let cuda = torch.parent()?.join("nvidia/cu13/include");
    let required =
        [cuda.join("crt/host_defines.h"), cuda.join("cuda_runtime_api.h"), cuda.join("cccl/cuda/std/cstdint")];
    required.iter().all(|header| header.exists()).then(|| vec![cuda.clone(), cuda.join("cccl")])
}

/// `$LIBTORCH`, for build scripts that compile against it; panics with the fix when it is not set.
pub fn libtorch() -> PathBuf {
    PathBuf::from(std::env::var_os("LIBTORCH").expect("LIBTORCH is not set; run scripts/setup"))
}

/// A C++17 build of `sources` against libtorch's headers with its ABI, which every shim needs, with
/// `vovdet_shim.h` (this crate's `include/`: exceptions turned into messages) on the include path, and a rerun of
/// the build script when one of them changes. The caller adds what is particular to it and compiles; link the result
/// with [`link_libtorch_cpu`].
pub fn shim_build(libtorch: &std::path::Path, sources: &[&str]) -> cc::Build {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let shared = concat!(env!("CARGO_MANIFEST_DIR"), "/include");
    println!("cargo:rerun-if-changed={shared}/vovdet_shim.h");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .include(libtorch.join("include"))
        .include(libtorch.join("include/torch/csrc/api/include"))
        .include(shared)
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false);
    for source in sources {
        println!("cargo:rerun-if-changed={source}");
        if source.ends_with(".cpp") {
            build.file(source);
        }
    }
    build
}

/// Links the calling package to libtorch's CPU libraries (`c10`, `torch_cpu`), which every shim uses.
pub fn link_libtorch_cpu(libtorch: &std::path::Path) {
    println!("cargo:rustc-link-search=native={}", libtorch.join("lib").display());
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
}
