//! Links the detector to libtorch and compiles its C++ shim (src/ops/pool_rows_shim.cpp, RoIAlign's reduction as
//! an autograd function); it needs only libtorch's own headers, so it builds on CPU-only machines too.

fn main() {
    torch_link::emit();
    let libtorch = torch_link::libtorch();
    torch_link::shim_build(&libtorch, &["src/ops/pool_rows_shim.cpp"]).compile("vovdet_detector_shim");
    torch_link::link_libtorch_cpu(&libtorch);
}
