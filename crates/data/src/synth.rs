//! The built-in synthetic dataset (`trainer data synth`): coloured circles, triangles, squares and five-pointed stars
//! (the non-convex class) on noisy textured backgrounds, 1-8 instances per image, partially occluding each other.
//!
//! Shapes are drawn back to front by rasterising their polygons with `hotcoco` (pycocotools' rasteriser). The
//! visible part of each shape is its polygon minus the union of the shapes drawn over it, computed exactly with
//! `i_overlay`; placements that would leave a hole (not expressible as COCO polygons), a sliver, or less than 35%
//! of a shape visible are redrawn. Everything derives from the seed, so a seed gives byte-identical files.

use std::path::Path;

use i_overlay::core::fill_rule::FillRule;
use i_overlay::core::overlay_rule::OverlayRule;
use i_overlay::float::single::SingleFloatOverlay;
use rayon::prelude::*;
use serde::Serialize;

use crate::config::{OneOrMany, SplitConfig, SynthConfig};
use crate::error::DataError;
use crate::rng::{mix, Rng};

/// Class names in category-id order (ids 1..=4).
pub const CLASSES: [&str; 4] = ["circle", "triangle", "square", "star"];

/// Hue (degrees) around which each class is coloured, so that colour and shape both identify the class.
const CLASS_HUES: [f64; 4] = [0.0, 120.0, 220.0, 50.0];

/// Options of `trainer data synth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynthOptions {
    /// Training images.
    pub train: usize,
    /// Validation images.
    pub val: usize,
    /// Square image side in pixels (at least 32).
    pub size: u32,
    /// Seed.
    pub seed: u64,
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthSummary {
    /// Train split paths.
    pub train: SplitConfig,
    /// Val split paths.
    pub val: SplitConfig,
    /// Instances written per split (train, val).
    pub instances: (usize, usize),
}

/// The split paths of a synthetic dataset in `out`: `annotations/instances_{train,val}.json`, images in `{train,val}/`.
pub fn split_paths(out: &Path) -> (SplitConfig, SplitConfig) {
    let split = |name: &str| SplitConfig {
        annotations: OneOrMany::One(out.join("annotations").join(format!("instances_{name}.json"))),
        images: OneOrMany::One(out.join(name)),
    };
    (split("train"), split("val"))
}

/// Generates the dataset into `out` (created if needed; existing files are overwritten).
pub fn generate(out: &Path, options: &SynthOptions) -> Result<SynthSummary, DataError> {
    if options.size < 32 {
        return Err(DataError::Config(format!("synthetic image size {} is below 32 px", options.size)));
    }
    std::fs::create_dir_all(out.join("annotations")).map_err(|e| DataError::io(out, e))?;
    let mut instances = (0, 0);
    for (split, count, split_id) in [("train", options.train, 0u64), ("val", options.val, 1u64)] {
        let dir = out.join(split);
        std::fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
        let images: Vec<SynthImage> = (0..count)
            .into_par_iter()
            .map(|i| {
                let seed = mix(&[options.seed, split_id, i as u64]);
                let image = draw_image(options.size, seed);
                let file = dir.join(format!("{:06}.png", i + 1));
                image
                    .pixels
                    .save(&file)
                    .map_err(|e| DataError::Io { path: file.clone(), source: std::io::Error::other(e.to_string()) })?;
                Ok(image)
            })
            .collect::<Result<_, DataError>>()?;
        let json = coco_json(&images, options.size);
        let n: usize = json.annotations.len();
        if split_id == 0 {
            instances.0 = n;
        } else {
            instances.1 = n;
        }
        let path = out.join("annotations").join(format!("instances_{split}.json"));
        let text = serde_json::to_vec(&json).map_err(|e| DataError::io(&path, std::io::Error::other(e)))?;
        std::fs::write(&path, text).map_err(|e| DataError::io(&path, e))?;
    }
    let (train, val) = split_paths(out);
    Ok(SynthSummary { train, val, instances })
}

/// Generates the dataset of a `[data.synth]` section unless both annotation files already exist; returns whether
/// it generated.
pub fn ensure(config: &SynthConfig) -> Result<bool, DataError> {
    let (train, val) = split_paths(&config.out);
    let exists = |s: &SplitConfig| s.annotations.to_vec().iter().all(|p| p.is_file());
    if exists(&train) && exists(&val) {
        return Ok(false);
    }
    let options = SynthOptions { train: config.train, val: config.val, size: config.size, seed: config.seed };
    generate(&config.out, &options)?;
    Ok(true)
}

type Point = [f64; 2];

struct Instance {
    class: usize,
    outline: Vec<Point>,
    visible: Vec<Vec<Point>>,
}

struct SynthImage {
    pixels: image::RgbImage,
    instances: Vec<Instance>,
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn signed_area(points: &[Point]) -> f64 {
    let n = points.len();
    (0..n).map(|i| points[i][0] * points[(i + 1) % n][1] - points[(i + 1) % n][0] * points[i][1]).sum::<f64>() / 2.0
}

/// Counter-clockwise orientation (in the y-up sense) so that the non-zero fill rule unions overlapping outlines.
fn oriented(mut points: Vec<Point>) -> Vec<Point> {
    if signed_area(&points) < 0.0 {
        points.reverse();
    }
    points
}

fn outline(class: usize, cx: f64, cy: f64, size: f64, angle: f64) -> Vec<Point> {
    let r = size / 2.0;
    let polar = |k: usize, n: usize, radius: f64| {
        let a = angle + std::f64::consts::TAU * k as f64 / n as f64;
        [round2(cx + radius * a.cos()), round2(cy + radius * a.sin())]
    };
    let points = match class {
        0 => (0..32).map(|k| polar(k, 32, r)).collect(),
        1 => (0..3).map(|k| polar(k, 3, r)).collect(),
        2 => (0..4).map(|k| polar(k, 4, r)).collect(),
        _ => (0..10).map(|k| polar(k, 10, if k % 2 == 0 { r } else { r * 0.45 })).collect(),
    };
    oriented(points)
}

/// `outline` minus the union of `covers`: the visible pieces, or `None` when a piece has a hole.
fn visible_pieces(outline: &[Point], covers: &[Vec<Point>]) -> Option<Vec<Vec<Point>>> {
    if covers.is_empty() {
        return Some(vec![outline.to_vec()]);
    }
    let subject = vec![outline.to_vec()];
    let shapes = subject.overlay(&covers.to_vec(), OverlayRule::Difference, FillRule::NonZero);
    let mut pieces = Vec::new();
    for shape in shapes {
        if shape.len() != 1 {
            return None;
        }
        pieces.push(shape.into_iter().next()?.into_iter().map(|p| [round2(p[0]), round2(p[1])]).collect());
    }
    Some(pieces)
}

fn hsv_to_rgb(hue: f64, saturation: f64, value: f64) -> [f64; 3] {
    let h = hue.rem_euclid(360.0) / 60.0;
    let c = value * saturation;
    let x = c * (1.0 - (h % 2.0 - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = value - c;
    [(r + m) * 255.0, (g + m) * 255.0, (b + m) * 255.0]
}

fn background(size: u32, rng: &mut Rng) -> Vec<[f64; 3]> {
    let base = hsv_to_rgb(rng.uniform(0.0, 360.0), rng.uniform(0.0, 0.25), rng.uniform(0.25, 0.75));
    let gradient = [rng.uniform(-40.0, 40.0), rng.uniform(-40.0, 40.0)];
    let stripe_angle = rng.uniform(0.0, std::f64::consts::PI);
    let stripe_period = rng.uniform(6.0, 24.0);
    let stripe_amplitude = rng.uniform(0.0, 18.0);
    let noise = rng.uniform(4.0, 16.0);
    let n = size as f64;
    let mut pixels = Vec::with_capacity((size * size) as usize);
    for y in 0..size {
        for x in 0..size {
            let (u, v) = (x as f64 / n - 0.5, y as f64 / n - 0.5);
            let along = x as f64 * stripe_angle.cos() + y as f64 * stripe_angle.sin();
            let shade = gradient[0] * u
                + gradient[1] * v
                + stripe_amplitude * (std::f64::consts::TAU * along / stripe_period).sin();
            pixels.push(base.map(|c| c + shade + rng.uniform(-noise, noise)));
        }
    }
    pixels
}

fn draw_image(size: u32, seed: u64) -> SynthImage {
    let mut rng = Rng::new(seed);
    let mut canvas = background(size, &mut rng);
    let wanted = 1 + rng.below(8) as usize;
    let n = size as f64;
    let (min_size, max_size) = ((n * 0.12).max(12.0).min(n / 2.0), n / 2.0);
    let mut instances: Vec<Instance> = Vec::new();
    for _ in 0..wanted {
        for _attempt in 0..20 {
            let class = rng.below(4) as usize;
            let shape_size = rng.uniform(min_size, max_size);
            let margin = shape_size / 2.0;
            let (cx, cy) = (rng.uniform(margin, n - margin), rng.uniform(margin, n - margin));
            let candidate = outline(class, cx, cy, shape_size, rng.uniform(0.0, std::f64::consts::TAU));
            let mut updated = Vec::with_capacity(instances.len());
            let mut acceptable = true;
            for (k, inst) in instances.iter().enumerate() {
                let covers: Vec<Vec<Point>> = instances[k + 1..]
                    .iter()
                    .map(|o| o.outline.clone())
                    .chain(std::iter::once(candidate.clone()))
                    .collect();
                match visible_pieces(&inst.outline, &covers) {
                    Some(pieces)
                        if pieces.iter().all(|p| p.len() >= 3 && signed_area(p).abs() >= 20.0)
                            && pieces.iter().map(|p| signed_area(p).abs()).sum::<f64>()
                                >= 0.35 * signed_area(&inst.outline).abs() =>
                    {
                        updated.push(pieces)
                    }
                    _ => {
                        acceptable = false;
                        break;
                    }
                }
            }
            if !acceptable {
                continue;
            }
            for (inst, pieces) in instances.iter_mut().zip(updated) {
                inst.visible = pieces;
            }
            let visible = vec![candidate.clone()];
            instances.push(Instance { class, outline: candidate, visible });
            break;
        }
    }
    for inst in &instances {
        let color = hsv_to_rgb(
            CLASS_HUES[inst.class] + rng.uniform(-15.0, 15.0),
            rng.uniform(0.6, 1.0),
            rng.uniform(0.75, 1.0),
        );
        let flat: Vec<f64> = inst.outline.iter().flatten().copied().collect();
        let Ok(rle) = hotcoco::mask::fr_poly(&flat, size, size) else { continue };
        let mask = hotcoco::mask::decode(&rle);
        for x in 0..size as usize {
            for y in 0..size as usize {
                if mask[y + size as usize * x] != 0 {
                    canvas[y * size as usize + x] = color.map(|c| c + rng.uniform(-6.0, 6.0));
                }
            }
        }
    }
    let mut pixels = image::RgbImage::new(size, size);
    for (out, value) in pixels.pixels_mut().zip(&canvas) {
        *out = image::Rgb(value.map(|c| c.round().clamp(0.0, 255.0) as u8));
    }
    SynthImage { pixels, instances }
}

#[derive(Serialize)]
struct JsonImage {
    id: u64,
    file_name: String,
    width: u32,
    height: u32,
}

#[derive(Serialize)]
struct JsonCategory {
    id: u64,
    name: &'static str,
    supercategory: &'static str,
}

#[derive(Serialize)]
struct JsonAnnotation {
    id: u64,
    image_id: u64,
    category_id: u64,
    segmentation: Vec<Vec<f64>>,
    area: f64,
    bbox: [f64; 4],
    iscrowd: u8,
}

#[derive(Serialize)]
struct JsonCoco {
    images: Vec<JsonImage>,
    annotations: Vec<JsonAnnotation>,
    categories: Vec<JsonCategory>,
}

fn coco_json(images: &[SynthImage], size: u32) -> JsonCoco {
    let mut annotations = Vec::new();
    for (i, image) in images.iter().enumerate() {
        for inst in &image.instances {
            let segmentation: Vec<Vec<f64>> =
                inst.visible.iter().map(|p| p.iter().flatten().copied().collect()).collect();
            let area = hotcoco::mask::fr_polys(&segmentation, size, size).map_or(0, |rle| hotcoco::mask::area(&rle));
            let xs = segmentation.iter().flat_map(|p| p.iter().step_by(2));
            let ys = segmentation.iter().flat_map(|p| p.iter().skip(1).step_by(2));
            let (x0, x1) = xs.fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            let (y0, y1) = ys.fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            annotations.push(JsonAnnotation {
                id: annotations.len() as u64 + 1,
                image_id: i as u64 + 1,
                category_id: inst.class as u64 + 1,
                segmentation,
                area: area as f64,
                bbox: [round2(x0), round2(y0), round2(x1 - x0), round2(y1 - y0)],
                iscrowd: 0,
            });
        }
    }
    JsonCoco {
        images: (0..images.len())
            .map(|i| JsonImage { id: i as u64 + 1, file_name: format!("{:06}.png", i + 1), width: size, height: size })
            .collect(),
        annotations,
        categories: CLASSES
            .iter()
            .enumerate()
            .map(|(i, name)| JsonCategory { id: i as u64 + 1, name, supercategory: "shape" })
            .collect(),
    }
}
