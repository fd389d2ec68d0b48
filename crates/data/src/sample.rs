//! One training or evaluation sample: the image decoded, its geometry drawn, its targets transformed and its
//! pixels made into the network input.

use crate::coco::ImageRecord;
use crate::config::InputConfig;
use crate::error::DataError;
use crate::rng::Rng;
use crate::transform::{transform_targets, Geometry, SampleTargets};

/// One decoded and transformed image with its targets.
#[derive(Debug)]
pub struct Sample {
    /// COCO image id.
    pub image_id: u64,
    /// The transform that was applied.
    pub geometry: Geometry,
    /// The network input: `[3, h, w]` float32, normalised ([`crate::pixels::prepare`]).
    pub image: tch::Tensor,
    /// Non-crowd instances that survived the transform.
    pub targets: SampleTargets,
}

/// Decodes, checks the size against the JSON and transforms one image with its targets into its network input.
pub fn load_sample(record: &ImageRecord, input: &InputConfig, train: bool, rng: &mut Rng) -> Result<Sample, DataError> {
    let image = crate::decode::decode_record(record)?;
    let geometry = if train {
        Geometry::train(input, record.height, record.width, rng)
    } else {
        Geometry::test(input, record.height, record.width)
    };
    let targets = transform_targets(record, &geometry);
    let image = crate::pixels::prepare(&image, &geometry, input)?;
    Ok(Sample { image_id: record.image_id, geometry, image, targets })
}
