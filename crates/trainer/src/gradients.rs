//! How a training step's gradients become their mean over the ranks (the `[ddp]` section), as PyTorch's
//! `DistributedDataParallel` does it: by default each 25 MiB bucket's all-reduce starts during backward, as soon as
//! its last gradient has accumulated ([`dist::GradReducer`]), so communication overlaps the rest of backward;
//! optionally compressed to float16 on the wire (detectron2's `ddp.fp16_compression`). With
//! `overlap_grad_reduce = false` every bucket is all-reduced after backward instead. Both give the same
//! gradients: bit for bit with two processes (each element is `a + b` either way), within float rounding with more
//! (the ring all-reduce sums an element in an order that depends on its place in its bucket).

use std::sync::Arc;

use anyhow::Context;
use dist::{all_reduce_grads_bucketed, GradCompression, GradReducer, ProcessGroup};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::distributed::RankGroup;
use crate::placement::DdpBackend;

/// The `[ddp]` section: gradient averaging in multi-process training (ignored in one process).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DdpConfig {
    /// Start each bucket's all-reduce during backward (PyTorch DDP); `false` all-reduces every bucket after it.
    pub overlap_grad_reduce: bool,
    /// Largest gradient bucket in MiB (DDP's `bucket_cap_mb`).
    pub bucket_cap_mb: f64,
    /// Send gradients as float16, each rank's share divided by the world size before the sum (PyTorch's
    /// `fp16_compress_hook`, detectron2's `ddp.fp16_compression`); needs `overlap_grad_reduce`.
    pub fp16_compression: bool,
    /// The c10d backend: `auto` (NCCL for CUDA workers, Gloo for CPU ones), `nccl`, or `gloo` (which also lets
    /// CUDA workers share GPUs); see [`crate::placement`].
    pub backend: DdpBackend,
}

impl Default for DdpConfig {
    fn default() -> Self {
        DdpConfig { overlap_grad_reduce: true, bucket_cap_mb: 25.0, fp16_compression: false, backend: DdpBackend::Auto }
    }
}

/// Averages the step's gradients over the ranks; see the module documentation.
#[derive(Debug)]
pub enum GradientAveraging {
    /// One process: nothing to average.
    Local,
    /// Bucketed all-reduces after the last backward of the step.
    AfterBackward {
        /// The processes.
        group: Arc<ProcessGroup>,
        /// The parameters whose gradients are averaged, in the same order on every rank.
        params: Vec<Tensor>,
        /// Largest bucket in bytes.
        bucket_bytes: usize,
    },
    /// Bucketed all-reduces started during the last backward of the step.
    Overlapped(GradReducer),
}

impl GradientAveraging {
    /// Averaging for `params` (the trainable variables, in the same order on every rank) over `group`, as
    /// `config` asks. A collective when overlapped: every rank calls it.
    pub fn new(group: &RankGroup, params: &[Tensor], config: &DdpConfig) -> anyhow::Result<GradientAveraging> {
        anyhow::ensure!(
            config.bucket_cap_mb.is_finite() && config.bucket_cap_mb > 0.0,
            "ddp.bucket_cap_mb = {} must be a positive number of MiB",
            config.bucket_cap_mb
        );
        anyhow::ensure!(
            !config.fp16_compression || config.overlap_grad_reduce,
            "ddp.fp16_compression = true needs ddp.overlap_grad_reduce = true"
        );
        let Some(group) = group.process_group() else { return Ok(GradientAveraging::Local) };
        let bucket_bytes = (config.bucket_cap_mb * (1 << 20) as f64) as usize;
        if !config.overlap_grad_reduce {
            let params = params.iter().map(Tensor::shallow_clone).collect();
            return Ok(GradientAveraging::AfterBackward { group, params, bucket_bytes });
        }
        let compression = if config.fp16_compression { GradCompression::Fp16 } else { GradCompression::None };
        let reducer = GradReducer::new(&group, params, bucket_bytes, compression)
            .with_context(|| format!("rank {}: setting up the gradient all-reduce", group.rank()))?;
        Ok(GradientAveraging::Overlapped(reducer))
    }

    /// Call before the backward of the step's last micro-batch (earlier ones only accumulate locally).
    pub fn before_last_backward(&self) -> Result<(), dist::DistError> {
        match self {
            GradientAveraging::Overlapped(reducer) => reducer.arm(),
            _ => Ok(()),
        }
    }

    /// Call after that backward: every gradient then holds its mean over the ranks.
    pub fn finish(&self) -> Result<(), dist::DistError> {
        match self {
            GradientAveraging::Local => Ok(()),
            GradientAveraging::AfterBackward { group, params, bucket_bytes } => {
                all_reduce_grads_bucketed(group, params, *bucket_bytes).map(|_| ())
            }
            GradientAveraging::Overlapped(reducer) => reducer.finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_ddp_and_bad_values_are_named() {
        let config = DdpConfig::default();
        assert!(config.overlap_grad_reduce && !config.fp16_compression && config.bucket_cap_mb == 25.0);
        let single = RankGroup::single();
        assert!(matches!(GradientAveraging::new(&single, &[], &config).unwrap(), GradientAveraging::Local));
        let compressed_late = DdpConfig { overlap_grad_reduce: false, fp16_compression: true, ..config.clone() };
        let message = GradientAveraging::new(&single, &[], &compressed_late).unwrap_err().to_string();
        assert!(message.contains("ddp.fp16_compression"), "{message}");
        let empty_buckets = DdpConfig { bucket_cap_mb: 0.0, ..config };
        let message = GradientAveraging::new(&single, &[], &empty_buckets).unwrap_err().to_string();
        assert!(message.contains("ddp.bucket_cap_mb"), "{message}");
    }
}
