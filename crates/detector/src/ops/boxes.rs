//! Box utilities on float tensors `[N, 4]` in `(x1, y1, x2, y2)` pixel coordinates (detectron2 conventions:
//! width is `x2 - x1`, with no `+1`). Every function keeps its result on the input's device.

use tch::Tensor;

/// Area `(x2 - x1) * (y2 - y1)` of each box: `[N]` (or `[B, N]` for `[B, N, 4]`). Boxes with `x2 < x1` give a
/// negative area, as in torchvision.
pub fn box_area(boxes: &Tensor) -> Tensor {
    let widths = boxes.select(-1, 2) - boxes.select(-1, 0);
    let heights = boxes.select(-1, 3) - boxes.select(-1, 1);
    widths * heights
}

/// Pairwise intersection areas `[N, M]` of boxes `a` `[N, 4]` and `b` `[M, 4]` (or `[B, N, M]` for batches).
fn pairwise_intersection(a: &Tensor, b: &Tensor) -> Tensor {
    let a = a.unsqueeze(-2);
    let b = b.unsqueeze(-3);
    let top_left = a.narrow(-1, 0, 2).maximum(&b.narrow(-1, 0, 2));
    let bottom_right = a.narrow(-1, 2, 2).minimum(&b.narrow(-1, 2, 2));
    let sizes = (bottom_right - top_left).clamp_min(0.0);
    sizes.select(-1, 0) * sizes.select(-1, 1)
}

/// Pairwise intersection over union `[N, M]` (`[B, N, M]` for batches; torchvision's `box_iou` formula). Pairs whose
/// union is zero (both boxes empty) give 0 instead of torchvision's NaN, so the result can feed matchers and maxima
/// safely.
pub fn box_iou(a: &Tensor, b: &Tensor) -> Tensor {
    let intersection = pairwise_intersection(a, b);
    let union = box_area(a).unsqueeze(-1) + box_area(b).unsqueeze(-2) - &intersection;
    let positive_union = union.gt(0.0);
    let iou = &intersection / union.where_scalarother(&positive_union, 1.0);
    iou.where_scalarother(&positive_union, 0.0)
}

/// Pairwise intersection over the area of `a` ("intersection over area", `[N, M]`), used to ignore proposals that
/// lie inside crowd regions. Empty `a` boxes give 0.
pub fn box_ioa(a: &Tensor, b: &Tensor) -> Tensor {
    let intersection = pairwise_intersection(a, b);
    let area_a = box_area(a).unsqueeze(-1);
    let positive_area = area_a.gt(0.0);
    let ioa = &intersection / area_a.where_scalarother(&positive_area, 1.0);
    ioa.where_scalarother(&positive_area, 0.0)
}

/// Clamps x coordinates to `[0, width]` and y coordinates to `[0, height]` (detectron2 `Boxes.clip`).
pub fn clip_boxes(boxes: &Tensor, height: i64, width: i64) -> Tensor {
    let x1 = boxes.select(1, 0).clamp(0.0, width as f64);
    let y1 = boxes.select(1, 1).clamp(0.0, height as f64);
    let x2 = boxes.select(1, 2).clamp(0.0, width as f64);
    let y2 = boxes.select(1, 3).clamp(0.0, height as f64);
    Tensor::stack(&[x1, y1, x2, y2], 1)
}

/// Boolean mask `[N]` of boxes whose width and height both exceed `min_size` (detectron2 `Boxes.nonempty`).
pub fn nonempty(boxes: &Tensor, min_size: f64) -> Tensor {
    let widths = boxes.select(1, 2) - boxes.select(1, 0);
    let heights = boxes.select(1, 3) - boxes.select(1, 1);
    widths.gt(min_size).logical_and(&heights.gt(min_size))
}

/// Converts `(x1, y1, x2, y2)` boxes to COCO's `(x, y, width, height)`.
pub fn xyxy_to_xywh(boxes: &Tensor) -> Tensor {
    let top_left = boxes.narrow(1, 0, 2);
    let sizes = boxes.narrow(1, 2, 2) - &top_left;
    Tensor::cat(&[top_left, sizes], 1)
}

/// Converts COCO `(x, y, width, height)` boxes to `(x1, y1, x2, y2)`.
pub fn xywh_to_xyxy(boxes: &Tensor) -> Tensor {
    let top_left = boxes.narrow(1, 0, 2);
    let bottom_right = &top_left + boxes.narrow(1, 2, 2);
    Tensor::cat(&[top_left, bottom_right], 1)
}
