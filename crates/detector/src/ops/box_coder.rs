//! Box regression coding with detectron2's `Box2BoxTransform` semantics (also torchvision's `BoxCoder`): widths are
//! `x2 - x1` (no `+1`), deltas are `(dx, dy, dw, dh)` divided by per-coordinate weights, and `dw`/`dh` are clamped
//! before `exp` when decoding so that a wild regression cannot overflow.

use tch::{Kind, Tensor};

/// Encodes target boxes relative to source boxes and decodes deltas back into boxes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoxCoder {
    /// Multipliers for `(dx, dy, dw, dh)`, e.g. `[1, 1, 1, 1]` for the RPN and `[10, 10, 5, 5]` for the box head.
    pub weights: [f64; 4],
    /// Upper bound applied to `dw` and `dh` (after dividing by the weights) before `exp` when decoding.
    pub scale_clamp: f64,
}

impl BoxCoder {
    /// A coder with the given weights and the usual `ln(1000 / 16)` clamp.
    pub fn new(weights: [f64; 4]) -> Self {
        BoxCoder { weights, scale_clamp: (1000.0f64 / 16.0).ln() }
    }

    /// Deltas `[N, 4]` that turn each `src` box `[N, 4]` into the matching `target` box `[N, 4]`.
    pub fn encode(&self, src: &Tensor, target: &Tensor) -> Tensor {
        let [wx, wy, ww, wh] = self.weights;
        let src_widths = src.select(1, 2) - src.select(1, 0);
        let src_heights = src.select(1, 3) - src.select(1, 1);
        let src_ctr_x = src.select(1, 0) + &src_widths * 0.5;
        let src_ctr_y = src.select(1, 1) + &src_heights * 0.5;
        let target_widths = target.select(1, 2) - target.select(1, 0);
        let target_heights = target.select(1, 3) - target.select(1, 1);
        let target_ctr_x = target.select(1, 0) + &target_widths * 0.5;
        let target_ctr_y = target.select(1, 1) + &target_heights * 0.5;
        let dx = (target_ctr_x - src_ctr_x) * wx / &src_widths;
        let dy = (target_ctr_y - src_ctr_y) * wy / &src_heights;
        let dw = (target_widths / src_widths).log() * ww;
        let dh = (target_heights / src_heights).log() * wh;
        Tensor::stack(&[dx, dy, dw, dh], 1)
    }

    /// Applies deltas `[N, 4 * k]` (k = 1 for class-agnostic, k = classes for class-specific regression) to boxes
    /// `[N, 4]` and returns boxes `[N, 4 * k]`. Decoding runs in float32 at least, like detectron2.
    pub fn decode(&self, deltas: &Tensor, boxes: &Tensor) -> Tensor {
        let [wx, wy, ww, wh] = self.weights;
        let deltas = if deltas.kind() == Kind::Double { deltas.shallow_clone() } else { deltas.to_kind(Kind::Float) };
        let boxes = boxes.to_kind(deltas.kind());
        let num_boxes = deltas.size()[0];
        let per_box = deltas.reshape([num_boxes, -1, 4]);
        let widths = (boxes.select(1, 2) - boxes.select(1, 0)).unsqueeze(1);
        let heights = (boxes.select(1, 3) - boxes.select(1, 1)).unsqueeze(1);
        let ctr_x = boxes.select(1, 0).unsqueeze(1) + &widths * 0.5;
        let ctr_y = boxes.select(1, 1).unsqueeze(1) + &heights * 0.5;
        let dx = per_box.select(2, 0) / wx;
        let dy = per_box.select(2, 1) / wy;
        let dw = (per_box.select(2, 2) / ww).clamp_max(self.scale_clamp);
        let dh = (per_box.select(2, 3) / wh).clamp_max(self.scale_clamp);
        let pred_ctr_x = dx * &widths + ctr_x;
        let pred_ctr_y = dy * &heights + ctr_y;
        let pred_w = dw.exp() * widths;
        let pred_h = dh.exp() * heights;
        let x1 = &pred_ctr_x - &pred_w * 0.5;
        let y1 = &pred_ctr_y - &pred_h * 0.5;
        let x2 = pred_ctr_x + pred_w * 0.5;
        let y2 = pred_ctr_y + pred_h * 0.5;
        Tensor::stack(&[x1, y1, x2, y2], 2).reshape(deltas.size())
    }
}
