//! COCO instances JSON: parsing, validation, the category map and concatenated datasets.
//!
//! Parsing uses our own `serde_json` types rather than `hotcoco`'s dataset: serde_json's errors carry line and
//! column, and a second validation pass over our records names the file and the annotation id of every semantic
//! problem (unknown image/category, short or odd polygon, RLE of the wrong size), which `hotcoco`'s loader does
//! not report. `hotcoco` still does all mask maths (RLE decoding, polygon rasterisation). The serde types and the
//! checks of single entries live in `coco_json`; [`mod@crate::check`] (in `check.rs`) backs `trainer data check`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

pub use crate::categories::{CategoryMap, LabelLayout};
pub use crate::coco_json::Segmentation;
use crate::coco_json::{check_bbox, convert_segmentation, escapes_root, parse_raw, read_with_progress, RawCoco};
use crate::config::{MissingImagePolicy, SplitConfig};
use crate::error::DataError;

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
    /// Accept `file_name`s outside the image root (absolute, or with `..`); see
    /// [`crate::config::DataConfig::allow_outside_image_root`].
    pub allow_outside_image_root: bool,
    /// How category ids become labels (the model's layout).
    pub labels: LabelLayout,
}

impl LoadOptions {
    /// The options the `[data]` section asks for.
    pub fn from_config(config: &crate::config::DataConfig, progress: bool) -> Self {
        LoadOptions {
            missing_images: config.missing_images,
            progress,
            allow_outside_image_root: config.allow_outside_image_root,
            labels: LabelLayout::Contiguous,
        }
    }
}

/// The dataset of a checked load when it found no problem, else the first problem (file order).
fn first_problem((dataset, problems): (CocoDataset, Vec<DataError>)) -> Result<CocoDataset, DataError> {
    match problems.into_iter().next() {
        Some(first) => Err(first),
        None => Ok(dataset),
    }
}

impl CocoDataset {
    /// Loads and validates one COCO instances file whose `file_name`s are relative to `image_root`.
    ///
    /// Boxes with non-positive size are dropped and counted; every other problem is an error naming the file and
    /// the annotation (or image) id (the first one in file order; [`CocoDataset::load_checked`] collects them
    /// all). Image files are checked for existence per `options.missing_images`.
    pub fn load(annotations: &Path, image_root: &Path, options: LoadOptions) -> Result<CocoDataset, DataError> {
        first_problem(Self::load_checked(annotations, image_root, options)?)
    }

    /// Like [`CocoDataset::load`], but every problem after parsing is collected instead of stopping at the
    /// first: the dataset returned leaves out the offending annotations and images. Only an unreadable or
    /// unparsable file is an error.
    pub fn load_checked(
        annotations: &Path,
        image_root: &Path,
        options: LoadOptions,
    ) -> Result<(CocoDataset, Vec<DataError>), DataError> {
        let bytes = read_with_progress(annotations, options.progress)?;
        let raw = parse_raw(annotations, &bytes, options.progress)?;
        drop(bytes);
        let mut problems = Vec::new();
        let dataset = Self::from_raw(annotations, image_root, raw, options, &mut problems);
        Ok((dataset, problems))
    }

    fn from_raw(
        path: &Path,
        image_root: &Path,
        raw: RawCoco,
        options: LoadOptions,
        problems: &mut Vec<DataError>,
    ) -> CocoDataset {
        let mut seen_categories = HashSet::new();
        for c in &raw.categories {
            if !seen_categories.insert(c.id) {
                problems.push(DataError::Categories {
                    path: path.to_path_buf(),
                    message: format!("duplicate category id {}", c.id),
                });
            }
        }
        if raw.categories.is_empty() {
            problems.push(DataError::Categories { path: path.to_path_buf(), message: "no categories".into() });
        }
        if options.labels == LabelLayout::CategoryId && raw.categories.iter().any(|c| c.id == 0) {
            problems.push(DataError::Categories {
                path: path.to_path_buf(),
                message: "category id 0 has no label when labels are category ids minus one".into(),
            });
        }
        let categories =
            CategoryMap::with_layout(raw.categories.iter().map(|c| (c.id, c.name.clone())).collect(), options.labels);

        // Images with a bad entry are left out; their annotations are dropped without further reports.
        let mut index_of_image = HashMap::with_capacity(raw.images.len());
        let mut bad_images = HashSet::new();
        for (i, image) in raw.images.iter().enumerate() {
            let entry_error =
                |message: String| DataError::ImageEntry { path: path.to_path_buf(), image_id: image.id, message };
            if index_of_image.contains_key(&image.id) {
                problems.push(entry_error("duplicate image id".into()));
                continue;
            }
            index_of_image.insert(image.id, i);
            if image.width == 0 || image.height == 0 {
                problems.push(entry_error(format!("size {}x{} is empty", image.width, image.height)));
                bad_images.insert(i);
            } else if let Some(why) = escapes_root(&image.file_name).filter(|_| !options.allow_outside_image_root) {
                problems.push(entry_error(format!(
                    "file_name {:?} {why}, outside the image folder {}; refusing to read it (set \
                     data.allow_outside_image_root = true if this dataset is trusted)",
                    image.file_name,
                    image_root.display()
                )));
                bad_images.insert(i);
            }
        }

        let mut per_image: Vec<Vec<Annotation>> = vec![Vec::new(); raw.images.len()];
        let mut stats = LoadStats::default();
        let mut seen_annotations = HashSet::with_capacity(raw.annotations.len());
        for ann in &raw.annotations {
            let err =
                |message: String| DataError::Annotation { path: path.to_path_buf(), annotation_id: ann.id, message };
            if !seen_annotations.insert(ann.id) {
                problems.push(err("duplicate annotation id".into()));
                continue;
            }
            let Some(&image_index) = index_of_image.get(&ann.image_id) else {
                problems.push(err(format!("unknown image id {}", ann.image_id)));
                continue;
            };
            if bad_images.contains(&image_index) {
                continue;
            }
            let Some(label) = categories.label(ann.category_id) else {
                problems.push(err(format!("unknown category id {}", ann.category_id)));
                continue;
            };
            let image = &raw.images[image_index];
            if let Err(message) = check_bbox(&ann.bbox, image) {
                problems.push(err(message));
                continue;
            }
            // Degenerate boxes are dropped before their masks are validated, so an annotation that is dropped
            // anyway cannot stop the load (COCO 2017 train has such slivers, e.g. annotation 918, cocoapi#355).
            if ann.bbox[2] <= 0.0 || ann.bbox[3] <= 0.0 {
                stats.dropped_empty_boxes += 1;
                continue;
            }
            let segmentation =
                match ann.segmentation.as_ref().map(|s| convert_segmentation(path, ann, image, s)).transpose() {
                    Ok(segmentation) => segmentation,
                    Err(problem) => {
                        problems.push(problem);
                        continue;
                    }
                };
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
        for (i, (image, annotations)) in raw.images.into_iter().zip(per_image).enumerate() {
            if bad_images.contains(&i) || index_of_image.get(&image.id) != Some(&i) {
                continue;
            }
            let file = image_root.join(&image.file_name);
            if !file.is_file() {
                match options.missing_images {
                    MissingImagePolicy::Error => problems.push(DataError::ImageFile {
                        file,
                        image_id: image.id,
                        message: format!("image file is missing (listed in {})", path.display()),
                    }),
                    MissingImagePolicy::Skip => stats.skipped_missing_images.push((file, image.id)),
                }
                continue;
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
        CocoDataset { images, categories, sources: vec![path.to_path_buf()], stats }
    }

    /// Loads every (annotation file, image root) pair of a split and concatenates them.
    ///
    /// All sources must have the same categories (ids and names). Fails with the first problem found.
    pub fn load_split(split: &SplitConfig, name: &str, options: LoadOptions) -> Result<CocoDataset, DataError> {
        first_problem(Self::load_split_checked(split, name, options)?)
    }

    /// [`CocoDataset::load_split`] collecting every problem (see [`CocoDataset::load_checked`]); a source whose
    /// categories differ from the first one's is a problem and left out. Errors only when no source can be read.
    pub fn load_split_checked(
        split: &SplitConfig,
        name: &str,
        options: LoadOptions,
    ) -> Result<(CocoDataset, Vec<DataError>), DataError> {
        let mut merged: Option<CocoDataset> = None;
        let mut problems = Vec::new();
        let mut unreadable = None;
        for (annotations, images) in split.sources(name)? {
            let next = match CocoDataset::load_checked(&annotations, &images, options) {
                Ok((next, found)) => {
                    problems.extend(found);
                    next
                }
                Err(error) => {
                    problems.push(error);
                    unreadable.get_or_insert(problems.len() - 1);
                    continue;
                }
            };
            let Some(acc) = &mut merged else {
                merged = Some(next);
                continue;
            };
            if acc.categories != next.categories {
                problems.push(DataError::Categories {
                    path: annotations,
                    message: format!(
                        "categories differ from those of {}; concatenated datasets must share them",
                        acc.sources[0].display()
                    ),
                });
                continue;
            }
            let source = acc.sources.len();
            acc.images.extend(next.images.into_iter().map(|mut r| {
                r.source = source;
                r
            }));
            acc.sources.push(annotations);
            acc.stats.dropped_empty_boxes += next.stats.dropped_empty_boxes;
            acc.stats.skipped_missing_images.extend(next.stats.skipped_missing_images);
        }
        match merged {
            Some(dataset) => Ok((dataset, problems)),
            None => Err(match unreadable {
                Some(index) => problems.swap_remove(index),
                None => DataError::Config(format!("data.{name} lists no dataset")),
            }),
        }
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
