//! The one place a model is built from a config: on a device, for one rank of a [`RankGroup`] (SyncBN layers
//! all-reduce their batch statistics over its ranks), with the class count checked against the dataset and,
//! for evaluation, prediction and export, every weight loaded from a file (channels-last when configured).
//! Training, `trainer eval`, `trainer predict`, `trainer info`, `trainer bench` and `trainer convert` all build
//! through here, so a model is assembled the same way everywhere.

use std::path::Path;
use std::sync::Arc;

use backbone::Backbone;
use detector::MaskRcnn;
use tch::{nn, Device};

use crate::checkpoint::{init_weights, WhichWeights};
use crate::config::Config;
use crate::distributed::RankGroup;
use crate::layout::variables_to_channels_last;

/// The model a config describes, built on a fresh var store.
pub struct BuiltModel {
    /// Owns every variable: `backbone.*`, `fpn.*`, `rpn.*`, `roi_heads.*`.
    pub vs: nn::VarStore,
    /// The whole detector.
    pub model: MaskRcnn,
}

impl BuiltModel {
    /// The detector's backbone.
    pub fn backbone(&self) -> &Backbone {
        self.model.backbone()
    }
}

/// Builds the configured model on `device` for one rank of `group` (a single process: [`RankGroup::single`]),
/// with freshly initialised weights.
pub fn build_model(config: &Config, device: Device, group: &RankGroup) -> anyhow::Result<BuiltModel> {
    let vs = nn::VarStore::new(device);
    let reducer = group.process_group().map(|g| g as Arc<dyn backbone::BatchStatsReducer>);
    let model = MaskRcnn::with_reducer(&vs.root(), &config.model, reducer)?;
    Ok(BuiltModel { vs, model })
}

/// Refuses a config whose `model.roi_heads.num_classes` differs from the `num_classes` categories of the dataset
/// it will be trained or evaluated on.
pub fn check_num_classes(config: &Config, num_classes: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.model.roi_heads.num_classes == num_classes as i64,
        "model.roi_heads.num_classes = {} but the dataset has {num_classes} categories",
        config.model.roi_heads.num_classes
    );
    Ok(())
}

/// [`build_model`] for a dataset of `num_classes` categories (see [`check_num_classes`]).
pub fn build_for_dataset(
    config: &Config,
    num_classes: usize,
    device: Device,
    group: &RankGroup,
) -> anyhow::Result<BuiltModel> {
    check_num_classes(config, num_classes)?;
    build_model(config, device, group)
}

/// Loads `weights` (a checkpoint folder or a safetensors file with our names) into the model variables of `vs`,
/// refusing a file that lacks any of them, then lays the convolution weights out channels-last when the config's
/// `channels_last` is set. For evaluation and prediction, which need every weight; `which` picks the model's
/// weights or their EMA in a checkpoint folder.
pub fn load_weights(config: &Config, vs: &nn::VarStore, weights: &Path, which: WhichWeights) -> anyhow::Result<()> {
    let missing = init_weights(vs, weights, which)?;
    anyhow::ensure!(
        missing.is_empty(),
        "{} lacks {} model variables (e.g. `{}`); convert foreign weights with `trainer convert`",
        weights.display(),
        missing.len(),
        missing[0]
    );
    if config.channels_last {
        variables_to_channels_last(vs);
    }
    Ok(())
}

/// Builds the model of `config` for one rank of `group` with `weights` (see [`load_weights`]), its convolution
/// weights channels-last when the config's `channels_last` is set.
pub fn load_model(
    config: &Config,
    weights: &Path,
    which: WhichWeights,
    device: Device,
    group: &RankGroup,
) -> anyhow::Result<BuiltModel> {
    let built = build_model(config, device, group)?;
    load_weights(config, &built.vs, weights, which)?;
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(num_classes: i64) -> Config {
        let mut config: Config =
            toml::from_str("[model.backbone]\nname = \"resnet18\"").unwrap_or_else(|e| panic!("{e}"));
        config.model.roi_heads.num_classes = num_classes;
        config
    }

    #[test]
    fn class_count_must_match_the_dataset() {
        assert!(check_num_classes(&config(3), 3).is_ok());
        let message = check_num_classes(&config(80), 3).unwrap_err().to_string();
        assert_eq!(message, "model.roi_heads.num_classes = 80 but the dataset has 3 categories");
    }
}
