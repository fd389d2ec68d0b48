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

    /// These instances on `device`: tensors on the host are uploaded without making the host wait
    /// (`transfer::upload`), tensors elsewhere moved, polygons kept on the host (they are rasterised there).
    pub fn to_device(&self, device: Device) -> GtInstances {
        let moved = |t: &Tensor| match t.device() {
            d if d == device => t.shallow_clone(),
            Device::Cpu => transfer::upload(t, device),
            _ => transfer::to_device(t, device),
        };
        let masks = match &self.masks {
            GtMasks::Polygons(p) => GtMasks::Polygons(p.clone()),
            GtMasks::Bitmaps(b) => GtMasks::Bitmaps(moved(b)),
        };
        GtInstances { boxes: moved(&self.boxes), labels: moved(&self.labels), masks, sampling_seed: self.sampling_seed }
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

/// Ground truth of one image as the training losses read it: on the model's device and, with static shapes,
/// padded to a multiple of `max_instances` instances (zero boxes, label 0, empty masks) with `valid` marking the
/// real ones, so that its tensors have the same shapes whatever the image's instance count.
#[derive(Debug)]
pub struct TrainingTargets {
    /// The (padded) instances.
    pub gt: GtInstances,
    /// `[G]` bool: which instances are real; `None` when all are (no padding).
    pub valid: Option<Tensor>,
}

impl TrainingTargets {
    /// `gt` on `device`, padded to the smallest positive multiple of `max_instances` that holds it when given.
    pub fn new(gt: &GtInstances, device: Device, max_instances: Option<i64>) -> TrainingTargets {
        let Some(multiple) = max_instances else {
            return TrainingTargets { gt: gt.to_device(device), valid: None };
        };
        let count = gt.len();
        let padded = (count.max(1) + multiple - 1) / multiple * multiple;
        let extra = padded - count;
        let pad = |t: &Tensor| {
            let mut shape = t.size();
            shape[0] = extra;
            Tensor::cat(&[t.shallow_clone(), t.new_zeros(shape.as_slice(), (t.kind(), t.device()))], 0)
        };
        let masks = match &gt.masks {
            GtMasks::Polygons(p) => {
                GtMasks::Polygons(p.iter().cloned().chain((0..extra).map(|_| Vec::new())).collect())
            }
            GtMasks::Bitmaps(b) => GtMasks::Bitmaps(pad(b)),
        };
        let padded_gt =
            GtInstances { boxes: pad(&gt.boxes), labels: pad(&gt.labels), masks, sampling_seed: gt.sampling_seed };
        let valid = Tensor::arange(padded, (Kind::Int64, device)).lt(count);
        TrainingTargets { gt: padded_gt.to_device(device), valid: Some(valid) }
    }

    /// Which instances are real, `[G]` bool on `device`.
    pub fn valid_or_all(&self) -> Tensor {
        match &self.valid {
            Some(valid) => valid.shallow_clone(),
            None => Tensor::ones([self.gt.len()], (Kind::Bool, self.gt.boxes.device())),
        }
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
