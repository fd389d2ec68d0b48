//! COCO ground truth: the instances JSON that evaluation and results files are checked against.

use std::path::Path;
use std::sync::Arc;

use hotcoco::COCO;

use crate::coco_error::CocoEvalError;

/// Loaded ground truth.
pub struct GroundTruth {
    pub(crate) coco: Arc<COCO>,
    pub(crate) path: String,
}

impl GroundTruth {
    /// Loads a COCO instances JSON.
    pub fn load(path: &Path) -> Result<Self, CocoEvalError> {
        let display = path.display().to_string();
        if let Err(source) = std::fs::metadata(path) {
            return Err(CocoEvalError::Read { path: display, source });
        }
        let coco =
            COCO::new(path).map_err(|e| CocoEvalError::Parse { path: display.clone(), message: e.to_string() })?;
        Ok(GroundTruth { coco: Arc::new(coco), path: display })
    }

    /// Image ids in the ground truth.
    pub fn image_ids(&self) -> Vec<u64> {
        self.coco.get_img_ids(&[], &[])
    }
}
