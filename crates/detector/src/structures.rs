//! What goes in and out of the model: the padded image batch, per-image ground truth and per-image detections.
//! Images are made into the batch by the data crate's one input pipeline (`data::pixels`).

use tch::{Device, Kind, Tensor};

/// Instance masks of one image's ground truth, in the coordinates of the (resized) image in the batch.
#[derive(Debug)]
pub enum GtMasks {
    /// Per instance, per polygon part, flat `x0, y0, x1, y1, ...` pixel coordinates.
    Polygons(Vec<Vec<Vec<f64>>>),
    /// `[K, H, W]` u8 bitmaps (from RLE annotations), `H`, `W` the image size in the batch.
    Bitmaps(Tensor),
}

/// Ground truth of one image.
#[derive(Debug)]
pub struct GtInstances {
    /// `[K, 4]` float32 boxes, `(x1, y1, x2, y2)` in the pixels of the image in the batch.
    pub boxes: Tensor,
    /// `[K]` int64 class labels in `0..num_classes`.
    pub labels: Tensor,
    /// One mask per instance.
    pub masks: GtMasks,
    /// Seed for this image's RPN anchor and RoI proposal sampling (`None`: the global torch RNG as it stands).
    /// The trainer passes the sampler's per-image seed, so an image is sampled identically whichever rank, batch
    /// slot or micro-batch it lands in.
    pub sampling_seed: Option<u64>,
}

impl GtInstances {
    /// An image without annotations.
    pub fn empty(device: Device) -> GtInstances {
        GtInstances {
            boxes: Tensor::zeros([0, 4], (Kind::Float, device)),
            labels: Tensor::zeros([0], (Kind::Int64, device)),
            masks: GtMasks::Polygons(Vec::new()),
            sampling_seed: None,
        }
    }

    /// Number of instances.
    pub fn len(&self) -> i64 {
        self.boxes.size()[0]
    }

    /// Whether the image has no instances.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A padded batch of normalised images with the size of each image's content.
#[derive(Debug)]
pub struct ImageBatch {
    /// `[N, 3, H, W]` float32, zero beyond each image's content, `H` and `W` multiples of the size divisibility.
    pub images: Tensor,
    /// `(height, width)` of each image's content in `images`.
    pub image_sizes: Vec<(i64, i64)>,
}

/// Detections of one image.
#[derive(Debug)]
pub struct Detections {
    /// `[D, 4]` float32 `(x1, y1, x2, y2)` boxes in output-image pixels.
    pub boxes: Tensor,
    /// `[D]` float32 class scores, descending.
    pub scores: Tensor,
    /// `[D]` int64 class labels in `0..num_classes`.
    pub labels: Tensor,
    /// `[D, H, W]` bool masks at the output image's resolution.
    pub masks: Tensor,
}
