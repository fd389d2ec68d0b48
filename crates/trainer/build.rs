//! Links the trainer to libtorch and compiles its C++ shims: the CUDA caching allocator's statistics
//! (src/memory_shim.cpp), the operator counter (src/op_count_shim.cpp), the optimizer's multi-tensor ops
//! (src/optim_shim.cpp), autocast for any device and dtype (src/autocast_shim.cpp) and CUDA's sync debug mode
//! (src/sync_debug_shim.cpp), with the message freeing they share (src/shim_common.cpp). They need only libtorch's
//! own headers, so they build on CPU-only machines too; the sync debug mode is compiled in when libtorch is a CUDA
//! build and the CUDA headers are installed. It also records the commit the trainer is
//! built from (`VOVDET_GIT_COMMIT`, for checkpoint manifests) when the crate lies in a git checkout.

use std::path::Path;
use std::process::Command;

/// `git` with `args` in this crate's folder: its trimmed standard output, or `None` when git is missing, the
/// folder is not in a git checkout, or the command fails.
fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?.trim().to_string();
    (output.status.success() && !text.is_empty()).then_some(text)
}

/// Sets `VOVDET_GIT_COMMIT` to the checkout's `HEAD` commit and reruns this script when `HEAD` moves: when
/// `.git/HEAD` changes (a checkout) or the branch it points to does (a commit), in a plain checkout or a
/// worktree. Outside a git checkout nothing is set (the manifest then records no commit).
fn record_git_commit() {
    let Some(commit) = git(&["rev-parse", "HEAD"]) else { return };
    println!("cargo:rustc-env=VOVDET_GIT_COMMIT={commit}");
    let mut watched = Vec::new();
    if let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        watched.push(Path::new(&git_dir).join("HEAD"));
    }
    if let (Some(common), Some(branch)) =
        (git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]), git(&["symbolic-ref", "-q", "HEAD"]))
    {
        watched.push(Path::new(&common).join(branch));
        watched.push(Path::new(&common).join("packed-refs"));
    }
    // A path that does not exist would make cargo rerun the script on every build.
    for path in watched.iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

fn main() {
    torch_link::emit();
    record_git_commit();
    let libtorch = torch_link::libtorch();
    let mut build = torch_link::shim_build(
        &libtorch,
        &[
            "src/memory_shim.cpp",
            "src/op_count_shim.cpp",
            "src/optim_shim.cpp",
            "src/autocast_shim.cpp",
            "src/sync_debug_shim.cpp",
            "src/shim_common.cpp",
        ],
    );
    // CUDA's sync debug mode lives in libc10_cuda and its header needs the CUDA runtime headers.
    let cuda = torch_link::cuda_includes(&libtorch);
    if let Some(includes) = &cuda {
        build.includes(includes).define("VOVDET_CUDA", None);
    }
    build.compile("vovdet_memory_shim");
    torch_link::link_libtorch_cpu(&libtorch);
    if cuda.is_some() {
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
}
