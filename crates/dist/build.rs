//! Compiles the C++ shim over c10d (src/shim.cpp) and the overlapped gradient reducer (src/reducer.cpp), and
//! links the test and binary targets to libtorch.

use std::path::{Path, PathBuf};

/// Gloo's headers are not in the torch wheel; Debian's libgloo-dev (installed by scripts/setup) provides them.
const GLOO_INCLUDE: &str = "/usr/include";

fn main() {
    torch_link::emit();
    let libtorch = torch_link::libtorch();
    if !Path::new(GLOO_INCLUDE).join("gloo/config.h").exists() {
        panic!("gloo headers not found under {GLOO_INCLUDE}/gloo; run scripts/setup (it installs libgloo-dev)");
    }
    let mut build = torch_link::shim_build(&libtorch, &["src/shim.h", "src/shim.cpp", "src/reducer.cpp"]);
    build.define("USE_C10D_GLOO", None).include(GLOO_INCLUDE).flag_if_supported("-Wno-deprecated-declarations");
    if std::env::var_os("CARGO_FEATURE_NCCL").is_some() {
        for include in nccl_includes(&libtorch) {
            build.include(include);
        }
        build.define("VOVDET_NCCL", None).define("USE_C10D_NCCL", None).define("USE_CUDA", None);
    }
    build.compile("vovdet_dist_shim");
    torch_link::link_libtorch_cpu(&libtorch);
    if std::env::var_os("CARGO_FEATURE_NCCL").is_some() {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
}

/// CUDA and NCCL header folders of the torch wheel's nvidia packages, next to `torch/` in site-packages.
fn nccl_includes(libtorch: &Path) -> Vec<PathBuf> {
    let hint = "install the CUDA header wheels into .venv: .venv/bin/pip install --no-deps \
                nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85";
    let mut includes = torch_link::cuda_includes(libtorch)
        .unwrap_or_else(|| panic!("feature `nccl` needs a CUDA libtorch and the CUDA headers; {hint}"));
    let torch =
        libtorch.canonicalize().unwrap_or_else(|e| panic!("cannot resolve LIBTORCH {}: {e}", libtorch.display()));
    let nccl = torch.parent().map(|site| site.join("nvidia/nccl/include")).unwrap_or_default();
    if !nccl.join("nccl.h").exists() {
        panic!("feature `nccl` needs {}; {hint}", nccl.join("nccl.h").display());
    }
    includes.push(nccl);
    includes
}
