//! [`GradReducer`]: gradient averaging overlapped with backward, as PyTorch's DDP does. Post-accumulate-grad hooks
//! (src/reducer.cpp) launch each bucket's asynchronous all-reduce as soon as its last gradient has accumulated,
//! so communication runs while the autograd engine computes the remaining gradients.

use std::ffi::c_int;
use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tch::Tensor;

use crate::collectives::{collective_failure, raw_tensor};
use crate::grads::{first_different_record, plan_buckets};
use crate::{ffi, millis, DistError, ProcessGroup};

/// How a bucket travels between ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GradCompression {
    /// Gradients are summed in their own kind, then divided by the world size (bit-identical to
    /// [`crate::all_reduce_grads_bucketed`]).
    #[default]
    None,
    /// PyTorch's `fp16_compress_hook`: each bucket is cast to float16 and divided by the world size before the
    /// sum, and the float16 result is cast back into the gradients. Halves the traffic; the gradients keep about
    /// 3 significant digits (float16 rounding of each rank's share and of the sum).
    Fp16,
}

/// Averages gradients over ranks while backward runs.
///
/// Created once over the model's parameters (every rank must call [`GradReducer::new`] with the same parameter
/// shapes, in the same order: it is a collective). Parameters that do not require grad are ignored. The others
/// are planned into buckets of at most `bucket_bytes` (a larger parameter gets a bucket of its own), one kind and
/// device per bucket, in reverse parameter order, since backward reaches the last layers first.
///
/// A step: [`arm`](GradReducer::arm) before the backward of the step's last micro-batch (backward passes while
/// not armed, such as earlier gradient-accumulation micro-batches, only accumulate locally, like DDP's
/// `no_sync`), then [`finish`](GradReducer::finish) after it. During the armed backward, a bucket is ready once
/// all its gradients have accumulated; ready buckets are launched strictly in bucket order, so every rank issues
/// the same collectives in the same order. A parameter that gets no gradient in the armed backward holds its
/// bucket, and every later one, back until `finish` (fewer such parameters early in backward, more overlap).
///
/// After `finish`, every parameter that has a gradient on all ranks holds the mean over ranks (the gradient as
/// `finish` found it, including earlier micro-batches), and one without a gradient on every rank keeps none,
/// exactly as [`crate::all_reduce_grads_bucketed`] would leave them; a parameter with a gradient on some ranks
/// only is an error on every rank, not a hang.
///
/// With world size 1 it works the same (the collectives are local copies); a trainer may as well not create one.
/// Dropping the reducer removes its hooks; a hook that still runs (a backward on another thread) does nothing.
/// One reducer per parameter: a second one over a parameter that still has a reducer is refused.
///
/// On CUDA (NCCL), the hooks run on the autograd engine's device thread and launch on its current stream;
/// c10d orders the all-reduce after it and `finish` waits for it as [`ProcessGroup::all_reduce`] does.
pub struct GradReducer {
    raw: NonNull<ffi::RawReducer>,
    rank: usize,
    timeout: Duration,
    params: usize,
    buckets: usize,
    launched_in_backward: AtomicUsize,
}

// SAFETY: the C++ state is guarded by its own mutex; the tensors it holds are reference-counted by libtorch.
unsafe impl Send for GradReducer {}
// SAFETY: see Send; every method takes `&self` and locks the C++ state.
unsafe impl Sync for GradReducer {}

impl fmt::Debug for GradReducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GradReducer")
            .field("rank", &self.rank)
            .field("params", &self.params)
            .field("buckets", &self.buckets)
            .finish()
    }
}

impl Drop for GradReducer {
    fn drop(&mut self) {
        // SAFETY: `raw` came from vovdet_reducer_new and is freed only here.
        unsafe { ffi::vovdet_reducer_free(self.raw.as_ptr()) };
    }
}

impl GradReducer {
    /// Plans the buckets and registers a post-accumulate-grad hook on every parameter that requires grad.
    /// Collective: checks that every rank planned the same buckets. Fails on a parameter that is not a leaf or
    /// already has such a hook.
    pub fn new(
        pg: &ProcessGroup,
        params: &[Tensor],
        bucket_bytes: usize,
        compression: GradCompression,
    ) -> Result<GradReducer, DistError> {
        const OP: &str = "GradReducer::new";
        if let Some(i) = params.iter().position(|p| !p.defined()) {
            return Err(pg.invalid(OP, format!("parameter {i} is undefined")));
        }
        let reversed: Vec<(usize, Tensor)> = params
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, p)| p.requires_grad())
            .map(|(i, p)| (i, p.shallow_clone()))
            .collect();
        let buckets = plan_buckets(&reversed, bucket_bytes);
        check_same_plan(pg, OP, &reversed, &buckets)?;

        let ordered: Vec<&(usize, Tensor)> = buckets.iter().flatten().map(|&j| &reversed[j]).collect();
        let raws: Vec<ffi::RawTensor> = ordered.iter().map(|(_, p)| raw_tensor(p)).collect();
        let ids: Vec<i64> = ordered.iter().map(|(i, _)| *i as i64).collect();
        let ends: Vec<usize> = buckets
            .iter()
            .scan(0, |end, bucket| {
                *end += bucket.len();
                Some(*end)
            })
            .collect();
        let mut raw = std::ptr::null_mut();
        // SAFETY: the arrays are live for the call and have the lengths passed; the shim copies what it keeps.
        let message = unsafe {
            ffi::vovdet_reducer_new(
                pg.raw.as_ptr(),
                raws.as_ptr(),
                ids.as_ptr(),
                raws.len(),
                ends.as_ptr(),
                ends.len(),
                c_int::from(compression == GradCompression::Fp16),
                millis(pg.timeout()),
                &mut raw,
            )
        };
        if let Some(message) = ffi::take_message(message) {
            return Err(pg.invalid(OP, message));
        }
        let raw = NonNull::new(raw).ok_or_else(|| pg.invalid(OP, "the shim returned no reducer".into()))?;
        Ok(GradReducer {
            raw,
            rank: pg.rank(),
            timeout: pg.timeout(),
            params: ids.len(),
            buckets: buckets.len(),
            launched_in_backward: AtomicUsize::new(0),
        })
    }

    /// Makes the next backward launch bucket all-reduces as gradients become ready. Call it before the backward
    /// of a step's last micro-batch only; arming twice is harmless. Fails if a previous armed backward was not
    /// [finished](GradReducer::finish).
    pub fn arm(&self) -> Result<(), DistError> {
        // SAFETY: the reducer is live.
        let message = unsafe { ffi::vovdet_reducer_arm(self.raw.as_ptr()) };
        match ffi::take_message(message) {
            None => Ok(()),
            Some(reason) => Err(DistError::InvalidArgument { rank: self.rank, op: "GradReducer::arm", reason }),
        }
    }

    /// Completes the step after the armed backward: launches the buckets not launched yet, checks that every
    /// parameter has a gradient on all ranks or on none, waits (within the group's timeout), and writes the
    /// averaged gradients back. Always disarms. Without [`arm`](GradReducer::arm) it reduces everything here,
    /// with no overlap. On error the gradients are left unaveraged and the ranks' collectives may be out of step:
    /// stop training.
    pub fn finish(&self) -> Result<(), DistError> {
        const OP: &str = "GradReducer::finish";
        if self.params == 0 {
            return Ok(());
        }
        let mut kind: c_int = 0;
        let mut launched = 0usize;
        let start = Instant::now();
        // SAFETY: the reducer is live; the shim writes both outputs before returning.
        let message = unsafe { ffi::vovdet_reducer_finish(self.raw.as_ptr(), &mut kind, &mut launched) };
        self.launched_in_backward.store(launched, Ordering::Relaxed);
        match ffi::take_message(message) {
            None => Ok(()),
            Some(reason) if kind == 1 => Err(DistError::InvalidArgument { rank: self.rank, op: OP, reason }),
            Some(message) => Err(collective_failure(self.rank, self.timeout, OP, start, message)),
        }
    }

    /// Number of buckets, i.e. of gradient all-reduces per step.
    pub fn bucket_count(&self) -> usize {
        self.buckets
    }

    /// How many buckets the last [`finish`](GradReducer::finish)ed step launched from inside backward (the
    /// others were launched by `finish`): a measure of the overlap obtained.
    pub fn launched_in_backward(&self) -> usize {
        self.launched_in_backward.load(Ordering::Relaxed)
    }
}

/// Verifies that every rank planned the same buckets (same parameter indices, sizes and bucket boundaries).
fn check_same_plan(
    pg: &ProcessGroup,
    op: &'static str,
    params: &[(usize, Tensor)],
    buckets: &[Vec<usize>],
) -> Result<(), DistError> {
    let mix = |acc: i64, value: i64| acc.wrapping_mul(1_000_003).wrapping_add(value);
    let mut fingerprint = 0i64;
    for bucket in buckets {
        fingerprint = mix(fingerprint, -1);
        for &j in bucket {
            let (i, p) = &params[j];
            fingerprint = mix(mix(fingerprint, *i as i64), (p.numel() * p.kind().elt_size_in_bytes()) as i64);
        }
    }
    let record = [params.len() as i64, buckets.len() as i64, fingerprint];
    if let Some((peer, peer_record)) = first_different_record(pg, op, &record, "bucket plan")? {
        return Err(pg.invalid(
            op,
            format!(
                "this rank planned {} parameters in {} buckets but rank {peer} planned {} in {} (or other sizes); \
                 every rank must pass the same parameters and bucket size",
                record[0], record[1], peer_record[0], peer_record[1]
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Backend, InitOptions};
    use tch::Device;
    use tch::Kind;

    /// A one-process Gloo group on a free loopback port.
    fn single_process_group() -> ProcessGroup {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        ProcessGroup::init(InitOptions {
            backend: Backend::Gloo,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            rank: 0,
            world_size: 1,
            local_rank: 0,
            timeout: Duration::from_secs(20),
        })
        .unwrap()
    }

    #[test]
    fn one_rank_keeps_local_gradients_and_dropping_removes_the_hooks() {
        let pg = single_process_group();
        let unused = Tensor::zeros([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let frozen = Tensor::ones([2], (Kind::Float, Device::Cpu));
        let weight = Tensor::zeros([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let params = [unused.shallow_clone(), frozen.shallow_clone(), weight.shallow_clone()];
        let x = Tensor::from_slice(&[0.1f32, -2.5, 3.0e-5]);
        let reducer = GradReducer::new(&pg, &params, 4, GradCompression::None).unwrap();
        // Reverse order: [weight] then [unused]; the unused parameter's bucket waits for finish.
        assert_eq!(reducer.bucket_count(), 2);
        reducer.arm().unwrap();
        (&weight * &x).sum(Kind::Float).backward();
        reducer.finish().unwrap();
        assert_eq!(reducer.launched_in_backward(), 1);
        assert!(weight.grad().equal(&x));
        assert!(!unused.grad().defined() && !frozen.grad().defined());

        drop(reducer);
        (&weight * &x).sum(Kind::Float).backward();
        assert!(weight.grad().equal(&(&x + &x)));

        let _ = weight.grad().zero_();
        let compressed = GradReducer::new(&pg, &params, 1 << 20, GradCompression::Fp16).unwrap();
        compressed.arm().unwrap();
        (&weight * &x).sum(Kind::Float).backward();
        compressed.finish().unwrap();
        assert!(weight.grad().equal(&x.to_kind(Kind::Half).to_kind(Kind::Float)));
        assert!(!weight.grad().equal(&x), "3e-5 is not a float16 value");
    }
}
