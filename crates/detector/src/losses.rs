//! Loss helpers shared by the RPN and the box head.

use tch::Tensor;

/// Summed smooth-L1 loss of `input - target` (detectron2 `smooth_l1_loss`): `|x| - beta / 2` above `beta`,
/// `x^2 / (2 beta)` below; `beta` under 1e-5 is the L1 loss.
pub fn smooth_l1_sum(input: &Tensor, target: &Tensor, beta: f64) -> Tensor {
    // fp16/bf16 predictions (under autocast) are compared in float32, as autocast runs torch's smooth_l1_loss.
    let kind = crate::ops::widened_kind(input.kind());
    let diff = (input.to_kind(kind) - target.to_kind(kind)).abs();
    if beta < 1e-5 {
        diff.sum(diff.kind())
    } else {
        let small = diff.lt(beta);
        let quadratic = diff.square() * (0.5 / beta);
        let linear = &diff - 0.5 * beta;
        quadratic.where_self(&small, &linear).sum(diff.kind())
    }
}

/// [`smooth_l1_sum`] over the rows of `input` and `target` `[R, 4]` where `keep` `[R, 1]` is true: the other rows
/// compare 0 with 0, so they add no loss and no gradient (and no infinities from their targets). The fixed-size
/// slots of the RPN and the box head use it for the foreground among them.
pub fn masked_smooth_l1_sum(input: &Tensor, target: &Tensor, keep: &Tensor, beta: f64) -> Tensor {
    smooth_l1_sum(&input.where_self(keep, &input.zeros_like()), &target.where_self(keep, &target.zeros_like()), beta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_l1_matches_its_definition() {
        let input = Tensor::from_slice(&[0.0f32, 0.05, 1.0, -2.0]);
        let target = Tensor::zeros([4], (tch::Kind::Float, tch::Device::Cpu));
        assert!((smooth_l1_sum(&input, &target, 0.0).double_value(&[]) - 3.05).abs() < 1e-6);
        // beta 0.1: 0.05 -> 0.0125, 1.0 -> 0.95, 2.0 -> 1.95.
        assert!((smooth_l1_sum(&input, &target, 0.1).double_value(&[]) - 2.9125).abs() < 1e-6);
    }
}
