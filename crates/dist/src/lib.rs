//! Multi-process training on PyTorch's c10d (Gloo on CPU, NCCL on CUDA) through a small C++ shim. Filled by the
//! distributed-training issue.
