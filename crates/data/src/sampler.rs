//! Samplers: an infinite, sharded, aspect-ratio-grouped training sampler whose position is a three-number state
//! (resumable in O(1), no replay), and an inference sampler that covers every image exactly once across ranks.

use serde::{Deserialize, Serialize};

use crate::coco::CocoDataset;
use crate::error::DataError;
use crate::rng::{mix, Rng};

/// The training sampler's position; saving it in a checkpoint and restoring it resumes the exact batch sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    /// Base seed.
    pub seed: u64,
    /// Current epoch (a pass over this rank's shard).
    pub epoch: u64,
    /// Batches already produced in the current epoch.
    pub position: u64,
}

/// One batch drawn from a sampler: dataset indices and one augmentation seed per index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampledBatch {
    /// Indices into the dataset's images.
    pub indices: Vec<usize>,
    /// Per-sample seeds (augmentation, and the detector's RPN/RoI sampling), independent of the loader worker, the
    /// rank and the batch layout.
    pub seeds: Vec<u64>,
}

/// Infinite training sampler. Epoch `e` is a permutation of all images drawn from `(seed, e)`; rank `r` of `w`
/// takes every `w`-th element starting at `r` (disjoint shards); with grouping, landscape (`w > h`) and portrait
/// images fill separate batches, and the leftovers of both groups at the end of the epoch are batched together
/// (the final incomplete batch is dropped). Every epoch's batch list is a pure function of the state, so
/// restoring a [`SamplerState`] needs no replay.
#[derive(Debug, Clone)]
pub struct TrainSampler {
    landscape: Vec<bool>,
    batch_size: usize,
    rank: usize,
    world_size: usize,
    grouping: bool,
    state: SamplerState,
    epoch_batches: Vec<Vec<usize>>,
}

impl TrainSampler {
    /// A sampler at epoch 0, position 0. Errors when a rank's shard cannot fill one batch.
    pub fn new(
        dataset: &CocoDataset,
        batch_size: usize,
        rank: usize,
        world_size: usize,
        aspect_ratio_grouping: bool,
        seed: u64,
    ) -> Result<TrainSampler, DataError> {
        if batch_size == 0 || world_size == 0 || rank >= world_size {
            return Err(DataError::Loader(format!(
                "invalid sampler settings: batch size {batch_size}, rank {rank}, world size {world_size}"
            )));
        }
        let shard = dataset.images.len() / world_size;
        if shard < batch_size {
            let stats = &dataset.stats;
            let mut why = String::new();
            if stats.filtered_empty_images > 0 {
                why.push_str(&format!(
                    "; all other {} images were filtered out as empty by data.filter_empty (no non-crowd \
                     annotation; {} zero-size boxes were dropped while loading)",
                    stats.filtered_empty_images, stats.dropped_empty_boxes
                ));
            }
            if !stats.skipped_missing_images.is_empty() {
                why.push_str(&format!(
                    "; {} images were skipped as missing (data.missing_images = \"skip\")",
                    stats.skipped_missing_images.len()
                ));
            }
            return Err(DataError::Loader(format!(
                "{} images over {world_size} ranks cannot fill a batch of {batch_size}{why}",
                dataset.images.len()
            )));
        }
        let landscape = dataset.images.iter().map(|r| r.width > r.height).collect();
        let mut sampler = TrainSampler {
            landscape,
            batch_size,
            rank,
            world_size,
            grouping: aspect_ratio_grouping,
            state: SamplerState { seed, epoch: 0, position: 0 },
            epoch_batches: Vec::new(),
        };
        sampler.epoch_batches = sampler.batches_of_epoch(0);
        Ok(sampler)
    }

    /// The state after the batches drawn so far.
    pub fn state(&self) -> SamplerState {
        self.state
    }

    /// Moves to a saved state: the next batch is the one the uninterrupted run would have drawn.
    pub fn restore(&mut self, state: SamplerState) {
        let epoch_changed = state.epoch != self.state.epoch || state.seed != self.state.seed;
        self.state = state;
        if epoch_changed {
            self.epoch_batches = self.batches_of_epoch(state.epoch);
        }
    }

    /// All batches (dataset indices) this rank draws in `epoch`.
    pub fn batches_of_epoch(&self, epoch: u64) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.landscape.len()).collect();
        Rng::new(mix(&[self.state.seed, epoch])).shuffle(&mut order);
        // Every rank gets a shard of the same length, so all ranks draw the same number of batches per epoch and
        // stay in step; the few images past the last multiple of the world size wait for a later epoch.
        order.truncate(order.len() / self.world_size * self.world_size);
        let shard = order.into_iter().skip(self.rank).step_by(self.world_size);
        let mut batches = Vec::new();
        let mut groups: [Vec<usize>; 2] = [Vec::new(), Vec::new()];
        for index in shard {
            let group = if self.grouping { self.landscape[index] as usize } else { 0 };
            groups[group].push(index);
            if groups[group].len() == self.batch_size {
                batches.push(std::mem::take(&mut groups[group]));
            }
        }
        let leftovers: Vec<usize> = groups.concat();
        batches.extend(leftovers.chunks_exact(self.batch_size).map(<[usize]>::to_vec));
        batches
    }

    /// Draws the next batch, moving to the next epoch when this one is exhausted.
    pub fn next_batch(&mut self) -> SampledBatch {
        if self.state.position as usize >= self.epoch_batches.len() {
            self.state.epoch += 1;
            self.state.position = 0;
            self.epoch_batches = self.batches_of_epoch(self.state.epoch);
        }
        let indices = self.epoch_batches[self.state.position as usize].clone();
        // Keyed by (seed, epoch, image) alone: an image gets the same augmentation and detector sampling whichever
        // rank, batch slot or micro-batch it lands in, so N ranks x batch B train exactly like 1 rank x batch N*B.
        let seeds = indices.iter().map(|&index| mix(&[self.state.seed, self.state.epoch, index as u64])).collect();
        self.state.position += 1;
        SampledBatch { indices, seeds }
    }
}

/// The contiguous range of images rank `rank` of `world_size` evaluates (detectron2's `InferenceSampler`): the
/// ranges of all ranks partition `0..len` and differ in size by at most one image.
pub fn inference_shard(len: usize, rank: usize, world_size: usize) -> std::ops::Range<usize> {
    let world_size = world_size.max(1);
    let (base, extra) = (len / world_size, len % world_size);
    let begin = (rank * base + rank.min(extra)).min(len);
    let end = (begin + base + usize::from(rank < extra)).min(len);
    begin..end
}

/// Inference batches of one rank: its shard in order, in batches of `batch_size` (the last may be smaller).
pub fn inference_batches(len: usize, rank: usize, world_size: usize, batch_size: usize) -> Vec<SampledBatch> {
    let range: Vec<usize> = inference_shard(len, rank, world_size).collect();
    range.chunks(batch_size.max(1)).map(|c| SampledBatch { indices: c.to_vec(), seeds: vec![0; c.len()] }).collect()
}
