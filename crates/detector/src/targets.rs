//! Mask targets of the foreground RoIs: each RoI's ground-truth instance rasterised inside the RoI box at the
//! mask head's output size (polygons with `ops::polygons_to_roi_masks`, RLE bitmaps cropped and resized with
//! `ops::bitmasks_to_roi_masks`).

use tch::{Kind, Tensor};

use crate::ops::{bitmasks_to_roi_masks, polygons_to_roi_masks};
use crate::structures::GtMasks;
use crate::DetectorError;

/// `[F, size, size]` float32 targets on the RoIs' device for RoIs `boxes` `[F, 4]` matched to instances
/// `gt_index` `[F]`. Polygons read the indices and boxes to the host once; bitmaps stay on the device.
pub fn mask_targets(
    masks: &GtMasks,
    boxes: &Tensor,
    gt_index: &Tensor,
    size: i64,
    fixed_shapes: bool,
) -> Result<Tensor, DetectorError> {
    let device = boxes.device();
    if boxes.size()[0] == 0 {
        return Ok(Tensor::zeros([0, size, size], (Kind::Float, device)));
    }
    match masks {
        GtMasks::Polygons(polygons) => {
            let index = transfer::download_vec::<i64>(gt_index)
                .map_err(|e| DetectorError::Input(format!("mask targets: cannot read matched indices ({e})")))?;
            let selected =
                index.iter().map(|&gt| polygons.get(gt as usize).cloned()).collect::<Option<Vec<_>>>().ok_or_else(
                    || {
                        DetectorError::Input(format!(
                            "ground truth has {} polygon masks but more boxes; one mask per box is needed",
                            polygons.len()
                        ))
                    },
                )?;
            Ok(polygons_to_roi_masks(&selected, boxes, size))
        }
        GtMasks::Bitmaps(bitmaps) => {
            let bitmaps = transfer::to_device(bitmaps, device);
            // detectron2's adaptive sampling, or one sample per target pixel: a fixed shape and no host read.
            let sampling_ratio = if fixed_shapes { 1 } else { 0 };
            Ok(bitmasks_to_roi_masks(&bitmaps.index_select(0, gt_index), boxes, size, sampling_ratio))
        }
    }
}
