//! `trainer data check`: every problem of both splits in one run (annotation problems, missing, unreadable,
//! truncated, corrupt and wrongly sized image files), with a summary of what was loaded.

use std::fmt;

use rayon::prelude::*;

use crate::coco::{CocoDataset, ImageRecord, LoadOptions, LoadStats};
use crate::config::{DataConfig, MissingImagePolicy};
use crate::decode::decode_record;
use crate::error::DataError;

/// Reads an image's header and checks that its size equals the JSON's; with `decode` the whole image is decoded,
/// which also finds truncated and corrupt files (see [`crate::decode`]).
pub fn verify_image_file(record: &ImageRecord, decode: bool) -> Result<(), DataError> {
    if decode {
        return decode_record(record).map(drop);
    }
    let fail = |message: String| DataError::ImageFile { file: record.file.clone(), image_id: record.image_id, message };
    let (width, height) =
        image::image_dimensions(&record.file).map_err(|e| fail(format!("cannot read image header: {e}")))?;
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

/// Checks one split: annotation problems in file order, then missing files, then the header (or, with
/// `decode_images`, the full decode) of every image that is there.
fn check_split(name: &str, config: &DataConfig, decode_images: bool, progress: bool) -> SplitReport {
    let split = if name == "train" { &config.train } else { &config.val };
    let mut report = SplitReport { split: name.into(), ..Default::default() };
    let options =
        LoadOptions { missing_images: MissingImagePolicy::Skip, ..LoadOptions::from_config(config, progress) };
    let (dataset, problems) = match CocoDataset::load_split_checked(split, name, options) {
        Ok(loaded) => loaded,
        Err(e) => {
            report.problems.push(e.to_string());
            return report;
        }
    };
    report.problems.extend(problems.iter().map(ToString::to_string));
    report.problems.extend(dataset.stats.skipped_missing_images.iter().map(|(file, image_id)| {
        DataError::ImageFile { file: file.clone(), image_id: *image_id, message: "image file is missing".into() }
            .to_string()
    }));
    let file_problems: Vec<String> = dataset
        .images
        .par_iter()
        .filter_map(|r| verify_image_file(r, decode_images).err().map(|e| e.to_string()))
        .collect();
    report.problems.extend(file_problems);
    let (per_class, crowd) = dataset.instance_counts();
    report.images = dataset.images.len();
    report.instances_per_class = dataset.categories.names().iter().cloned().zip(per_class).collect();
    report.crowd = crowd;
    report.stats = dataset.stats;
    report
}

/// `trainer data check`: loads and validates both splits, reads every image header (or decodes every image with
/// `decode_images`) and summarises. Every problem is collected, none is fatal; the caller decides the exit code
/// from [`CheckReport::problem_count`].
pub fn check(config: &DataConfig, decode_images: bool, progress: bool) -> CheckReport {
    CheckReport {
        splits: ["train", "val"].iter().map(|name| check_split(name, config, decode_images, progress)).collect(),
    }
}
