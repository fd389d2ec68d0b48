//! Inference over a validation split and COCO bbox/segm evaluation with hotcoco (pycocotools-exact), plus the
//! prediction images logged to TensorBoard.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use data::coco::{CocoDataset, LabelLayout};
use data::loader::{Loader, LoaderOptions};
use data::transform::{decode_rgb, RgbImage};
use detector::structures::{Detections, ImageBatch};
use detector::MaskRcnn;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::WhichWeights;
use crate::coco_eval::{evaluate as coco_evaluate, write_detections, CompressedRle, Detection, GroundTruth, IouType};
use crate::config::Config;
use crate::datasets::load_split;
use crate::distributed::RankGroup;
use crate::layout::images_to_channels_last;
use crate::model::{check_num_classes, load_model, BuiltModel};
use crate::visualize::{draw, DrawnDetection};

/// What one evaluation produced.
#[derive(Debug, Default)]
pub struct EvalOutcome {
    /// `bbox/AP`, `segm/AP50`, per-class `bbox/AP-name`, ... as fractions in [0, 1], as pycocotools reports them.
    pub metrics: BTreeMap<String, f64>,
    /// The pycocotools-style summaries and per-class tables, ready to print.
    pub report: String,
    /// Original images with predictions drawn, for TensorBoard: (image id, picture).
    pub pictures: Vec<(u64, RgbImage)>,
}

/// One image's detections copied to the host once, for COCO results, drawing and prediction files.
pub struct HostDetections {
    /// `x1, y1, x2, y2` per detection.
    pub boxes: Vec<[f64; 4]>,
    /// Scores, descending.
    pub scores: Vec<f32>,
    /// Contiguous labels.
    pub labels: Vec<i64>,
    /// `[D, H, W]` u8 masks on the CPU (empty when the model predicted none).
    masks: Tensor,
}

impl HostDetections {
    /// Copies boxes, scores, labels and masks of `detections` to the host.
    pub fn new(detections: &Detections) -> anyhow::Result<HostDetections> {
        let flat = Vec::<f32>::try_from(detections.boxes.to_device(Device::Cpu).flatten(0, -1))?;
        let boxes = flat.chunks_exact(4).map(|b| [0, 1, 2, 3].map(|k| b[k] as f64)).collect();
        let scores = Vec::<f32>::try_from(detections.scores.to_device(Device::Cpu))?;
        let labels = Vec::<i64>::try_from(detections.labels.to_device(Device::Cpu))?;
        let masks = detections.masks.to_device(Device::Cpu).to_kind(Kind::Uint8);
        Ok(HostDetections { boxes, scores, labels, masks })
    }

    /// The `[H, W]` mask of detection `i`, if the model predicted masks.
    pub fn mask(&self, i: usize) -> Option<Tensor> {
        (self.masks.dim() == 3 && self.masks.size()[0] > i as i64).then(|| self.masks.get(i as i64))
    }

    /// The mask of detection `i` as `H * W` row-major bytes.
    pub fn mask_bytes(&self, i: usize) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.mask(i).map(|m| Vec::<u8>::try_from(m.flatten(0, -1))).transpose()?)
    }
}

/// Turns one image's detections into COCO results (labels mapped back to category ids, masks RLE-encoded);
/// detections of a label no category of the dataset has are left out (possible only with category-id labels).
pub fn to_coco(image_id: u64, detections: &HostDetections, dataset: &CocoDataset) -> anyhow::Result<Vec<Detection>> {
    let mut results = Vec::with_capacity(detections.labels.len());
    for (i, (&label, &score)) in detections.labels.iter().zip(&detections.scores).enumerate() {
        let category_id = match dataset.categories.category_id(label) {
            Some(id) => id,
            // Category-id labels cover every id up to the largest, the unused ones too (torchvision's COCO models
            // have 10): a detection of such a label matches no category of the dataset and is left out.
            None if dataset.categories.layout() == LabelLayout::CategoryId => continue,
            None => anyhow::bail!("the model predicted label {label}, which the dataset does not have"),
        };
        let mask = detections.mask(i).map(|m| CompressedRle::from_tensor(&m)).transpose()?;
        results.push(Detection::from_xyxy(image_id, category_id, detections.boxes[i], score as f64, mask));
    }
    Ok(results)
}

/// Runs the model on every image of `dataset` (batch 1, test-time resize of `[input]`), evaluates bbox and segm
/// against `gt` (needed on rank 0 only), writes `coco_instances_results.json` into `results_dir` when given, and draws the first
/// `config.eval.vis_images` images with their predictions.
///
/// Distributed: each rank of `group` runs its contiguous shard of the images; rank 0 gathers the results in
/// image order (the order one process would produce), computes the metrics once and writes the results file,
/// and every rank returns the same metrics and report (pictures on rank 0 only).
pub fn evaluate(
    model: &MaskRcnn,
    config: &Config,
    dataset: Arc<CocoDataset>,
    gt: Option<&GroundTruth>,
    device: Device,
    results_dir: Option<&Path>,
    group: &RankGroup,
) -> anyhow::Result<EvalOutcome> {
    let data_config = config.data.as_ref().context("config has no [data] section")?;
    let options = LoaderOptions::from_config(data_config);
    let (rank, world_size) = (group.rank(), group.world_size());
    let loader = Loader::inference(dataset.clone(), config.input.clone(), 1, rank, world_size, options)?;
    let mut results = Vec::new();
    let mut pictures = Vec::new();
    for batch in loader {
        let batch = batch?.images_to_device(device);
        let mut image_batch =
            ImageBatch { images: batch.images.shallow_clone(), image_sizes: batch.image_sizes.clone() };
        if config.channels_last {
            image_batch = images_to_channels_last(image_batch);
        }
        let detections = model.inference(&image_batch, &batch.original_sizes)?;
        for (&image_id, dets) in batch.image_ids.iter().zip(&detections) {
            let dets = HostDetections::new(dets)?;
            let coco = to_coco(image_id, &dets, &dataset)?;
            if group.is_main() && pictures.len() < config.eval.vis_images {
                let record = dataset.images.iter().find(|r| r.image_id == image_id).context("image id in dataset")?;
                let mut picture = decode_rgb(&record.file)?;
                draw(&mut picture, &drawn(&dets, &dataset, 0.3)?);
                pictures.push((image_id, picture));
            }
            results.extend(coco);
        }
    }
    let shards = group
        .gather_bytes(serde_json::to_vec(&results)?)
        .with_context(|| format!("rank {rank}: gathering detections on rank 0"))?;
    let mut outcome = EvalOutcome { pictures, ..Default::default() };
    if !group.is_main() {
        let shared = group.share_from_main(Vec::new()).with_context(|| format!("rank {rank}: receiving metrics"))?;
        let (metrics, report): (BTreeMap<String, f64>, String) = serde_json::from_slice(&shared)?;
        outcome.metrics = metrics;
        outcome.report = report;
        return Ok(outcome);
    }
    let gt = gt.context("rank 0 evaluates and needs the ground truth")?;
    let mut results = Vec::new();
    for (shard_rank, shard) in shards.iter().enumerate() {
        let detections: Vec<Detection> = serde_json::from_slice(shard)
            .with_context(|| format!("detections gathered from rank {shard_rank} are not valid JSON"))?;
        results.extend(detections);
    }
    if let Some(dir) = results_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        write_detections(&dir.join("coco_instances_results.json"), &results)?;
    }
    for iou_type in [IouType::Bbox, IouType::Segm] {
        let summary = coco_evaluate(gt, &results, iou_type, "validation")?;
        outcome.report.push_str(&format!("Evaluation results for {}:\n", iou_type.name()));
        for line in summary.summary_lines() {
            outcome.report.push_str(&line);
            outcome.report.push('\n');
        }
        outcome.report.push_str(&summary.per_class_table());
        outcome.report.push('\n');
        outcome.metrics.extend(summary.metrics());
    }
    group
        .share_from_main(serde_json::to_vec(&(&outcome.metrics, &outcome.report))?)
        .context("rank 0: sending metrics")?;
    Ok(outcome)
}

/// Detections above `min_score` as drawable items with `name score` labels.
pub fn drawn(
    detections: &HostDetections,
    dataset: &CocoDataset,
    min_score: f64,
) -> anyhow::Result<Vec<DrawnDetection>> {
    let mut out = Vec::new();
    for (i, (&label, &score)) in detections.labels.iter().zip(&detections.scores).enumerate() {
        if (score as f64) < min_score {
            continue;
        }
        let name = dataset.categories.name(label).unwrap_or("?");
        out.push(DrawnDetection {
            bbox: detections.boxes[i],
            text: format!("{name} {score:.2}"),
            class: label as usize,
            mask: detections.mask_bytes(i)?,
        });
    }
    Ok(out)
}

/// `trainer eval`: loads weights (a checkpoint folder or a safetensors file) and evaluates the validation split,
/// sharded over the ranks of `group` when distributed; `which` picks the model's weights or their EMA.
pub fn evaluate_weights(
    config: &Config,
    weights: &Path,
    which: WhichWeights,
    device: Device,
    group: &RankGroup,
) -> anyhow::Result<EvalOutcome> {
    let val_set = Arc::new(load_split(config, "val", !config.log.quiet && group.is_main())?);
    let annotations = val_set.sources.first().context("the validation split has no annotation file")?.clone();
    check_num_classes(config, val_set.categories.len())?;
    let BuiltModel { vs: _vs, model } = load_model(config, weights, which, device, group)?;
    let gt = if group.is_main() { Some(GroundTruth::load(&annotations)?) } else { None };
    let results_dir = config.output_dir.join("inference");
    evaluate(&model, config, val_set, gt.as_ref(), device, Some(&results_dir), group)
}
