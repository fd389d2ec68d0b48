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
