//! The balanced positive/negative sampler of the RPN and the RoI heads (detectron2 `subsample_labels`), built
//! with fixed shapes and no host read: every candidate gets a random 60-bit key, the positives kept are the
//! `num_samples * positive_fraction` largest keys among the positives, and one top-k over a tiered priority
//! (kept positives, then negatives, then the rest) fills `min(num_samples, N)` slots, positives first, each group
//! in candidate order.
//!
//! The distribution is detectron2's: a uniformly random subset of `min(P, num_samples * positive_fraction)`
//! positives and of `min(N_neg, num_samples - kept positives)` negatives (the first `m` of a uniformly random
//! order are a uniformly random `m`-subset). What differs is the shape: the sample is always
//! `min(num_samples, N)` slots, and the slots that hold no sample (too few candidates) are marked invalid instead
//! of being cut, so nothing here needs the candidate counts on the host.

use tch::{Kind, Tensor};

/// Keys are drawn in `[0, 2^60)`; the tiers add `2^60` (negatives) or `2^61` (kept positives), so every priority
/// fits in an i64 and orders by tier first.
const KEY_RANGE: i64 = 1 << 60;

/// A fixed-size balanced sample of one image's candidates.
#[derive(Debug)]
pub struct BalancedSample {
    /// `[S]` i64 candidate indices, `S = min(num_samples, N)`: the kept positives first, then the negatives, then
    /// (invalid slots) arbitrary other candidates, each group in candidate order.
    pub index: Tensor,
    /// `[S]` bool: the slot holds a sampled positive.
    pub positive: Tensor,
    /// `[S]` bool: the slot holds a sample (positive or negative).
    pub valid: Tensor,
}

impl BalancedSample {
    /// Number of slots.
    pub fn len(&self) -> i64 {
        self.index.size()[0]
    }

    /// Whether there are no slots (no candidates).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Samples at most `num_samples` entries of `labels` `[N]` (i64 on any device): at most
/// `floor(num_samples * positive_fraction)` positives (not -1 and not `bg_label`), the rest negatives (`bg_label`),
/// uniformly at random with the torch RNG, seeded with `seed` first when given (otherwise `tch::manual_seed`
/// beforehand makes it reproducible). The most positives a sample can hold is [`max_positives`], so the
/// positives always lie in the first `min(max_positives, S)` slots.
pub fn sample_balanced(
    labels: &Tensor,
    num_samples: i64,
    positive_fraction: f64,
    bg_label: i64,
    seed: Option<u64>,
) -> BalancedSample {
    if let Some(seed) = seed {
        tch::manual_seed(seed as i64);
    }
    let device = labels.device();
    let count = labels.size()[0];
    let keys = Tensor::randint_low(0, KEY_RANGE, [count], (Kind::Int64, device));
    let is_positive = labels.ne(-1).logical_and(&labels.ne(bg_label));
    let is_negative = labels.eq(bg_label);
    let positive_slots = max_positives(num_samples, positive_fraction).min(count);
    let kept_positive = if positive_slots > 0 {
        let (_, best) = keys.masked_fill(&is_positive.logical_not(), -1).topk(positive_slots, 0, true, false);
        Tensor::zeros([count], (Kind::Bool, device)).index_fill(0, &best, 1).logical_and(&is_positive)
    } else {
        Tensor::zeros([count], (Kind::Bool, device))
    };
    let tier = kept_positive.to_kind(Kind::Int64) * 2 + is_negative.to_kind(Kind::Int64);
    let (_, index) = (&keys + &tier * KEY_RANGE).topk(num_samples.min(count), 0, true, false);
    // Within a tier the slots follow the candidates' order, not the keys': what is summed over the sample (losses,
    // gradients) is summed in an order that does not depend on the random draw when the sample takes everything.
    let slot_tier = tier.index_select(0, &index);
    let order = (&slot_tier * (count + 1) + (count - &index)).argsort(0, true);
    let (index, slot_tier) = (index.index_select(0, &order), slot_tier.index_select(0, &order));
    BalancedSample { positive: slot_tier.eq(2), valid: slot_tier.ge(1), index }
}

/// The most positives a sample of `num_samples` holds: `floor(num_samples * positive_fraction)`, as detectron2.
pub fn max_positives(num_samples: i64, positive_fraction: f64) -> i64 {
    (num_samples as f64 * positive_fraction) as i64
}
