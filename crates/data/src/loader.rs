//! The parallel loader: worker threads share one immutable dataset, each builds whole batches from a sampled list
//! of indices and per-sample seeds, and the consumer reorders finished batches so that the sequence is identical
//! for any number of workers. At most `prefetch` batches are in flight.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use crate::batch::{collate, Batch};
use crate::coco::CocoDataset;
use crate::config::{InputConfig, MissingImagePolicy, MAX_NUM_WORKERS};
use crate::error::DataError;
use crate::rng::Rng;
use crate::sample::load_sample;
use crate::sampler::{inference_batches, SampledBatch, SamplerState, TrainSampler};

/// Loader threading and failure policy.
#[derive(Debug, Clone, Copy)]
pub struct LoaderOptions {
    /// Worker threads; 0 builds batches in the calling thread.
    pub num_workers: usize,
    /// Batches prepared ahead (at least 1).
    pub prefetch: usize,
    /// A sample whose image is missing, does not decode or has the wrong size: error, or skip and count.
    pub missing_images: MissingImagePolicy,
}

impl LoaderOptions {
    /// Options from the `[data]` section.
    pub fn from_config(config: &crate::config::DataConfig) -> Self {
        LoaderOptions {
            num_workers: config.num_workers,
            prefetch: config.prefetch,
            missing_images: config.missing_images,
        }
    }
}

enum Plan {
    Train(TrainSampler),
    Inference(VecDeque<SampledBatch>),
}

impl Plan {
    fn next(&mut self) -> Option<(SampledBatch, Option<SamplerState>)> {
        match self {
            Plan::Train(sampler) => {
                let batch = sampler.next_batch();
                Some((batch, Some(sampler.state())))
            }
            Plan::Inference(batches) => batches.pop_front().map(|b| (b, None)),
        }
    }
}

struct Job {
    sequence: u64,
    batch: SampledBatch,
}

/// A sample dropped under the `skip` policy: its index in the dataset and why.
type Skipped = (usize, String);

struct Done {
    sequence: u64,
    result: Result<Option<Batch>, DataError>,
    skipped: Vec<Skipped>,
}

#[derive(Clone)]
struct Shared {
    dataset: Arc<CocoDataset>,
    input: InputConfig,
    train: bool,
    missing_images: MissingImagePolicy,
}

impl Shared {
    /// Loads and collates one batch; `None` when every sample was skipped.
    fn build(&self, batch: &SampledBatch) -> (Result<Option<Batch>, DataError>, Vec<Skipped>) {
        let mut samples = Vec::with_capacity(batch.indices.len());
        let mut seeds = Vec::with_capacity(batch.indices.len());
        let mut skipped = Vec::new();
        for (&index, &seed) in batch.indices.iter().zip(&batch.seeds) {
            let record = &self.dataset.images[index];
            match load_sample(record, &self.input, self.train, &mut Rng::new(seed)) {
                Ok(sample) => {
                    samples.push(sample);
                    seeds.push(seed);
                }
                Err(e @ DataError::ImageFile { .. }) if self.missing_images == MissingImagePolicy::Skip => {
                    skipped.push((index, e.to_string()));
                }
                Err(e) => return (Err(e), skipped),
            }
        }
        if samples.is_empty() {
            return (Ok(None), skipped);
        }
        let collated =
            collate(samples, &self.input, self.train).map(|batch| Some(Batch { sample_seeds: seeds, ..batch }));
        (collated, skipped)
    }
}

/// Iterator over batches; see the module documentation.
pub struct Loader {
    shared: Shared,
    plan: Plan,
    prefetch: usize,
    jobs: Option<Sender<Job>>,
    results: Option<Receiver<Done>>,
    workers: Vec<JoinHandle<()>>,
    next_sequence: u64,
    next_to_return: u64,
    pending_states: VecDeque<Option<SamplerState>>,
    finished: BTreeMap<u64, Done>,
    state_after_last: Option<SamplerState>,
    skipped: std::collections::HashSet<usize>,
}

impl Loader {
    /// Training loader drawing from `sampler` (restore the sampler's state first to resume).
    pub fn train(
        dataset: Arc<CocoDataset>,
        input: InputConfig,
        sampler: TrainSampler,
        options: LoaderOptions,
    ) -> Result<Loader, DataError> {
        let state = sampler.state();
        let mut loader = Loader::start(dataset, input, true, Plan::Train(sampler), options)?;
        loader.state_after_last = Some(state);
        Ok(loader)
    }

    /// Evaluation loader over this rank's contiguous shard, every image exactly once, in order.
    pub fn inference(
        dataset: Arc<CocoDataset>,
        input: InputConfig,
        batch_size: usize,
        rank: usize,
        world_size: usize,
        options: LoaderOptions,
    ) -> Result<Loader, DataError> {
        let batches = inference_batches(dataset.images.len(), rank, world_size, batch_size).into();
        Loader::start(dataset, input, false, Plan::Inference(batches), options)
    }

    fn start(
        dataset: Arc<CocoDataset>,
        input: InputConfig,
        train: bool,
        plan: Plan,
        options: LoaderOptions,
    ) -> Result<Loader, DataError> {
        input.validate()?;
        if options.num_workers > MAX_NUM_WORKERS {
            return Err(DataError::Config(format!(
                "data.num_workers = {} is more than {MAX_NUM_WORKERS}, the most loader threads allowed (batches do \
                 not depend on the worker count; a few per core is plenty)",
                options.num_workers
            )));
        }
        let shared = Shared { dataset, input, train, missing_images: options.missing_images };
        let mut loader = Loader {
            shared: shared.clone(),
            plan,
            prefetch: options.prefetch.max(1),
            jobs: None,
            results: None,
            workers: Vec::new(),
            next_sequence: 0,
            next_to_return: 0,
            pending_states: VecDeque::new(),
            finished: BTreeMap::new(),
            state_after_last: None,
            skipped: Default::default(),
        };
        if options.num_workers > 0 {
            let (job_tx, job_rx) = crossbeam_channel::unbounded::<Job>();
            let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done>();
            for worker in 0..options.num_workers {
                let (job_rx, done_tx, shared) = (job_rx.clone(), done_tx.clone(), shared.clone());
                let handle = std::thread::Builder::new()
                    .name(format!("data-worker-{worker}"))
                    .spawn(move || worker_loop(shared, job_rx, done_tx))
                    .map_err(|e| {
                        DataError::Loader(format!(
                            "cannot start loader worker thread {} of {} ({e}); lower data.num_workers",
                            worker + 1,
                            options.num_workers
                        ))
                    })?;
                loader.workers.push(handle);
            }
            loader.jobs = Some(job_tx);
            loader.results = Some(done_rx);
        }
        Ok(loader)
    }

    /// The sampler state after the last batch returned: save it with a checkpoint (training loaders only).
    pub fn sampler_state(&self) -> Option<SamplerState> {
        self.state_after_last
    }

    /// Distinct images skipped so far under the `skip` policy (each is warned about once, when first skipped).
    pub fn skipped(&self) -> usize {
        self.skipped.len()
    }

    fn note_skipped(&mut self, skipped: Vec<Skipped>) {
        for (index, why) in skipped {
            if self.skipped.insert(index) {
                log::warn!("skipping image (data.missing_images = \"skip\"): {why}");
            }
        }
    }

    fn dispatch(&mut self) -> Result<(), DataError> {
        let Some(jobs) = &self.jobs else { return Ok(()) };
        while self.pending_states.len() < self.prefetch {
            let Some((batch, state)) = self.plan.next() else { break };
            jobs.send(Job { sequence: self.next_sequence, batch })
                .map_err(|_| DataError::Loader("all workers stopped".into()))?;
            self.next_sequence += 1;
            self.pending_states.push_back(state);
        }
        Ok(())
    }

    fn next_parallel(&mut self) -> Option<Result<Batch, DataError>> {
        loop {
            if let Err(e) = self.dispatch() {
                return Some(Err(e));
            }
            let state = self.pending_states.front().copied()?;
            while !self.finished.contains_key(&self.next_to_return) {
                let results = self.results.as_ref()?;
                match results.recv() {
                    Ok(done) => {
                        self.finished.insert(done.sequence, done);
                    }
                    Err(_) => return Some(Err(DataError::Loader("all workers stopped".into()))),
                }
            }
            let done = self.finished.remove(&self.next_to_return)?;
            self.next_to_return += 1;
            self.pending_states.pop_front();
            self.note_skipped(done.skipped);
            self.state_after_last = state.or(self.state_after_last);
            match done.result {
                Ok(Some(batch)) => return Some(Ok(batch)),
                Ok(None) => continue,
                Err(e) => return Some(Err(e)),
            }
        }
    }

    fn next_inline(&mut self) -> Option<Result<Batch, DataError>> {
        loop {
            let (batch, state) = self.plan.next()?;
            let (result, skipped) = self.shared.build(&batch);
            self.note_skipped(skipped);
            self.state_after_last = state.or(self.state_after_last);
            match result {
                Ok(Some(batch)) => return Some(Ok(batch)),
                Ok(None) => continue,
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

fn worker_loop(shared: Shared, jobs: Receiver<Job>, done: Sender<Done>) {
    while let Ok(job) = jobs.recv() {
        let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shared.build(&job.batch)));
        let (result, skipped) = built.unwrap_or_else(|payload| {
            let images: Vec<String> =
                job.batch.indices.iter().map(|&i| shared.dataset.images[i].file.display().to_string()).collect();
            let message = format!(
                "worker panicked while building batch {} (images {}): {}",
                job.sequence,
                images.join(", "),
                panic_message(payload.as_ref())
            );
            (Err(DataError::Loader(message)), Vec::new())
        });
        if done.send(Done { sequence: job.sequence, result, skipped }).is_err() {
            return;
        }
    }
}

/// The text of a panic payload (`panic!` with a literal or a formatted message), or a placeholder.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a panic without a message)")
}

impl Iterator for Loader {
    type Item = Result<Batch, DataError>;
    /// The next batch in sampler order (training loaders never end).
    fn next(&mut self) -> Option<Self::Item> {
        if self.jobs.is_some() {
            self.next_parallel()
        } else {
            self.next_inline()
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.jobs = None;
        self.results = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}
