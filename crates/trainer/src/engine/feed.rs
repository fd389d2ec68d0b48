//! The training batches, on the device one step ahead: a thread takes the loader's next batch and uploads its
//! images (on CUDA through pinned memory with a non-blocking copy, `data::batch::Batch::images_to_device`) while
//! the current step runs, so the step's host work includes neither waiting for the loader's queue nor the
//! copy into pinned memory; it holds at most one batch ahead. The sampler state and the skip count travel with
//! each batch, so a checkpoint records the position after the batches the steps consumed, not after the one
//! waiting.

use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;

use anyhow::Context;
use data::batch::Batch;
use data::loader::Loader;
use data::sampler::SamplerState;
use tch::Device;

use crate::panics;

/// One batch handed over by the feed thread, with the loader's bookkeeping after it.
struct Fed {
    /// The batch on the device; `None` when the loader has no more.
    batch: Option<anyhow::Result<Batch>>,
    sampler_state: Option<SamplerState>,
    skipped: usize,
}

/// Batches on the device one step ahead; see the module documentation.
pub struct DeviceFeed {
    batches: Option<Receiver<Fed>>,
    thread: Option<JoinHandle<()>>,
    sampler_state: Option<SamplerState>,
    skipped: usize,
}

impl DeviceFeed {
    /// Starts feeding `loader`'s batches to `device`.
    pub fn new(mut loader: Loader, device: Device) -> anyhow::Result<Self> {
        let (sampler_state, skipped) = (loader.sampler_state(), loader.skipped());
        let (sender, batches) = sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("vovdet-feed".into())
            .spawn(move || loop {
                let batch = loader.next().map(|batch| {
                    let batch = batch.context("the training loader")?;
                    panics::catch(|| batch.images_to_device(device)).context("uploading a training batch")
                });
                let last = !matches!(batch, Some(Ok(_)));
                let fed = Fed { batch, sampler_state: loader.sampler_state(), skipped: loader.skipped() };
                // The receiver is gone when the run ends; stop then, or after the last batch or an error.
                if sender.send(fed).is_err() || last {
                    break;
                }
            })
            .context("cannot start the training feed thread")?;
        Ok(DeviceFeed { batches: Some(batches), thread: Some(thread), sampler_state, skipped })
    }

    /// The next batch, its images on the device; waits for it when it is not ready.
    pub fn next_batch(&mut self) -> anyhow::Result<Batch> {
        let fed = self.batches.as_ref().and_then(|batches| batches.recv().ok());
        let fed = fed.context("the training feed stopped")?;
        self.sampler_state = fed.sampler_state.or(self.sampler_state);
        self.skipped = fed.skipped;
        fed.batch.context("the training loader stopped")?
    }

    /// The sampler state after the last batch returned by [`DeviceFeed::next_batch`] (for checkpoints).
    pub fn sampler_state(&self) -> Option<SamplerState> {
        self.sampler_state
    }

    /// Distinct images the loader had skipped when the last batch was returned.
    pub fn skipped(&self) -> usize {
        self.skipped
    }
}

impl Drop for DeviceFeed {
    fn drop(&mut self) {
        // Closing the channel stops the thread at its next hand-over.
        self.batches.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
