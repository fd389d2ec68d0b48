//! Where a distributed worker runs and how it talks to the others: the c10d backend (`ddp.backend`) and the GPU
//! each local rank takes.
//!
//! `auto` (the default) is PyTorch's usual pairing: NCCL for CUDA workers, Gloo for CPU workers, one GPU per
//! worker (`cuda:LOCAL_RANK`). `gloo` with CUDA workers lets more workers than GPUs share them, local rank `r`
//! taking `cuda:(r mod GPUs)`: the multi-process CUDA path on a machine with one GPU (Gloo stages CUDA tensors
//! through host memory; NCCL refuses two ranks on one GPU). `nccl` insists on NCCL and needs CUDA workers.

use serde::{Deserialize, Serialize};
use tch::Device;

/// `ddp.backend`: the c10d backend of a multi-process run (ignored in one process).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DdpBackend {
    /// NCCL for CUDA workers, Gloo for CPU workers.
    #[default]
    Auto,
    /// NCCL; CUDA workers only, one GPU each.
    Nccl,
    /// Gloo, on the CPU or with CUDA workers (which may then share GPUs).
    Gloo,
}

impl DdpBackend {
    /// The backend workers on `device` use; an error naming `ddp.backend` when NCCL is asked for CPU workers.
    pub fn resolve(self, device: Device) -> anyhow::Result<dist::Backend> {
        match (self, device.is_cuda()) {
            (DdpBackend::Auto, true) | (DdpBackend::Nccl, true) => Ok(dist::Backend::Nccl),
            (DdpBackend::Auto, false) | (DdpBackend::Gloo, _) => Ok(dist::Backend::Gloo),
            (DdpBackend::Nccl, false) => anyhow::bail!(
                "ddp.backend = \"nccl\" needs CUDA workers (--num-gpus, or device = \"cuda\" under torchrun/srun); \
                 CPU workers use \"gloo\" or \"auto\""
            ),
        }
    }

    /// Whether `workers` CUDA workers fit a machine with `gpus` GPUs: one each, unless Gloo lets them share.
    pub fn check_gpu_count(self, workers: usize, gpus: usize) -> anyhow::Result<()> {
        anyhow::ensure!(gpus > 0, "{workers} CUDA worker(s) asked for, but this machine has no CUDA device");
        anyhow::ensure!(
            self == DdpBackend::Gloo || workers <= gpus,
            "{workers} CUDA workers on a machine with {gpus} CUDA device(s): with ddp.backend = \"{}\" each \
             worker needs its own GPU; set ddp.backend = \"gloo\" to let workers share GPUs, or use --num-procs \
             for CPU workers",
            self.name()
        );
        Ok(())
    }

    /// The GPU of local rank `local_rank` among `gpus`: its own, or round-robin when Gloo shares them.
    pub fn gpu_of(self, local_rank: usize, gpus: usize) -> anyhow::Result<usize> {
        self.check_gpu_count(local_rank + 1, gpus)?;
        Ok(local_rank % gpus)
    }

    /// The name written in a config.
    pub fn name(self) -> &'static str {
        match self {
            DdpBackend::Auto => "auto",
            DdpBackend::Nccl => "nccl",
            DdpBackend::Gloo => "gloo",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_pairs_nccl_with_cuda_and_gloo_with_the_cpu() {
        assert_eq!(DdpBackend::Auto.resolve(Device::Cuda(0)).unwrap(), dist::Backend::Nccl);
        assert_eq!(DdpBackend::Auto.resolve(Device::Cpu).unwrap(), dist::Backend::Gloo);
        assert_eq!(DdpBackend::Gloo.resolve(Device::Cuda(1)).unwrap(), dist::Backend::Gloo);
        let message = DdpBackend::Nccl.resolve(Device::Cpu).unwrap_err().to_string();
        assert!(message.contains("ddp.backend = \"nccl\""), "{message}");
    }

    #[test]
    fn only_gloo_lets_workers_share_gpus() {
        assert_eq!(DdpBackend::Auto.gpu_of(1, 2).unwrap(), 1);
        assert_eq!(DdpBackend::Gloo.gpu_of(1, 1).unwrap(), 0);
        assert_eq!(DdpBackend::Gloo.gpu_of(5, 2).unwrap(), 1);
        for backend in [DdpBackend::Auto, DdpBackend::Nccl] {
            let message = backend.gpu_of(1, 1).unwrap_err().to_string();
            assert!(message.contains("ddp.backend = \"gloo\""), "{message}");
        }
        assert!(DdpBackend::Gloo.gpu_of(0, 0).unwrap_err().to_string().contains("no CUDA device"));
    }
}
