//! `trainer predict`: runs a model on image files and writes one PNG per image with boxes, class names, scores
//! and translucent masks drawn, plus optional COCO results JSON.

use std::path::{Path, PathBuf};

use anyhow::Context;
use data::coco::CategoryMap;
use data::pixels::{pad, prepare_test};
use data::transform::{decode_rgb, RgbImage};
use detector::{ImageBatch, MaskRcnn};
use tch::Device;

use crate::coco_eval::{write_detections, CompressedRle, Detection};
use crate::config::Config;
use crate::evaluate::HostDetections;
use crate::events::encode_png;
use crate::layout::images_to_channels_last;
use crate::visualize::{draw, DrawnDetection};

/// Maps the model's labels to category ids and names.
#[derive(Debug, Clone)]
pub struct LabelNames {
    /// The validation split's categories in the model's label layout, when the config names that split.
    categories: Option<CategoryMap>,
}

impl LabelNames {
    /// From the validation annotations when the config names them (in the model's label layout); otherwise label
    /// `l` is category `l + 1` (torchvision's convention, which is the COCO id for torchvision's COCO models).
    pub fn for_config(config: &Config) -> anyhow::Result<LabelNames> {
        let has_val = config.data.as_ref().is_some_and(|d| !d.val.annotations.to_vec().is_empty());
        let categories =
            if has_val { Some(crate::datasets::load_split(config, "val", false)?.categories) } else { None };
        Ok(LabelNames { categories })
    }

    /// The category id of `label`: the dataset's when known (none for a label no category has, which only
    /// category-id labels allow, as evaluation leaves such detections out), otherwise `label + 1`.
    fn id(&self, label: i64) -> Option<u64> {
        match &self.categories {
            Some(categories) => categories.category_id(label),
            None => Some(label as u64 + 1),
        }
    }

    fn name(&self, label: i64) -> String {
        let name = self.categories.as_ref().and_then(|c| c.name(label));
        name.map_or_else(|| format!("class {}", label + 1), String::from)
    }
}

/// Image files under `input` (the file itself, or the JPEG/PNG files of a folder, sorted by name).
pub fn image_files(input: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if input.is_file() {
        return Ok(vec![input.to_path_buf()]);
    }
    let entries =
        std::fs::read_dir(input).with_context(|| format!("--input {}: no such file or folder", input.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
            matches!(ext.as_str(), "jpg" | "jpeg" | "png")
        })
        .collect();
    files.sort();
    anyhow::ensure!(!files.is_empty(), "--input {}: no .jpg or .png files", input.display());
    Ok(files)
}

/// The COCO image id of a file named by a number (`000000139.jpg` → 139).
pub fn image_id_from_name(path: &Path) -> Option<u64> {
    path.file_stem()?.to_str()?.parse().ok()
}

/// One input image of `trainer predict`: its id in the results and the picture drawn for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedImage {
    /// The input file.
    pub file: PathBuf,
    /// Its image id: the number of a numeric file name, otherwise one above every numeric id (in file order).
    pub image_id: u64,
    /// True when `image_id` is the file's own number.
    pub id_from_name: bool,
    /// Where its picture goes: `stem.png` in the output folder, or `file_name.png` when two inputs share a stem.
    pub picture: PathBuf,
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Ids and output names for `files` (from [`image_files`] of `input`), all unique, refusing any plan that would
/// write over an input: `--out` being the input folder, or a picture or the `--json` file landing on an input.
pub fn plan_outputs(
    input: &Path,
    files: &[PathBuf],
    out: &Path,
    json: Option<&Path>,
) -> anyhow::Result<Vec<PlannedImage>> {
    anyhow::ensure!(
        !(input.is_dir() && same_file(input, out)),
        "--out {} is the input folder: the drawn pictures would replace or mix with the input images; choose \
         another folder",
        out.display()
    );
    let mut seen_ids = std::collections::HashSet::new();
    let numeric: Vec<Option<u64>> =
        files.iter().map(|f| image_id_from_name(f).filter(|id| seen_ids.insert(*id))).collect();
    let mut next_id = numeric.iter().flatten().max().map_or(1, |m| m + 1);
    let mut stems = std::collections::HashMap::new();
    for file in files {
        *stems.entry(file.file_stem().map(|s| s.to_os_string())).or_insert(0usize) += 1;
    }
    let mut planned = Vec::with_capacity(files.len());
    for (file, id) in files.iter().zip(numeric) {
        let image_id = id.unwrap_or_else(|| {
            next_id += 1;
            next_id - 1
        });
        let shared_stem = stems[&file.file_stem().map(|s| s.to_os_string())] > 1;
        let name = if shared_stem { file.file_name() } else { file.file_stem() };
        let name = name.and_then(|n| n.to_str()).unwrap_or("image");
        let picture = out.join(format!("{name}.png"));
        planned.push(PlannedImage { file: file.clone(), image_id, id_from_name: id.is_some(), picture });
    }
    let outputs = planned.iter().map(|p| p.picture.as_path()).chain(json);
    for output in outputs {
        if let Some(input) = files.iter().find(|f| same_file(f, output)) {
            anyhow::bail!(
                "{} would overwrite the input image {}; choose another --out or --json",
                output.display(),
                input.display()
            );
        }
    }
    Ok(planned)
}

/// Where the file-name → image-id mapping of a results file goes: `results.json` → `results.image_ids.json`.
pub fn id_mapping_path(results: &Path) -> PathBuf {
    let stem = results.file_stem().and_then(|s| s.to_str()).unwrap_or("results");
    results.with_file_name(format!("{stem}.image_ids.json"))
}

/// Options of `trainer predict`.
#[derive(Debug, Clone)]
pub struct PredictOptions {
    /// Image file or folder.
    pub input: PathBuf,
    /// Folder for the drawn PNGs.
    pub out: PathBuf,
    /// Detections below this score are neither drawn nor written.
    pub score_thresh: f64,
    /// Where to write COCO results, if anywhere.
    pub json: Option<PathBuf>,
}

/// Runs the model over every image and writes the pictures (and results); returns the number of detections.
pub fn predict(
    config: &Config,
    model: &MaskRcnn,
    labels: &LabelNames,
    options: &PredictOptions,
    device: Device,
) -> anyhow::Result<usize> {
    let files = image_files(&options.input)?;
    let planned = plan_outputs(&options.input, &files, &options.out, options.json.as_deref())?;
    std::fs::create_dir_all(&options.out).with_context(|| format!("cannot create {}", options.out.display()))?;
    let mut results = Vec::new();
    for PlannedImage { file, image_id, picture: picture_path, .. } in &planned {
        let image_id = *image_id;
        let mut picture = decode_rgb(file)?;
        let (height, width) = (picture.height as i64, picture.width as i64);
        // The same input pipeline as evaluation's loader: one image, test geometry, padded alone.
        let (image, _) = prepare_test(&picture, &config.input)?;
        let (images, image_sizes) = pad(&[image], config.input.size_divisibility);
        let mut batch = ImageBatch { images: images.to_device(device), image_sizes };
        if config.channels_last {
            batch = images_to_channels_last(batch);
        }
        let detections = HostDetections::new(&model.inference(&batch, &[(height, width)])?.remove(0))?;
        let mut drawn = Vec::new();
        for (i, (&label, &score)) in detections.labels.iter().zip(&detections.scores).enumerate() {
            let Some(category_id) = labels.id(label) else { continue };
            if (score as f64) < options.score_thresh {
                continue;
            }
            let bbox = detections.boxes[i];
            let mask = detections.mask(i);
            let rle = mask.as_ref().map(CompressedRle::from_tensor).transpose()?;
            results.push(Detection::from_xyxy(image_id, category_id, bbox, score as f64, rle));
            drawn.push(DrawnDetection {
                bbox,
                text: format!("{} {score:.2}", labels.name(label)),
                class: label as usize,
                mask: detections.mask_bytes(i)?,
            });
        }
        draw(&mut picture, &drawn);
        write_png(picture_path, &picture)?;
    }
    if let Some(json) = &options.json {
        write_detections(json, &results)?;
        if planned.iter().any(|p| !p.id_from_name) {
            let mapping: serde_json::Map<String, serde_json::Value> = planned
                .iter()
                .map(|p| (p.file.file_name().unwrap_or_default().to_string_lossy().into_owned(), p.image_id.into()))
                .collect();
            let path = id_mapping_path(json);
            let text = serde_json::to_string_pretty(&mapping)?;
            std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    Ok(results.len())
}

fn write_png(path: &Path, picture: &RgbImage) -> anyhow::Result<()> {
    let bytes = encode_png(picture.width, picture.height, &picture.data).map_err(anyhow::Error::msg)?;
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}
