//! Links the detector to libtorch and compiles its C++ shim (src/ops/pool_rows_shim.cpp, RoIAlign's reduction as
//! an autograd function); it needs only libtorch's own headers, so it builds on CPU-only machines too.

use std::path::PathBuf;

fn main() {
    torch_link::emit();
    println!("cargo:rerun-if-changed=src/ops/pool_rows_shim.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let libtorch = PathBuf::from(std::env::var_os("LIBTORCH").expect("LIBTORCH is not set; run scripts/setup"));
    cc::Build::new()
        .cpp(true)
        .file("src/ops/pool_rows_shim.cpp")
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .include(libtorch.join("include"))
        .include(libtorch.join("include/torch/csrc/api/include"))
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .compile("vovdet_detector_shim");
    println!("cargo:rustc-link-search=native={}", libtorch.join("lib").display());
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
}
