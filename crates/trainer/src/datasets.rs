//! The datasets as training, evaluation and benchmarks read them: the configured splits (with the COCO-location
//! hint when their files are absent), the training split's filtering, the fingerprint that checkpoint manifests
//! record, and the conversion of the loader's batches into the detector's inputs.

use anyhow::Context;
use data::batch::{Batch, TargetMasks};
use data::coco::{CocoDataset, LabelLayout, LoadOptions};
use detector::config::ClassLayout;
use detector::structures::{GtInstances, GtMasks, ImageBatch};

use crate::config::Config;

/// Loads a split with the config's missing-image policy, with the COCO-location hint when its files are absent.
pub fn load_split(config: &Config, name: &str, progress: bool) -> anyhow::Result<CocoDataset> {
    let data = config.data.as_ref().context(
        "the config has no [data] section: set data.train.annotations, data.train.images, data.val.annotations and \
         data.val.images",
    )?;
    if let Some(synth) = &data.synth {
        if data::synth::ensure(synth)? {
            log::info!("generated the synthetic dataset in {}", synth.out.display());
        }
    }
    let split = if name == "train" { &data.train } else { &data.val };
    let labels = match config.model.roi_heads.class_layout {
        ClassLayout::Contiguous => LabelLayout::Contiguous,
        ClassLayout::CategoryId => LabelLayout::CategoryId,
    };
    let options = LoadOptions { labels, ..LoadOptions::from_config(data, progress) };
    CocoDataset::load_split(split, name, options).map_err(|e| {
        let missing = split.annotations.to_vec().iter().any(|p| !p.exists());
        let hint = if missing {
            " (COCO 2017 is expected under datasets/coco/{annotations,train2017,val2017}; point \
             data.train.annotations, data.train.images, data.val.annotations and data.val.images elsewhere with \
             --set or in the config)"
        } else {
            ""
        };
        anyhow::anyhow!("{e}{hint}")
    })
}

/// A cheap fingerprint of a dataset (annotation files, image count, categories) for checkpoint manifests.
pub fn fingerprint(dataset: &CocoDataset) -> String {
    let mut text = format!("{} images;", dataset.images.len());
    for source in &dataset.sources {
        let size = std::fs::metadata(source).map(|m| m.len()).unwrap_or(0);
        text.push_str(&format!("{}:{size};", source.display()));
    }
    text.push_str(&format!("categories {:?}", dataset.categories.ids()));
    format!("{:016x}", data::rng::mix(&text.bytes().map(u64::from).collect::<Vec<_>>()))
}

/// The training split as training reads it: [`load_split`], then, with `data.filter_empty`, without the images
/// that have no non-crowd annotation.
pub fn load_train_split(config: &Config, progress: bool) -> anyhow::Result<CocoDataset> {
    let mut train_set = load_split(config, "train", progress)?;
    if config.data.as_ref().is_some_and(|d| d.filter_empty) {
        train_set.filter_for_training();
    }
    Ok(train_set)
}

/// Converts the loader's batch into the detector's inputs (each target carries its sampler seed for the
/// detector's per-image RPN/RoI sampling).
pub fn model_inputs(batch: Batch) -> (ImageBatch, Vec<GtInstances>) {
    let seeds = batch.sample_seeds;
    let targets = batch
        .targets
        .into_iter()
        .enumerate()
        .map(|(i, target)| {
            let masks = match target.masks {
                TargetMasks::Polygons(polygons) => GtMasks::Polygons(polygons),
                TargetMasks::Bitmaps(bitmaps) => GtMasks::Bitmaps(bitmaps),
            };
            GtInstances { boxes: target.boxes, labels: target.labels, masks, sampling_seed: seeds.get(i).copied() }
        })
        .collect();
    (ImageBatch { images: batch.images, image_sizes: batch.image_sizes }, targets)
}
