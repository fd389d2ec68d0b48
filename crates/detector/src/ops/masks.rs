//! Mask targets and mask pasting with detectron2's semantics: polygons cropped to a RoI and rasterised with the
//! pycocotools algorithm (`data::raster`), bitmasks cropped and resized with RoIAlign, and predicted RoI masks pasted
//! back into the image with bilinear sampling and a threshold.

use tch::{Kind, Tensor};

use super::roi_align::roi_align;

/// detectron2 `rasterize_polygons_within_box`: shifts the instance's polygons (flat `[x0, y0, x1, y1, ..]` image
/// coordinates) to the RoI `[x1, y1, x2, y2]`, rescales them to `size x size` (RoI sides below 0.1 px count as
/// 0.1), rasterises them with pycocotools' algorithm and merges them. Returns a float `[size, size]` mask of 0/1
/// on the CPU; `size` must be at most 65535.
pub fn polygons_to_roi_mask(polygons: &[Vec<f64>], roi: [f64; 4], size: i64) -> Tensor {
    let mut mask = vec![0u8; (size * size) as usize];
    rasterize_in_roi(polygons, roi, size, &mut mask);
    Tensor::from_slice(&mask).reshape([size, size]).to_kind(Kind::Float)
}

/// Writes the row-major `size x size` 0/1 mask of [`polygons_to_roi_mask`] into `out`.
fn rasterize_in_roi(polygons: &[Vec<f64>], roi: [f64; 4], size: i64, out: &mut [u8]) {
    let [x0, y0, x1, y1] = roi;
    let ratio_w = size as f64 / (x1 - x0).max(0.1);
    let ratio_h = size as f64 / (y1 - y0).max(0.1);
    let transformed: Vec<Vec<f64>> = polygons
        .iter()
        .map(|polygon| {
            polygon.chunks_exact(2).flat_map(|point| [(point[0] - x0) * ratio_w, (point[1] - y0) * ratio_h]).collect()
        })
        .collect();
    data::raster::rasterize_polygons_into(&transformed, size as usize, size as usize, out);
}

/// Rasterises an instance's polygons (flat `[x0, y0, x1, y1, ..]` image coordinates) over the whole image:
/// a `[height, width]` u8 0/1 mask on the CPU, pycocotools-exact (`data::raster`, which skips polygons of fewer than
/// three points). `height * width` must fit in a u32 (pycocotools' RLE counts are 32-bit).
pub fn polygons_to_bitmask(polygons: &[Vec<f64>], height: i64, width: i64) -> Tensor {
    let mask = data::raster::rasterize_polygons(polygons, height as usize, width as usize);
    Tensor::from_slice(&mask).reshape([height, width])
}

/// [`polygons_to_roi_mask`] for many instances at once: `polygons[i]` are the polygons of instance `i`, `rois`
/// is `[N, 4]`. Returns float `[N, size, size]` on `rois`' device: one host copy of the RoIs, all masks rasterised
/// into one host buffer, and one copy back (a fixed handful of tensor operations whatever N is).
pub fn polygons_to_roi_masks(polygons: &[Vec<Vec<f64>>], rois: &Tensor, size: i64) -> Tensor {
    let device = rois.device();
    if polygons.is_empty() {
        return Tensor::zeros([0, size, size], (Kind::Float, device));
    }
    let host = transfer::download_vec::<f64>(&rois.to_kind(Kind::Double)).expect("f64 host copy of the RoIs");
    let plane = (size * size) as usize;
    let mut masks = vec![0u8; polygons.len() * plane];
    for ((instance, roi), out) in polygons.iter().zip(host.chunks_exact(4)).zip(masks.chunks_exact_mut(plane)) {
        rasterize_in_roi(instance, [roi[0], roi[1], roi[2], roi[3]], size, out);
    }
    transfer::upload(&Tensor::from_slice(&masks).reshape([polygons.len() as i64, size, size]), device)
        .to_kind(Kind::Float)
}

/// detectron2 `BitMasks.crop_and_resize` for one mask: RoIAlign (aligned, adaptive sampling, scale 1) of the full
/// image bitmask `[H, W]` over `roi`, thresholded at 0.5. Float `[size, size]` of 0/1 on the mask's device.
pub fn bitmask_to_roi_mask(mask: &Tensor, roi: [f64; 4], size: i64) -> Tensor {
    let rois = transfer::upload(&Tensor::from_slice(&roi).reshape([1, 4]), mask.device());
    bitmasks_to_roi_masks(&mask.unsqueeze(0), &rois, size, 0).squeeze_dim(0)
}

/// [`bitmask_to_roi_mask`] for `masks` `[N, H, W]` and `rois` `[N, 4]` in one RoIAlign call: float
/// `[N, size, size]`. `sampling_ratio` 0 is detectron2's adaptive sampling (its sample counts are read on the
/// host); a fixed count keeps the work's shape and needs no host read.
pub fn bitmasks_to_roi_masks(masks: &Tensor, rois: &Tensor, size: i64, sampling_ratio: i64) -> Tensor {
    let device = masks.device();
    let count = masks.size()[0];
    let batch_index = Tensor::arange(count, (Kind::Float, device)).unsqueeze(1);
    let rois = Tensor::cat(&[batch_index, rois.to_device(device).to_kind(Kind::Float)], 1);
    let pooled = roi_align(&masks.to_kind(Kind::Float).unsqueeze(1), &rois, (size, size), 1.0, sampling_ratio, true);
    pooled.squeeze_dim(1).ge(0.5).to_kind(Kind::Float)
}

/// detectron2 `paste_masks_in_image`: pastes predicted RoI masks `[N, M, M]` or `[N, 1, M, M]` (probabilities) into `[N, height,
/// width]` boolean image masks, sampling each mask bilinearly (`grid_sample`, `align_corners = false`, zero
/// padding) at the image pixel centres and keeping values `>= threshold`. Like detectron2 on the CPU, each mask
/// is only evaluated over its box grown by one pixel (`floor(x1) - 1 .. ceil(x2) + 1`); that semantics is used on
/// every device. The boxes are copied to the host once to find those regions; the sampling stays on the device.
pub fn paste_masks(masks: &Tensor, boxes: &Tensor, height: i64, width: i64, threshold: f64) -> Tensor {
    let device = masks.device();
    let count = masks.size()[0];
    let pasted = Tensor::zeros([count, height, width], (Kind::Bool, device));
    if count == 0 {
        return pasted;
    }
    let masks = if masks.dim() == 4 { masks.squeeze_dim(1) } else { masks.shallow_clone() }.to_kind(Kind::Float);
    let host = transfer::download_vec::<f32>(&boxes.to_kind(Kind::Float)).expect("f32 host copy of the boxes");
    for (index, b) in host.chunks_exact(4).enumerate() {
        let (x0, y0, x1, y1) = (b[0], b[1], b[2], b[3]);
        let left = ((x0.floor() - 1.0).max(0.0)) as i64;
        let top = ((y0.floor() - 1.0).max(0.0)) as i64;
        let right = ((x1.ceil() + 1.0).min(width as f32)) as i64;
        let bottom = ((y1.ceil() + 1.0).min(height as f32)) as i64;
        if right <= left || bottom <= top {
            continue;
        }
        let options = (Kind::Float, device);
        let image_y =
            ((Tensor::arange_start(top, bottom, options) + 0.5) - f64::from(y0)) / f64::from(y1 - y0) * 2.0 - 1.0;
        let image_x =
            ((Tensor::arange_start(left, right, options) + 0.5) - f64::from(x0)) / f64::from(x1 - x0) * 2.0 - 1.0;
        let (rows, columns) = (bottom - top, right - left);
        let grid_x = image_x.unsqueeze(0).expand([rows, columns], false);
        let grid_y = image_y.unsqueeze(1).expand([rows, columns], false);
        let grid = Tensor::stack(&[grid_x, grid_y], 2).unsqueeze(0);
        let mask = masks.get(index as i64).unsqueeze(0).unsqueeze(0);
        let sampled = mask.grid_sampler_2d(&grid, 0, 0, false).squeeze_dim(0).squeeze_dim(0);
        let region = sampled.ge(threshold);
        pasted.get(index as i64).narrow(0, top, rows).narrow(1, left, columns).copy_(&region);
    }
    pasted
}

/// torchvision `paste_masks_in_image` (its Mask R-CNN post-processing), for the torchvision parity preset: each
/// mask `[M, M]` (or `[1, M, M]`) is padded by one zero pixel, its box grown by `(M + 2) / M` and truncated to
/// integers, the padded mask resized bilinearly (`align_corners = false`) to `(x2 - x1 + 1) x (y2 - y1 + 1)` and
/// copied into the image. Returns the probabilities, float `[N, height, width]` (threshold at 0.5 as
/// torchvision's users do). Boxes are expected inside the image (torchvision clips them first); a box that ends
/// up entirely outside pastes nothing. One host copy of the grown boxes gives the integer geometry.
pub fn paste_masks_torchvision(masks: &Tensor, boxes: &Tensor, height: i64, width: i64) -> Tensor {
    let device = masks.device();
    let count = masks.size()[0];
    let pasted = Tensor::zeros([count, height, width], (Kind::Float, device));
    if count == 0 {
        return pasted;
    }
    let masks = if masks.dim() == 4 { masks.squeeze_dim(1) } else { masks.shallow_clone() }.to_kind(Kind::Float);
    let side = masks.size()[2];
    let padded = masks.pad([1, 1, 1, 1], "constant", 0.0);
    let scale = (side + 2) as f64 / side as f64;
    let boxes = transfer::to_device(boxes, device).to_kind(Kind::Float);
    let half_w = (boxes.select(1, 2) - boxes.select(1, 0)) * 0.5 * scale;
    let half_h = (boxes.select(1, 3) - boxes.select(1, 1)) * 0.5 * scale;
    let centre_x = (boxes.select(1, 2) + boxes.select(1, 0)) * 0.5;
    let centre_y = (boxes.select(1, 3) + boxes.select(1, 1)) * 0.5;
    let grown = Tensor::stack(&[&centre_x - &half_w, &centre_y - &half_h, centre_x + half_w, centre_y + half_h], 1);
    let grown = transfer::download_vec::<i64>(&grown.to_kind(Kind::Int64)).expect("int64 host copy of the grown boxes");
    for (index, b) in grown.chunks_exact(4).enumerate() {
        let index = index as i64;
        let resized_w = (b[2] - b[0] + 1).max(1);
        let resized_h = (b[3] - b[1] + 1).max(1);
        let (left, right) = (b[0].max(0), (b[2] + 1).min(width));
        let (top, bottom) = (b[1].max(0), (b[3] + 1).min(height));
        if right <= left || bottom <= top {
            continue;
        }
        let resized =
            padded.get(index).unsqueeze(0).unsqueeze(0).upsample_bilinear2d([resized_h, resized_w], false, None, None);
        let visible = resized.get(0).get(0).narrow(0, top - b[1], bottom - top).narrow(1, left - b[0], right - left);
        pasted.get(index).narrow(0, top, bottom - top).narrow(1, left, right - left).copy_(&visible);
    }
    pasted
}
