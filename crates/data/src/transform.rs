//! Geometric transforms (shorter-side resize, large-scale jitter, horizontal flip) applied identically to
//! pixels, boxes, polygons and RLE bitmaps, following detectron2's transform semantics.

use fast_image_resize as fr;

use crate::coco::{ImageRecord, Segmentation};
use crate::config::{InputConfig, ResizeStyle};
use crate::error::DataError;
use crate::rng::Rng;

pub use crate::decode::{decode_rgb, RgbImage};

/// Output (height, width) of a shorter-side resize to `short` with the longer side at most `max_size`, rounded as
/// `style` says: detectron2's `ResizeShortestEdge` (float64, rounded to the nearest integer) or torchvision's
/// `GeneralizedRCNNTransform` (a float32 scale factor, sizes floored).
pub fn shortest_edge_size(height: u32, width: u32, short: u32, max_size: u32, style: ResizeStyle) -> (u32, u32) {
    match style {
        ResizeStyle::Detectron2 => {
            let (h, w) = (height as f64, width as f64);
            let size = short as f64;
            let scale = size / h.min(w);
            let (mut new_h, mut new_w) = if h < w { (size, scale * w) } else { (scale * h, size) };
            if new_h.max(new_w) > max_size as f64 {
                let s = max_size as f64 / new_h.max(new_w);
                new_h *= s;
                new_w *= s;
            }
            (((new_h + 0.5) as u32).max(1), ((new_w + 0.5) as u32).max(1))
        }
        ResizeStyle::Torchvision => {
            let (h, w) = (height as f32, width as f32);
            // torchvision's scale is a float32 tensor and `interpolate` multiplies in float32 before flooring.
            let scale = (short as f32 / h.min(w)).min(max_size as f32 / h.max(w));
            (((h * scale).floor() as u32).max(1), ((w * scale).floor() as u32).max(1))
        }
    }
}

/// Output (height, width) of detectron2's `ResizeScale` (large-scale jitter) for a drawn scale.
pub fn resize_scale_size(height: u32, width: u32, target: u32, scale: f64) -> (u32, u32) {
    let target_scaled = target as f64 * scale;
    let output_scale = (target_scaled / height as f64).min(target_scaled / width as f64);
    (((height as f64 * output_scale).round() as u32).max(1), ((width as f64 * output_scale).round() as u32).max(1))
}

/// A crop rectangle in resized pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crop {
    /// Left edge.
    pub x0: u32,
    /// Top edge.
    pub y0: u32,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
}

/// The geometric transform of one sample: resize, then an optional crop, then an optional horizontal flip.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Geometry {
    /// Original (height, width).
    pub original: (u32, u32),
    /// (height, width) after the resize.
    pub resized: (u32, u32),
    /// Crop of the resized image (large-scale jitter).
    pub crop: Option<Crop>,
    /// Horizontal flip of the (cropped) image.
    pub flip: bool,
}

impl Geometry {
    /// Draws the training geometry (shorter-side choice or LSJ, then flip) from `rng`, as detectron2 does.
    pub fn train(input: &InputConfig, height: u32, width: u32, rng: &mut Rng) -> Geometry {
        let (resized, crop) = if input.lsj.enabled {
            let scale = rng.uniform(input.lsj.min_scale, input.lsj.max_scale);
            let resized = resize_scale_size(height, width, input.lsj.size, scale);
            let u = rng.uniform(0.0, 1.0);
            let max_y = resized.0.saturating_sub(input.lsj.size);
            let max_x = resized.1.saturating_sub(input.lsj.size);
            let crop = Crop {
                x0: (max_x as f64 * u).round() as u32,
                y0: (max_y as f64 * u).round() as u32,
                width: resized.1.min(input.lsj.size),
                height: resized.0.min(input.lsj.size),
            };
            (resized, Some(crop))
        } else {
            let short = input.min_size_train[rng.below(input.min_size_train.len() as u64) as usize];
            (shortest_edge_size(height, width, short, input.max_size_train, input.resize_style), None)
        };
        let flip = rng.uniform(0.0, 1.0) < input.flip_prob;
        Geometry { original: (height, width), resized, crop, flip }
    }

    /// The deterministic evaluation geometry (test size, no flip).
    pub fn test(input: &InputConfig, height: u32, width: u32) -> Geometry {
        let resized = shortest_edge_size(height, width, input.min_size_test, input.max_size_test, input.resize_style);
        Geometry { original: (height, width), resized, crop: None, flip: false }
    }

    /// (height, width) of the output image.
    pub fn output_size(&self) -> (u32, u32) {
        match self.crop {
            Some(c) => (c.height, c.width),
            None => self.resized,
        }
    }

    /// Resize factors (height, width): resized size over original size.
    pub fn scale(&self) -> (f64, f64) {
        (self.resized.0 as f64 / self.original.0 as f64, self.resized.1 as f64 / self.original.1 as f64)
    }

    fn map_xy(&self, x: f64, y: f64) -> (f64, f64) {
        let (sy, sx) = self.scale();
        let (mut x, mut y) = (x * sx, y * sy);
        if let Some(c) = self.crop {
            x -= c.x0 as f64;
            y -= c.y0 as f64;
        }
        if self.flip {
            x = self.output_size().1 as f64 - x;
        }
        (x, y)
    }

    /// Transforms a polygon (flat `x, y` list). After a crop the polygon keeps its vertices outside the window
    /// (rasterising at the output size clips it exactly as pycocotools does); a polygon with no area left inside
    /// the window gives `None`.
    pub fn map_polygon(&self, polygon: &[f64]) -> Option<Vec<f64>> {
        let mapped: Vec<f64> = polygon
            .chunks_exact(2)
            .flat_map(|p| {
                let (x, y) = self.map_xy(p[0], p[1]);
                [x, y]
            })
            .collect();
        if self.crop.is_some() && self.visible_bounds(&mapped).is_none() {
            return None;
        }
        Some(mapped)
    }

    /// Bounds `[x0, y0, x1, y1]` of the part of a mapped polygon inside the output image, `None` when that part
    /// has no area.
    pub fn visible_bounds(&self, mapped: &[f64]) -> Option<[f64; 4]> {
        let (h, w) = self.output_size();
        let points: Vec<(f64, f64)> = mapped.chunks_exact(2).map(|p| (p[0], p[1])).collect();
        let clipped = clip_to_rect(&points, w as f64, h as f64);
        let area = (0..clipped.len())
            .map(|i| {
                let (a, b) = (clipped[i], clipped[(i + 1) % clipped.len()]);
                a.0 * b.1 - b.0 * a.1
            })
            .sum::<f64>()
            .abs();
        if clipped.len() < 3 || area <= 0.0 {
            return None;
        }
        let first = [clipped[0].0, clipped[0].1, clipped[0].0, clipped[0].1];
        Some(clipped.iter().fold(first, |b, p| [b[0].min(p.0), b[1].min(p.1), b[2].max(p.0), b[3].max(p.1)]))
    }

    /// Transforms a box `[x0, y0, x1, y1]` and clips it to the output image.
    pub fn map_box(&self, b: [f64; 4]) -> [f64; 4] {
        let (xa, ya) = self.map_xy(b[0], b[1]);
        let (xb, yb) = self.map_xy(b[2], b[3]);
        let (h, w) = self.output_size();
        let clamp = |v: f64, hi: u32| v.clamp(0.0, hi as f64);
        [clamp(xa.min(xb), w), clamp(ya.min(yb), h), clamp(xa.max(xb), w), clamp(ya.max(yb), h)]
    }

    /// Transforms a full-image RLE into a row-major `[H, W]` bitmap of the output image (nearest-neighbour resize
    /// as PIL's `NEAREST`, which detectron2 uses for bitmasks).
    pub fn map_rle(&self, rle: &hotcoco::Rle) -> Vec<u8> {
        let column_major = hotcoco::mask::decode(rle);
        let (oh, ow) = (rle.h as usize, rle.w as usize);
        let (rh, rw) = (self.resized.0 as usize, self.resized.1 as usize);
        let (out_h, out_w) = (self.output_size().0 as usize, self.output_size().1 as usize);
        let (x0, y0) = self.crop.map_or((0, 0), |c| (c.x0 as usize, c.y0 as usize));
        let columns = nearest_sources(rw, ow);
        let rows = nearest_sources(rh, oh);
        let src_x: Vec<usize> = (0..out_w).map(|x| columns[if self.flip { out_w - 1 - x } else { x } + x0]).collect();
        let mut out = vec![0u8; out_h * out_w];
        for y in 0..out_h {
            let sy = rows[y + y0];
            let row = &mut out[y * out_w..(y + 1) * out_w];
            for (value, &sx) in row.iter_mut().zip(&src_x) {
                *value = column_major[sy + oh * sx];
            }
        }
        out
    }

    /// Resizes (bilinear with antialiasing, as PIL), crops and flips the pixels.
    pub fn apply_image(&self, image: &RgbImage) -> Result<RgbImage, DataError> {
        let resized = resize_rgb(image, self.resized.0, self.resized.1)?;
        let mut out = match self.crop {
            Some(c) => crop_rgb(&resized, c),
            None => resized,
        };
        if self.flip {
            flip_rgb(&mut out);
        }
        Ok(out)
    }
}

/// Source indices of PIL's nearest-neighbour resize (`ImagingScaleAffine`): a running sum that starts at half a
/// step, truncated, accumulated exactly as Pillow does so that rounding agrees.
fn nearest_sources(dst: usize, src: usize) -> Vec<usize> {
    let step = src as f64 / dst as f64;
    let mut position = step * 0.5;
    let mut table = Vec::with_capacity(dst);
    for _ in 0..dst {
        table.push((position as usize).min(src - 1));
        position += step;
    }
    table
}

/// Sutherland-Hodgman clipping of a (possibly non-convex) polygon to `[0, w] x [0, h]`. The result may contain
/// zero-area bridges along the rectangle edges, which add no pixel when rasterised.
pub fn clip_to_rect(points: &[(f64, f64)], w: f64, h: f64) -> Vec<(f64, f64)> {
    type Inside = fn(&(f64, f64), f64) -> bool;
    let edges: [(Inside, f64, bool); 4] = [
        (|p, v| p.0 >= v, 0.0, true),
        (|p, v| p.0 <= v, w, true),
        (|p, v| p.1 >= v, 0.0, false),
        (|p, v| p.1 <= v, h, false),
    ];
    let mut current = points.to_vec();
    for (inside, value, vertical) in edges {
        if current.is_empty() {
            break;
        }
        let input = std::mem::take(&mut current);
        for i in 0..input.len() {
            let a = input[(i + input.len() - 1) % input.len()];
            let b = input[i];
            let cross = |a: (f64, f64), b: (f64, f64)| {
                if vertical {
                    let t = (value - a.0) / (b.0 - a.0);
                    (value, a.1 + t * (b.1 - a.1))
                } else {
                    let t = (value - a.1) / (b.1 - a.1);
                    (a.0 + t * (b.0 - a.0), value)
                }
            };
            match (inside(&a, value), inside(&b, value)) {
                (true, true) => current.push(b),
                (true, false) => current.push(cross(a, b)),
                (false, true) => {
                    current.push(cross(a, b));
                    current.push(b);
                }
                (false, false) => {}
            }
        }
    }
    current
}

/// Bilinear resize with PIL-style antialiasing (fast_image_resize's convolution).
pub fn resize_rgb(image: &RgbImage, height: u32, width: u32) -> Result<RgbImage, DataError> {
    if (height, width) == (image.height, image.width) {
        return Ok(image.clone());
    }
    let fail = |message: String| DataError::Loader(format!("resize to {width}x{height}: {message}"));
    let src = fr::images::ImageRef::new(image.width, image.height, &image.data, fr::PixelType::U8x3)
        .map_err(|e| fail(e.to_string()))?;
    let mut dst = fr::images::Image::new(width, height, fr::PixelType::U8x3);
    let options = fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear));
    fr::Resizer::new().resize(&src, &mut dst, &options).map_err(|e| fail(e.to_string()))?;
    Ok(RgbImage { width, height, data: dst.into_vec() })
}

fn crop_rgb(image: &RgbImage, c: Crop) -> RgbImage {
    let mut data = Vec::with_capacity((c.width * c.height * 3) as usize);
    for y in c.y0..c.y0 + c.height {
        let start = ((y * image.width + c.x0) * 3) as usize;
        data.extend_from_slice(&image.data[start..start + (c.width * 3) as usize]);
    }
    RgbImage { width: c.width, height: c.height, data }
}

/// Mirrors an image left-right in place.
pub fn flip_rgb(image: &mut RgbImage) {
    let w = image.width as usize;
    for row in image.data.chunks_exact_mut(w * 3) {
        for x in 0..w / 2 {
            let (a, b) = (x * 3, (w - 1 - x) * 3);
            for c in 0..3 {
                row.swap(a + c, b + c);
            }
        }
    }
}

/// A training mask of one instance, in output pixels.
#[derive(Debug, Clone, PartialEq)]
pub enum InstanceMask {
    /// Polygon parts, flat `x, y` lists.
    Polygons(Vec<Vec<f64>>),
    /// Row-major `[height, width]` bitmap of the whole output image (0 or 1), for RLE annotations.
    Bitmap(Vec<u8>),
}

/// Targets of one sample before they become tensors.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SampleTargets {
    /// Boxes `[x0, y0, x1, y1]` in output pixels.
    pub boxes: Vec<[f32; 4]>,
    /// Contiguous labels.
    pub labels: Vec<i64>,
    /// One mask per box when the dataset has masks (else empty).
    pub masks: Vec<InstanceMask>,
    /// COCO annotation ids, one per box.
    pub annotation_ids: Vec<u64>,
}

fn bitmap_bounds(bitmap: &[u8], width: usize) -> Option<[f64; 4]> {
    let mut b: Option<[f64; 4]> = None;
    for (i, _) in bitmap.iter().enumerate().filter(|(_, v)| **v != 0) {
        let (x, y) = ((i % width) as f64, (i / width) as f64);
        b = Some(match b {
            None => [x, y, x + 1.0, y + 1.0],
            Some(b) => [b[0].min(x), b[1].min(y), b[2].max(x + 1.0), b[3].max(y + 1.0)],
        });
    }
    b
}

/// Transforms the non-crowd annotations of `record` with `geometry`. After a crop, boxes are recomputed from the
/// clipped masks (detectron2's `recompute_boxes`); instances whose box becomes empty are dropped.
pub fn transform_targets(record: &ImageRecord, geometry: &Geometry) -> SampleTargets {
    let mut targets = SampleTargets::default();
    let width = geometry.output_size().1 as usize;
    for ann in record.annotations.iter().filter(|a| !a.iscrowd) {
        let [x, y, w, h] = ann.bbox;
        let mut bbox = geometry.map_box([x, y, x + w, y + h]);
        let mask = match &ann.segmentation {
            None => None,
            Some(Segmentation::Polygons(parts)) => {
                let mapped: Vec<Vec<f64>> = parts.iter().filter_map(|p| geometry.map_polygon(p)).collect();
                if mapped.is_empty() {
                    continue;
                }
                if geometry.crop.is_some() {
                    let bounds = mapped.iter().filter_map(|p| geometry.visible_bounds(p));
                    bbox = bounds
                        .reduce(|a, b| [a[0].min(b[0]), a[1].min(b[1]), a[2].max(b[2]), a[3].max(b[3])])
                        .unwrap_or([0.0; 4]);
                }
                Some(InstanceMask::Polygons(mapped))
            }
            Some(Segmentation::Rle(rle)) => {
                let bitmap = geometry.map_rle(rle);
                if geometry.crop.is_some() {
                    match bitmap_bounds(&bitmap, width) {
                        Some(b) => bbox = b,
                        None => continue,
                    }
                }
                Some(InstanceMask::Bitmap(bitmap))
            }
        };
        if bbox[2] - bbox[0] <= 1e-5 || bbox[3] - bbox[1] <= 1e-5 {
            continue;
        }
        targets.boxes.push(bbox.map(|v| v as f32));
        targets.labels.push(ann.label);
        targets.annotation_ids.push(ann.id);
        if let Some(mask) = mask {
            targets.masks.push(mask);
        }
    }
    targets
}
