//! Mapping detections from the batch's image size back to the original image: box rescaling and mask pasting,
//! in detectron2's (`detector_postprocess`) or torchvision's (`transform.postprocess`) way.

use tch::{Device, Kind, Tensor};

use crate::config::OutputStyle;
use crate::ops::{clip_boxes, nonempty, paste_masks};
use crate::roi_heads::BoxDetections;
use crate::structures::Detections;

/// Rescales `detections` (in an `input_size` image) to `output_size`, pastes the RoI mask probabilities
/// `masks` `[D, M, M]` at the output resolution and thresholds them.
pub fn postprocess(
    detections: BoxDetections,
    masks: Tensor,
    input_size: (i64, i64),
    output_size: (i64, i64),
    style: OutputStyle,
    mask_threshold: f64,
) -> Detections {
    let (in_h, in_w) = input_size;
    let (out_h, out_w) = output_size;
    match style {
        OutputStyle::Detectron2 => {
            let scale_x = out_w as f64 / in_w as f64;
            let scale_y = out_h as f64 / in_h as f64;
            let boxes = scale_boxes(&detections.boxes, scale_x, scale_y);
            let boxes = clip_boxes(&boxes, out_h, out_w);
            let keep = nonempty(&boxes, 0.0).nonzero().squeeze_dim(1);
            let boxes = boxes.index_select(0, &keep);
            let masks = masks.index_select(0, &keep);
            Detections {
                masks: paste_masks(&masks, &boxes, out_h, out_w, mask_threshold),
                boxes,
                scores: detections.scores.index_select(0, &keep),
                labels: detections.labels.index_select(0, &keep),
            }
        }
        OutputStyle::Torchvision => {
            // torchvision divides the sizes as float32 tensors.
            let ratio_w = (out_w as f32 / in_w as f32) as f64;
            let ratio_h = (out_h as f32 / in_h as f32) as f64;
            let boxes = scale_boxes(&detections.boxes, ratio_w, ratio_h);
            Detections {
                masks: paste_masks_torchvision(&masks, &boxes, out_h, out_w, mask_threshold),
                boxes,
                scores: detections.scores,
                labels: detections.labels,
            }
        }
    }
}

/// Multiplies x coordinates by `sx` and y coordinates by `sy`.
fn scale_boxes(boxes: &Tensor, sx: f64, sy: f64) -> Tensor {
    let scale = Tensor::from_slice(&[sx as f32, sy as f32, sx as f32, sy as f32]).to_device(boxes.device());
    boxes * scale.unsqueeze(0)
}

/// torchvision `paste_masks_in_image` (padding 1), thresholded: each `[M, M]` mask is zero-padded to `M + 2`, its
/// box grown by `(M + 2) / M` and truncated to integers, the mask resized bilinearly to the integer box
/// (`x2 - x1 + 1` wide) and copied into the image; pixels above `threshold` are foreground. Reads the boxes to
/// the host once; each mask is one resize on the device.
pub fn paste_masks_torchvision(masks: &Tensor, boxes: &Tensor, height: i64, width: i64, threshold: f64) -> Tensor {
    let device = masks.device();
    let count = masks.size()[0];
    let pasted = Tensor::zeros([count, height, width], (Kind::Bool, device));
    if count == 0 {
        return pasted;
    }
    let m = masks.size()[1];
    let padded = masks.to_kind(Kind::Float).constant_pad_nd([1, 1, 1, 1]);
    let scale = (m + 2) as f64 / m as f64;
    let boxes = boxes.to_kind(Kind::Float);
    let w_half = (boxes.select(1, 2) - boxes.select(1, 0)) * 0.5 * scale;
    let h_half = (boxes.select(1, 3) - boxes.select(1, 1)) * 0.5 * scale;
    let x_c = (boxes.select(1, 2) + boxes.select(1, 0)) * 0.5;
    let y_c = (boxes.select(1, 3) + boxes.select(1, 1)) * 0.5;
    let expanded = Tensor::stack(&[&x_c - &w_half, &y_c - &h_half, &x_c + &w_half, &y_c + &h_half], 1);
    let integer = Vec::<i64>::try_from(expanded.to_kind(Kind::Int64).to_device(Device::Cpu).reshape([-1]))
        .expect("int64 host copy of the boxes");
    for (index, b) in integer.chunks_exact(4).enumerate() {
        let (bx0, by0, bx1, by1) = (b[0], b[1], b[2], b[3]);
        let box_w = (bx1 - bx0 + 1).max(1);
        let box_h = (by1 - by0 + 1).max(1);
        let x0 = bx0.max(0);
        let x1 = (bx1 + 1).min(width);
        let y0 = by0.max(0);
        let y1 = (by1 + 1).min(height);
        if x1 <= x0 || y1 <= y0 {
            continue;
        }
        let resized =
            padded.get(index as i64).view([1, 1, m + 2, m + 2]).upsample_bilinear2d([box_h, box_w], false, None, None);
        let region = resized.view([box_h, box_w]).narrow(0, y0 - by0, y1 - y0).narrow(1, x0 - bx0, x1 - x0);
        pasted.get(index as i64).narrow(0, y0, y1 - y0).narrow(1, x0, x1 - x0).copy_(&region.gt(threshold));
    }
    pasted
}
