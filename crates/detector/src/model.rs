//! The assembled Mask R-CNN: backbone, FPN, RPN and RoI heads, with a training forward returning named losses and
//! an inference forward returning per-image detections in output-image pixels.

use std::collections::BTreeMap;
use std::sync::Arc;

use backbone::{Backbone, BatchStatsReducer};
use tch::{nn, Kind, Tensor};

use crate::config::{DetectorConfig, OutputStyle};
use crate::fpn::Fpn;
use crate::ops::LevelMapping;
use crate::postprocess::postprocess;
use crate::roi_heads::RoiHeads;
use crate::rpn::Rpn;
use crate::structures::{Detections, GtInstances, GtMasks, ImageBatch, TrainingTargets};
use crate::DetectorError;

/// Mask R-CNN with an FPN. Variables: `backbone.*`, `fpn.*`, `rpn.*`, `roi_heads.box_head.*`,
/// `roi_heads.box_predictor.*`, `roi_heads.mask_head.*`.
#[derive(Debug)]
pub struct MaskRcnn {
    backbone: Backbone,
    fpn: Fpn,
    rpn: Rpn,
    roi_heads: RoiHeads,
    roi_levels: Vec<usize>,
    config: DetectorConfig,
}

impl MaskRcnn {
    /// Builds the model under `path` with the initialisation of the from-scratch recipe.
    pub fn new(path: &nn::Path, config: &DetectorConfig) -> Result<MaskRcnn, DetectorError> {
        Self::with_reducer(path, config, None)
    }

    /// [`MaskRcnn::new`] with the cross-process statistics reducer SyncBN needs.
    pub fn with_reducer(
        path: &nn::Path,
        config: &DetectorConfig,
        reducer: Option<Arc<dyn BatchStatsReducer>>,
    ) -> Result<MaskRcnn, DetectorError> {
        config.validate()?;
        let backbone = Backbone::new(&path.sub("backbone"), &config.backbone, reducer.clone())?;
        let fpn = Fpn::new(&path.sub("fpn"), &config.fpn, &backbone.output_specs(), reducer.clone())?;
        let specs = fpn.output_specs().to_vec();
        let strides: Vec<i64> = specs.iter().map(|s| s.stride).collect();
        if config.anchors.sizes.len() != specs.len() {
            return Err(DetectorError::Config {
                field: "anchors.sizes".into(),
                message: format!("{} lists for {} pyramid levels", config.anchors.sizes.len(), specs.len()),
            });
        }
        let channels = config.fpn.out_channels;
        let static_shapes = config.static_shapes.enabled;
        let rpn = Rpn::new(&path.sub("rpn"), &config.rpn, &config.anchors, (channels, &strides), reducer.clone())?
            .with_static_shapes(static_shapes.then_some(config.static_shapes.nms_sweeps));
        let roi_levels = config
            .roi_heads
            .in_features
            .iter()
            .map(|name| {
                specs.iter().position(|s| &s.name == name).ok_or_else(|| DetectorError::Config {
                    field: "roi_heads.in_features".into(),
                    message: format!(
                        "`{name}` is not a pyramid level; levels: {}",
                        specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let roi_strides: Vec<i64> = roi_levels.iter().map(|&i| strides[i]).collect();
        if roi_strides.windows(2).any(|w| w[1] != 2 * w[0]) {
            return Err(DetectorError::Config {
                field: "roi_heads.in_features".into(),
                message: "levels must be consecutive and finest first".into(),
            });
        }
        let level_mapping = match config.roi_heads.output_style {
            OutputStyle::Detectron2 => LevelMapping::Detectron2,
            OutputStyle::Torchvision => LevelMapping::Torchvision,
        };
        let roi_heads = RoiHeads::new(
            &path.sub("roi_heads"),
            &config.roi_heads,
            &config.box_head,
            &config.mask_head,
            config.fpn.out_channels,
            &roi_strides,
            level_mapping,
            reducer,
        )?
        .with_static_shapes(static_shapes);
        Ok(MaskRcnn { backbone, fpn, rpn, roi_heads, roi_levels, config: config.clone() })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }

    /// The backbone (for freezing and weight import).
    pub fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    /// Pyramid levels `p2`..`p6` of a batch of normalised images; `train` selects BatchNorm's batch statistics.
    pub fn features(&self, images: &Tensor, train: bool) -> Vec<Tensor> {
        self.fpn.forward(&self.backbone.forward_t(images, train), train)
    }

    /// Training step forward: `loss_rpn_cls`, `loss_rpn_loc`, `loss_cls`, `loss_box_reg` and `loss_mask`, each a
    /// scalar already weighted (all weights 1) so that their sum is the training loss. `targets` has one entry per
    /// image of the batch (possibly empty). [`MaskRcnn::prepare_targets`] then [`MaskRcnn::forward_prepared`].
    pub fn forward_train(
        &self,
        batch: &ImageBatch,
        targets: &[GtInstances],
    ) -> Result<BTreeMap<String, Tensor>, DetectorError> {
        let targets = self.prepare_targets(batch, targets)?;
        self.forward_prepared(batch, &targets)
    }

    /// The host half of a training step's inputs: checks the batch and its ground truth (reading the labels' range,
    /// free for labels on the host, as the trainer's are), pads the ground truth under `static_shapes` and uploads
    /// it to the images' device.
    pub fn prepare_targets(
        &self,
        batch: &ImageBatch,
        targets: &[GtInstances],
    ) -> Result<Vec<TrainingTargets>, DetectorError> {
        check_batch(batch)?;
        self.check_targets(batch, targets)?;
        let device = batch.images.device();
        let static_shapes = &self.config.static_shapes;
        let max_instances = static_shapes.enabled.then_some(static_shapes.max_instances);
        Ok(targets.iter().map(|t| TrainingTargets::new(t, device, max_instances)).collect())
    }

    /// The device half of a training step's forward pass, on targets from [`MaskRcnn::prepare_targets`]: with
    /// `static_shapes`, the same operators on the same shapes for every batch of the same image size (what a CUDA
    /// graph captures).
    pub fn forward_prepared(
        &self,
        batch: &ImageBatch,
        targets: &[TrainingTargets],
    ) -> Result<BTreeMap<String, Tensor>, DetectorError> {
        let features = self.features(&batch.images, true);
        let padded = padded_size(batch);
        let (proposals, mut losses) = self.rpn.forward(&features, padded, &batch.image_sizes, Some(targets));
        let roi_features: Vec<Tensor> = self.roi_levels.iter().map(|&i| features[i].shallow_clone()).collect();
        losses.extend(self.roi_heads.forward_train(&roi_features, &proposals, targets)?);
        Ok(losses)
    }

    /// Inference without gradients: detections per image with boxes in the pixels of `output_sizes` (usually the
    /// original image sizes; `batch.image_sizes` for no rescaling), masks pasted at that resolution.
    pub fn inference(&self, batch: &ImageBatch, output_sizes: &[(i64, i64)]) -> Result<Vec<Detections>, DetectorError> {
        check_batch(batch)?;
        if output_sizes.len() != batch.image_sizes.len() {
            return Err(DetectorError::Input(format!(
                "inference: {} output sizes for {} images",
                output_sizes.len(),
                batch.image_sizes.len()
            )));
        }
        tch::no_grad(|| {
            let features = self.features(&batch.images, false);
            let (proposals, _) = self.rpn.forward(&features, padded_size(batch), &batch.image_sizes, None);
            let roi_features: Vec<Tensor> = self.roi_levels.iter().map(|&i| features[i].shallow_clone()).collect();
            let rows = self.roi_heads.stack(&roi_features);
            let detections = self.roi_heads.detect_boxes(&rows, &proposals, &batch.image_sizes);
            let masks = self.roi_heads.detect_masks(&rows, &detections);
            Ok(detections
                .into_iter()
                .zip(masks)
                .zip(batch.image_sizes.iter().zip(output_sizes))
                .map(|((d, m), (&input, &output))| {
                    postprocess(
                        d,
                        m,
                        input,
                        output,
                        self.config.roi_heads.output_style,
                        self.config.mask_head.mask_threshold,
                    )
                })
                .collect())
        })
    }

    /// Checks the ground truth's shapes, kinds, label range and mask counts (the label range is read on the host: free
    /// for labels there, one copy for labels on a device).
    fn check_targets(&self, batch: &ImageBatch, targets: &[GtInstances]) -> Result<(), DetectorError> {
        if targets.len() != batch.image_sizes.len() {
            return Err(DetectorError::Input(format!(
                "forward_train: {} targets for {} images",
                targets.len(),
                batch.image_sizes.len()
            )));
        }
        let mut labels = Vec::new();
        for (i, t) in targets.iter().enumerate() {
            let k = t.boxes.size().first().copied().unwrap_or(-1);
            if t.boxes.size() != [k, 4] || t.labels.size() != [k] {
                return Err(DetectorError::Input(format!(
                    "image {i}: ground truth boxes {:?} and labels {:?}; expected [K, 4] and [K]",
                    t.boxes.size(),
                    t.labels.size()
                )));
            }
            if t.labels.kind() != Kind::Int64 {
                return Err(DetectorError::Input(format!(
                    "image {i}: labels must be int64, got {:?}",
                    t.labels.kind()
                )));
            }
            let masks = match &t.masks {
                GtMasks::Polygons(p) => p.len() as i64,
                GtMasks::Bitmaps(b) => {
                    let (h, w) = batch.image_sizes[i];
                    let s = b.size();
                    if s.len() != 3 || s[1] < h || s[2] < w {
                        return Err(DetectorError::Input(format!(
                            "image {i}: bitmap masks {s:?} do not cover the {h}x{w} image"
                        )));
                    }
                    s[0]
                }
            };
            if masks != k {
                return Err(DetectorError::Input(format!("image {i}: {k} boxes but {masks} masks")));
            }
            if k > 0 {
                labels.push(t.labels.shallow_clone());
            }
        }
        if !labels.is_empty() {
            // The smallest and largest label: free for labels on the host (the trainer's, uploaded after this
            // check), otherwise one host read.
            let bounds: Vec<Tensor> = labels.iter().flat_map(|l| [l.min(), l.max()]).collect();
            let device = bounds[0].device();
            let bounds = Tensor::stack(&bounds.iter().map(|b| transfer::to_device(b, device)).collect::<Vec<_>>(), 0);
            let bounds = if device == tch::Device::Cpu {
                Vec::<i64>::try_from(&bounds)
            } else {
                transfer::download_vec::<i64>(&bounds)
            }
            .map_err(|e| DetectorError::Input(format!("cannot read the ground truth labels ({e})")))?;
            let (min, max) = (bounds.iter().step_by(2).min(), bounds.iter().skip(1).step_by(2).max());
            let (min, max) = (*min.unwrap_or(&0), *max.unwrap_or(&0));
            let classes = self.config.roi_heads.num_classes;
            if min < 0 || max >= classes {
                return Err(DetectorError::Input(format!(
                    "ground truth labels must be in 0..{classes} (model.roi_heads.num_classes), found {min}..={max}"
                )));
            }
        }
        Ok(())
    }
}

fn padded_size(batch: &ImageBatch) -> (i64, i64) {
    let s = batch.images.size();
    (s[2], s[3])
}

fn check_batch(batch: &ImageBatch) -> Result<(), DetectorError> {
    let s = batch.images.size();
    if s.len() != 4 || s[1] != 3 || s[0] != batch.image_sizes.len() as i64 || s[0] == 0 {
        return Err(DetectorError::Input(format!(
            "image batch {s:?} with {} image sizes; expected [N, 3, H, W] with N sizes",
            batch.image_sizes.len()
        )));
    }
    if let Some((i, &(h, w))) =
        batch.image_sizes.iter().enumerate().find(|(_, &(h, w))| h <= 0 || w <= 0 || h > s[2] || w > s[3])
    {
        return Err(DetectorError::Input(format!("image {i}: size {h}x{w} does not fit the {}x{} batch", s[2], s[3])));
    }
    Ok(())
}
