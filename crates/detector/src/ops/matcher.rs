//! detectron2's `Matcher`: assigns each prediction to its best ground-truth box and labels it by IoU thresholds.

use tch::{Kind, Tensor};
use thiserror::Error;

/// Invalid matcher configuration.
#[derive(Debug, Error, PartialEq)]
pub enum MatcherError {
    /// Thresholds must be non-decreasing.
    #[error("matcher thresholds must be non-decreasing, got {0:?}")]
    UnsortedThresholds(Vec<f64>),
    /// There must be exactly one more label than thresholds.
    #[error("matcher needs {expected} labels for {thresholds} thresholds, got {got}")]
    LabelCount { thresholds: usize, expected: usize, got: usize },
    /// Labels must be -1 (ignore), 0 (background) or 1 (foreground).
    #[error("matcher labels must be -1, 0 or 1, got {0}")]
    InvalidLabel(i64),
}

/// Matches predictions (anchors or proposals) to ground truth. With thresholds `[t1, .., tn]` and labels
/// `[l0, .., ln]`, a prediction whose best IoU lies in `[t_i, t_{i+1})` gets label `l_i` (with `t_0 = -inf`,
/// `t_{n+1} = +inf`), e.g. thresholds `[0.3, 0.7]`, labels `[0, -1, 1]` for the RPN.
#[derive(Debug, Clone, PartialEq)]
pub struct Matcher {
    thresholds: Vec<f64>,
    labels: Vec<i64>,
    allow_low_quality_matches: bool,
}

impl Matcher {
    /// Validates and builds a matcher. `allow_low_quality_matches` also labels foreground every prediction that
    /// ties for the highest IoU with some ground-truth box (detectron2 `set_low_quality_matches_`).
    pub fn new(thresholds: Vec<f64>, labels: Vec<i64>, allow_low_quality_matches: bool) -> Result<Self, MatcherError> {
        if thresholds.windows(2).any(|w| w[0] > w[1]) || thresholds.iter().any(|t| t.is_nan()) {
            return Err(MatcherError::UnsortedThresholds(thresholds));
        }
        if labels.len() != thresholds.len() + 1 {
            return Err(MatcherError::LabelCount {
                thresholds: thresholds.len(),
                expected: thresholds.len() + 1,
                got: labels.len(),
            });
        }
        if let Some(&bad) = labels.iter().find(|l| !(-1..=1).contains(*l)) {
            return Err(MatcherError::InvalidLabel(bad));
        }
        Ok(Matcher { thresholds, labels, allow_low_quality_matches })
    }

    /// For an IoU matrix `[G, P]` (ground truth x predictions) returns `(matched_idx [P] i64, labels [P] i64)`:
    /// the best ground truth of each prediction and its label in {-1, 0, 1}. With no ground truth (or no
    /// predictions) every index is 0 and every label is the first label (background in the usual configs).
    pub fn match_quality(&self, iou: &Tensor) -> (Tensor, Tensor) {
        self.match_valid(iou, None)
    }

    /// [`Matcher::match_quality`] over the ground-truth rows marked in `valid_gt` `[G]` (bool) only: padding rows
    /// match nothing and make no low-quality matches, so the result is that of the valid rows alone (with every
    /// row invalid, that of no ground truth).
    pub fn match_valid(&self, iou: &Tensor, valid_gt: Option<&Tensor>) -> (Tensor, Tensor) {
        let device = iou.device();
        let num_predictions = iou.size()[1];
        if iou.numel() == 0 {
            return (
                Tensor::zeros([num_predictions], (Kind::Int64, device)),
                Tensor::full([num_predictions], self.labels[0], (Kind::Int64, device)),
            );
        }
        // IoU is never negative: -1 rows are below every threshold.
        let iou = match valid_gt {
            Some(valid) => iou.masked_fill(&valid.logical_not().unsqueeze(1), -1.0),
            None => iou.shallow_clone(),
        };
        let (matched_values, matched_idx) = iou.max_dim(0, false);
        let mut labels = Tensor::ones([num_predictions], (Kind::Int64, device));
        let mut bounds = vec![f64::NEG_INFINITY];
        bounds.extend(&self.thresholds);
        bounds.push(f64::INFINITY);
        for (label, range) in self.labels.iter().zip(bounds.windows(2)) {
            let in_range = matched_values.ge(range[0]).logical_and(&matched_values.lt(range[1]));
            labels = labels.masked_fill(&in_range, *label);
        }
        if self.allow_low_quality_matches {
            let (best_per_gt, _) = iou.max_dim(1, true);
            let mut is_best = iou.eq_tensor(&best_per_gt);
            if let Some(valid) = valid_gt {
                is_best = is_best.logical_and(&valid.unsqueeze(1));
            }
            labels = labels.masked_fill(&is_best.any_dim(0, false), 1);
        }
        (matched_idx, labels)
    }
}
