//! COCO instances JSON: parsing, validation, the category map and concatenated datasets.
//!
//! Parsing uses our own `serde_json` types rather than `hotcoco`'s dataset: serde_json's errors carry line and
//! column, and a second validation pass over our records names the file and the annotation id of every semantic
//! problem (unknown image/category, short or odd polygon, RLE of the wrong size), which `hotcoco`'s loader does
//! not report. `hotcoco` still does all mask maths (RLE decoding, polygon rasterisation).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::config::{MissingImagePolicy, SplitConfig};
use crate::error::DataError;

/// An instance mask as stored in the dataset.
#[derive(Debug, Clone, PartialEq)]
pub enum Segmentation {
    /// One or more polygons, each a flat list `x0, y0, x1, y1, ...` in image pixels.
    Polygons(Vec<Vec<f64>>),
    /// A run-length encoded bitmap of the full image (column-major, pycocotools layout).
    Rle(hotcoco::Rle),
}

/// One validated annotation.
#[derive(Debug, Clone, PartialEq)]
pub struct Annotation {
    /// COCO annotation id.
    pub id: u64,
    /// COCO (sparse) category id.
    pub category_id: u64,
    /// Contiguous 0-based training label of the category.
    pub label: i64,
    /// Box `[x, y, w, h]` in original pixels (w, h > 0).
    pub bbox: [f64; 4],
    /// Crowd region (excluded from training targets).
    pub iscrowd: bool,
    /// Mask, when the annotation has one.
    pub segmentation: Option<Segmentation>,
}

/// One image with its annotations.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRecord {
    /// COCO image id.
    pub image_id: u64,
    /// Full path of the image file.
    pub file: PathBuf,
    /// Width from the JSON.
    pub width: u32,
    /// Height from the JSON.
    pub height: u32,
    /// Index of the source (annotation file) in a concatenated dataset.
    pub source: usize,
    /// Annotations (crowd included; training drops them from the targets).
    pub annotations: Vec<Annotation>,
}

impl ImageRecord {
    /// True when at least one non-crowd annotation can become a training target.
    pub fn has_training_instance(&self) -> bool {
        self.annotations.iter().any(|a| !a.iscrowd)
    }
}

/// COCO's sparse category ids mapped to contiguous labels `0..n` (sorted by id, as detectron2 does) and back.
#[derive(Debug, Clone, PartialEq)]
pub struct CategoryMap {
    ids: Vec<u64>,
    names: Vec<String>,
    labels: HashMap<u64, i64>,
}

impl CategoryMap {
    /// Builds the map from `(id, name)` pairs in any order.
    pub fn new(mut categories: Vec<(u64, String)>) -> Self {
        categories.sort_by_key(|(id, _)| *id);
        let labels = categories.iter().enumerate().map(|(label, (id, _))| (*id, label as i64)).collect();
        let (ids, names) = categories.into_iter().unzip();
        CategoryMap { ids, names, labels }
    }
    /// Number of classes.
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    /// True when there are no classes.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    /// Contiguous label of a COCO category id.
    pub fn label(&self, category_id: u64) -> Option<i64> {
        self.labels.get(&category_id).copied()
    }
    /// COCO category id of a contiguous label.
    pub fn category_id(&self, label: i64) -> Option<u64> {
        usize::try_from(label).ok().and_then(|l| self.ids.get(l).copied())
    }
    /// Name of a contiguous label.
    pub fn name(&self, label: i64) -> Option<&str> {
        usize::try_from(label).ok().and_then(|l| self.names.get(l).map(String::as_str))
    }
    /// COCO ids in label order.
    pub fn ids(&self) -> &[u64] {
        &self.ids
    }
    /// Names in label order.
    pub fn names(&self) -> &[String] {
        &self.names
    }
}

/// Counts of things dropped or noticed while loading (not errors).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadStats {
    /// Annotations dropped because their box had non-positive width or height.
    pub dropped_empty_boxes: usize,
    /// Images dropped by the `skip` policy because their file is missing: (file, image id).
    pub skipped_missing_images: Vec<(PathBuf, u64)>,
    /// Images dropped by [`CocoDataset::filter_for_training`] for having no non-crowd annotation.
    pub filtered_empty_images: usize,
}

/// A loaded (possibly concatenated) COCO dataset shared read-only by the loader workers.
#[derive(Debug, Clone)]
pub struct CocoDataset {
    /// Images in file order (concatenated sources in order).
    pub images: Vec<ImageRecord>,
    /// Category map (identical across concatenated sources).
    pub categories: CategoryMap,
    /// Annotation files, indexed by [`ImageRecord::source`].
    pub sources: Vec<PathBuf>,
    /// What was dropped while loading.
    pub stats: LoadStats,
}

/// Options for [`CocoDataset::load`].
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Missing image files: error or skip with a count.
    pub missing_images: MissingImagePolicy,
    /// Show a progress bar on stderr (only drawn when stderr is a terminal).
    pub progress: bool,
}

#[derive(Deserialize)]
struct RawCoco {
    images: Vec<RawImage>,
    #[serde(default)]
    annotations: Vec<RawAnnotation>,
    categories: Vec<RawCategory>,
}

#[derive(Deserialize)]
struct RawImage {
    id: u64,
    file_name: String,
    width: u32,
    height: u32,
}

#[derive(Deserialize)]
struct RawCategory {
    id: u64,
    name: String,
}

#[derive(Deserialize)]
struct RawAnnotation {
    id: u64,
    image_id: u64,
    category_id: u64,
    bbox: [f64; 4],
    #[serde(default)]
    iscrowd: u8,
    #[serde(default)]
    segmentation: Option<RawSegmentation>,
}

enum RawSegmentation {
    Polygons(Vec<Vec<f64>>),
    Rle { size: [u32; 2], counts: RawCounts },
}

enum RawCounts {
    Compressed(String),
    Uncompressed(Vec<u32>),
}

impl<'de> Deserialize<'de> for RawCounts {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CountsVisitor;
        impl<'de> Visitor<'de> for CountsVisitor {
            type Value = RawCounts;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("RLE counts as a string (compressed) or a list of integers (uncompressed)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawCounts, E> {
                Ok(RawCounts::Compressed(v.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawCounts, A::Error> {
                let mut counts = Vec::new();
                while let Some(c) = seq.next_element::<u32>()? {
                    counts.push(c);
                }
                Ok(RawCounts::Uncompressed(counts))
            }
        }
        deserializer.deserialize_any(CountsVisitor)
    }
}

impl<'de> Deserialize<'de> for RawSegmentation {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SegmentationVisitor;
        impl<'de> Visitor<'de> for SegmentationVisitor {
            type Value = RawSegmentation;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of polygons or an RLE object {\"size\": [h, w], \"counts\": ...}")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawSegmentation, A::Error> {
                let mut polygons = Vec::new();
                while let Some(p) = seq.next_element::<Vec<f64>>()? {
                    polygons.push(p);
                }
                Ok(RawSegmentation::Polygons(polygons))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawSegmentation, A::Error> {
                let mut size = None;
                let mut counts = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "size" => size = Some(map.next_value::<[u32; 2]>()?),
                        "counts" => counts = Some(map.next_value::<RawCounts>()?),
                        _ => {
                            map.next_value::<de::IgnoredAny>()?;
                        }
                    }
                }
                let size = size.ok_or_else(|| de::Error::missing_field("size"))?;
                let counts = counts.ok_or_else(|| de::Error::missing_field("counts"))?;
                Ok(RawSegmentation::Rle { size, counts })
            }
        }
        deserializer.deserialize_any(SegmentationVisitor)
    }
}

fn read_with_progress(path: &Path, progress: bool) -> Result<Vec<u8>, DataError> {
    let mut file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let len = file.metadata().map_err(|e| DataError::io(path, e))?.len();
    let bar = if progress {
        let bar = indicatif::ProgressBar::with_draw_target(Some(len), indicatif::ProgressDrawTarget::stderr());
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec}")
        {
            bar.set_style(style);
        }
        bar.set_message(format!("reading {}", path.display()));
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut bytes = Vec::with_capacity(len as usize);
    let mut chunk = vec![0u8; 8 << 20];
    loop {
        let n = file.read(&mut chunk).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&chunk[..n]);
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok(bytes)
}

fn parse_raw(path: &Path, bytes: &[u8], progress: bool) -> Result<RawCoco, DataError> {
    let spinner = if progress {
        let s = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
        if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}") {
            s.set_style(style);
        }
        s.set_message(format!("parsing {}", path.display()));
        s.enable_steady_tick(std::time::Duration::from_millis(200));
        s
    } else {
        indicatif::ProgressBar::hidden()
    };
    let parsed = serde_json::from_slice::<RawCoco>(bytes).map_err(|e| DataError::Json {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    });
    spinner.finish_and_clear();
    parsed
}

fn convert_segmentation(
    path: &Path,
    ann: &RawAnnotation,
    image: &RawImage,
    raw: &RawSegmentation,
) -> Result<Segmentation, DataError> {
    let err = |message: String| DataError::Annotation { path: path.to_path_buf(), annotation_id: ann.id, message };
    match raw {
        RawSegmentation::Polygons(parts) => {
            if parts.is_empty() {
                return Err(err("segmentation is an empty polygon list".into()));
            }
            for (i, part) in parts.iter().enumerate() {
                if part.len() % 2 != 0 {
                    return Err(err(format!("polygon part {i} has an odd number of coordinates ({})", part.len())));
                }
                if part.len() < 6 {
                    return Err(err(format!("polygon part {i} has {} points; at least 3 are needed", part.len() / 2)));
                }
                if part.iter().any(|v| !v.is_finite()) {
                    return Err(err(format!("polygon part {i} has a non-finite coordinate")));
                }
            }
            Ok(Segmentation::Polygons(parts.clone()))
        }
        RawSegmentation::Rle { size, counts } => {
            let [h, w] = *size;
            if (h, w) != (image.height, image.width) {
                return Err(err(format!(
                    "RLE size [{h}, {w}] differs from image id {} size [{}, {}]",
                    image.id, image.height, image.width
                )));
            }
            let rle = match counts {
                RawCounts::Compressed(s) => hotcoco::mask::rle_from_string(s, h, w),
                RawCounts::Uncompressed(c) => hotcoco::Rle::new(h, w, c.clone()),
            }
            .map_err(|e| err(format!("invalid RLE: {e}")))?;
            let total: u64 = rle.counts.iter().map(|&c| c as u64).sum();
            if total != h as u64 * w as u64 {
                return Err(err(format!("RLE counts sum to {total}, expected h*w = {}", h as u64 * w as u64)));
            }
            Ok(Segmentation::Rle(rle))
        }
    }
}

impl CocoDataset {
    /// Loads and validates one COCO instances file whose `file_name`s are relative to `image_root`.
    ///
    /// Boxes with non-positive size are dropped and counted; every other problem is an error naming the file and
    /// the annotation (or image) id. Image files are checked for existence per `options.missing_images`.
    pub fn load(annotations: &Path, image_root: &Path, options: LoadOptions) -> Result<CocoDataset, DataError> {
        let bytes = read_with_progress(annotations, options.progress)?;
        let raw = parse_raw(annotations, &bytes, options.progress)?;
        drop(bytes);
        Self::from_raw(annotations, image_root, raw, options.missing_images)
    }

    fn from_raw(
        path: &Path,
        image_root: &Path,
        raw: RawCoco,
        missing_images: MissingImagePolicy,
    ) -> Result<CocoDataset, DataError> {
        let mut seen_categories = HashSet::new();
        for c in &raw.categories {
            if !seen_categories.insert(c.id) {
                return Err(DataError::Categories {
                    path: path.to_path_buf(),
                    message: format!("duplicate category id {}", c.id),
                });
            }
        }
        if raw.categories.is_empty() {
            return Err(DataError::Categories { path: path.to_path_buf(), message: "no categories".into() });
        }
        let categories = CategoryMap::new(raw.categories.iter().map(|c| (c.id, c.name.clone())).collect());

        let mut index_of_image = HashMap::with_capacity(raw.images.len());
        for (i, image) in raw.images.iter().enumerate() {
            if image.width == 0 || image.height == 0 {
                return Err(DataError::ImageEntry {
                    path: path.to_path_buf(),
                    image_id: image.id,
                    message: format!("size {}x{} is empty", image.width, image.height),
                });
            }
            if index_of_image.insert(image.id, i).is_some() {
                return Err(DataError::ImageEntry {
                    path: path.to_path_buf(),
                    image_id: image.id,
                    message: "duplicate image id".into(),
                });
            }
        }

        let mut per_image: Vec<Vec<Annotation>> = vec![Vec::new(); raw.images.len()];
        let mut stats = LoadStats::default();
        let mut seen_annotations = HashSet::with_capacity(raw.annotations.len());
        for ann in &raw.annotations {
            let err =
                |message: String| DataError::Annotation { path: path.to_path_buf(), annotation_id: ann.id, message };
            if !seen_annotations.insert(ann.id) {
                return Err(err("duplicate annotation id".into()));
            }
            let Some(&image_index) = index_of_image.get(&ann.image_id) else {
                return Err(err(format!("unknown image id {}", ann.image_id)));
            };
            let Some(label) = categories.label(ann.category_id) else {
                return Err(err(format!("unknown category id {}", ann.category_id)));
            };
            if ann.bbox.iter().any(|v| !v.is_finite()) {
                return Err(err(format!("bbox {:?} has a non-finite value", ann.bbox)));
            }
            // Degenerate boxes are dropped before their masks are validated, so an annotation that is dropped
            // anyway cannot stop the load (COCO 2017 train has such slivers, e.g. annotation 918, cocoapi#355).
            if ann.bbox[2] <= 0.0 || ann.bbox[3] <= 0.0 {
                stats.dropped_empty_boxes += 1;
                continue;
            }
            let image = &raw.images[image_index];
            let segmentation =
                ann.segmentation.as_ref().map(|s| convert_segmentation(path, ann, image, s)).transpose()?;
            per_image[image_index].push(Annotation {
                id: ann.id,
                category_id: ann.category_id,
                label,
                bbox: ann.bbox,
                iscrowd: ann.iscrowd != 0,
                segmentation,
            });
        }

        let mut images = Vec::with_capacity(raw.images.len());
        for (image, annotations) in raw.images.into_iter().zip(per_image) {
            let file = image_root.join(&image.file_name);
            if !file.is_file() {
                match missing_images {
                    MissingImagePolicy::Error => {
                        return Err(DataError::ImageFile {
                            file,
                            image_id: image.id,
                            message: format!("image file is missing (listed in {})", path.display()),
                        })
                    }
                    MissingImagePolicy::Skip => {
                        stats.skipped_missing_images.push((file, image.id));
                        continue;
                    }
                }
            }
            images.push(ImageRecord {
                image_id: image.id,
                file,
                width: image.width,
                height: image.height,
                source: 0,
                annotations,
            });
        }
        Ok(CocoDataset { images, categories, sources: vec![path.to_path_buf()], stats })
    }

    /// Loads every (annotation file, image root) pair of a split and concatenates them.
    ///
    /// All sources must have the same categories (ids and names).
    pub fn load_split(split: &SplitConfig, name: &str, options: LoadOptions) -> Result<CocoDataset, DataError> {
        let mut merged: Option<CocoDataset> = None;
        for (annotations, images) in split.sources(name)? {
            let next = CocoDataset::load(&annotations, &images, options)?;
            merged = Some(match merged {
                None => next,
                Some(mut acc) => {
                    if acc.categories != next.categories {
                        return Err(DataError::Categories {
                            path: annotations,
                            message: format!(
                                "categories differ from those of {}; concatenated datasets must share them",
                                acc.sources[0].display()
                            ),
                        });
                    }
                    let source = acc.sources.len();
                    acc.images.extend(next.images.into_iter().map(|mut r| {
                        r.source = source;
                        r
                    }));
                    acc.sources.push(annotations);
                    acc.stats.dropped_empty_boxes += next.stats.dropped_empty_boxes;
                    acc.stats.skipped_missing_images.extend(next.stats.skipped_missing_images);
                    acc
                }
            });
        }
        merged.ok_or_else(|| DataError::Config(format!("data.{name} lists no dataset")))
    }

    /// Drops images without any non-crowd annotation (training only; evaluation keeps every image).
    pub fn filter_for_training(&mut self) {
        let before = self.images.len();
        self.images.retain(ImageRecord::has_training_instance);
        self.stats.filtered_empty_images += before - self.images.len();
    }

    /// Number of non-crowd instances per label and the number of crowd annotations.
    pub fn instance_counts(&self) -> (Vec<usize>, usize) {
        let mut per_class = vec![0usize; self.categories.len()];
        let mut crowd = 0;
        for ann in self.images.iter().flat_map(|r| &r.annotations) {
            if ann.iscrowd {
                crowd += 1;
            } else {
                per_class[ann.label as usize] += 1;
            }
        }
        (per_class, crowd)
    }
}

/// Reads an image's header and checks that its size equals the JSON's; with `decode` the whole image is decoded.
pub fn verify_image_file(record: &ImageRecord, decode: bool) -> Result<(), DataError> {
    let fail = |message: String| DataError::ImageFile { file: record.file.clone(), image_id: record.image_id, message };
    let (width, height) = if decode {
        let image = crate::transform::decode_rgb(&record.file).map_err(|e| fail(e.to_string()))?;
        (image.width, image.height)
    } else {
        image::image_dimensions(&record.file).map_err(|e| fail(format!("cannot read image header: {e}")))?
    };
    if (width, height) != (record.width, record.height) {
        return Err(fail(format!("file is {width}x{height} but the JSON says {}x{}", record.width, record.height)));
    }
    Ok(())
}

/// Summary of one split produced by [`check`].
#[derive(Debug, Clone, Default)]
pub struct SplitReport {
    /// `train` or `val`.
    pub split: String,
    /// Images loaded.
    pub images: usize,
    /// (category name, non-crowd instances) in label order.
    pub instances_per_class: Vec<(String, usize)>,
    /// Crowd annotations.
    pub crowd: usize,
    /// Counts of dropped items.
    pub stats: LoadStats,
    /// Every problem found, each naming the file and id.
    pub problems: Vec<String>,
}

/// Result of [`check`]: one report per split.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// Train then val.
    pub splits: Vec<SplitReport>,
}

impl CheckReport {
    /// Total number of problems over all splits.
    pub fn problem_count(&self) -> usize {
        self.splits.iter().map(|s| s.problems.len()).sum()
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in &self.splits {
            let instances: usize = s.instances_per_class.iter().map(|(_, n)| n).sum();
            writeln!(
                f,
                "[{}] images: {}  instances: {}  crowd: {}  dropped empty boxes: {}  skipped missing images: {}",
                s.split,
                s.images,
                instances,
                s.crowd,
                s.stats.dropped_empty_boxes,
                s.stats.skipped_missing_images.len()
            )?;
            for (name, n) in &s.instances_per_class {
                writeln!(f, "  {name:<24} {n}")?;
            }
            writeln!(f, "  problems: {}", s.problems.len())?;
            for p in &s.problems {
                writeln!(f, "  - {p}")?;
            }
        }
        Ok(())
    }
}

/// `trainer data check`: loads and validates both splits, reads every image header (or decodes every image with
/// `decode_images`) and summarises. Problems are collected, not fatal; the caller decides the exit code from
/// [`CheckReport::problem_count`].
pub fn check(config: &crate::config::DataConfig, decode_images: bool, progress: bool) -> CheckReport {
    let mut report = CheckReport::default();
    for (name, split) in [("train", &config.train), ("val", &config.val)] {
        let mut split_report = SplitReport { split: name.into(), ..Default::default() };
        let options = LoadOptions { missing_images: MissingImagePolicy::Skip, progress };
        match CocoDataset::load_split(split, name, options) {
            Err(e) => split_report.problems.push(e.to_string()),
            Ok(dataset) => {
                split_report.problems.extend(dataset.stats.skipped_missing_images.iter().map(|(file, image_id)| {
                    DataError::ImageFile {
                        file: file.clone(),
                        image_id: *image_id,
                        message: "image file is missing".into(),
                    }
                    .to_string()
                }));
                use rayon::prelude::*;
                let file_problems: Vec<String> = dataset
                    .images
                    .par_iter()
                    .filter_map(|r| verify_image_file(r, decode_images).err().map(|e| e.to_string()))
                    .collect();
                split_report.problems.extend(file_problems);
                let (per_class, crowd) = dataset.instance_counts();
                split_report.images = dataset.images.len();
                split_report.instances_per_class = dataset.categories.names().iter().cloned().zip(per_class).collect();
                split_report.crowd = crowd;
                split_report.stats = dataset.stats;
            }
        }
        report.splits.push(split_report);
    }
    report
}

/// Loads `data.train` for training: validation as in [`CocoDataset::load_split`], then (with `data.filter_empty`)
/// drops images without a non-crowd annotation.
pub fn load_train(config: &crate::config::DataConfig, progress: bool) -> Result<CocoDataset, DataError> {
    let options = LoadOptions { missing_images: config.missing_images, progress };
    let mut dataset = CocoDataset::load_split(&config.train, "train", options)?;
    if config.filter_empty {
        dataset.filter_for_training();
    }
    Ok(dataset)
}

/// Loads `data.val` for evaluation, keeping every image.
pub fn load_val(config: &crate::config::DataConfig, progress: bool) -> Result<CocoDataset, DataError> {
    let options = LoadOptions { missing_images: config.missing_images, progress };
    CocoDataset::load_split(&config.val, "val", options)
}
