//! Links the trainer to libtorch and compiles its C++ shims: the CUDA caching allocator's statistics
//! (src/memory_shim.cpp), the operator counter (src/op_count_shim.cpp), the optimizer's multi-tensor ops
//! (src/optim_shim.cpp) and autocast for any device and dtype (src/autocast_shim.cpp), with the message freeing
//! they share (src/shim_common.cpp); they need only
//! libtorch's own headers, so they build on CPU-only machines too.

use std::path::PathBuf;

fn main() {
    torch_link::emit();
    println!("cargo:rerun-if-changed=src/memory_shim.cpp");
    println!("cargo:rerun-if-changed=src/op_count_shim.cpp");
    println!("cargo:rerun-if-changed=src/optim_shim.cpp");
    println!("cargo:rerun-if-changed=src/autocast_shim.cpp");
    println!("cargo:rerun-if-changed=src/shim_common.h");
    println!("cargo:rerun-if-changed=src/shim_common.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let libtorch = PathBuf::from(std::env::var_os("LIBTORCH").expect("LIBTORCH is not set; run scripts/setup"));
    cc::Build::new()
        .cpp(true)
        .file("src/memory_shim.cpp")
        .file("src/op_count_shim.cpp")
        .file("src/optim_shim.cpp")
        .file("src/autocast_shim.cpp")
        .file("src/shim_common.cpp")
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .include(libtorch.join("include"))
        .include(libtorch.join("include/torch/csrc/api/include"))
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .compile("vovdet_memory_shim");
    println!("cargo:rustc-link-search=native={}", libtorch.join("lib").display());
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
}
