//! Mapping detections from the batch's image size back to the original image: box rescaling and mask pasting,
//! in detectron2's (`detector_postprocess`) or torchvision's (`transform.postprocess`) way.

use tch::Tensor;

use crate::config::OutputStyle;
use crate::ops::{clip_boxes, nonempty, paste_masks, paste_masks_torchvision};
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
                masks: paste_masks_torchvision(&masks, &boxes, out_h, out_w).gt(mask_threshold),
                boxes,
                scores: detections.scores,
                labels: detections.labels,
            }
        }
    }
}

/// Multiplies x coordinates by `sx` and y coordinates by `sy`.
fn scale_boxes(boxes: &Tensor, sx: f64, sy: f64) -> Tensor {
    let scale = transfer::upload(&Tensor::from_slice(&[sx as f32, sy as f32, sx as f32, sy as f32]), boxes.device());
    boxes * scale.unsqueeze(0)
}
