//! Model code: torchvision's detector and classifier on libtorch. Knows nothing of HTTP.

pub mod agreement;
pub mod anchors;
pub mod autotune;
pub mod classifier;
pub mod detector;
pub mod device;
pub mod fpn;
pub mod instance;
pub mod layers;
mod named;
pub mod ops;
pub mod resnet;
pub mod roi_heads;
pub mod rpn;
pub mod transform;

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::weights::{StateDict, WeightsError};

pub use classifier::{Classifier, Prediction, Preset};
pub use detector::{Arch, ArchChoice, DetectRequest, Detection, DetectorConfig, FasterRcnn};
pub use device::{resolve_precision, DeviceChoice, Precision};
pub use layers::Compute;
pub use named::Named;

/// What a model does; each edge names its own route for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Detect,
    Classify,
}

named::named!(Task { Detect => "detect", Classify => "classify" });

/// What a checkpoint holds, from its keys: a detector's box predictor or a classifier's `fc`.
pub fn task_of(path: &std::path::Path) -> Result<Task, ModelError> {
    let sd = StateDict::load(path)?;
    if sd.has("roi_heads.box_predictor.cls_score.weight") {
        Ok(Task::Detect)
    } else if sd.has("fc.weight") {
        Ok(Task::Classify)
    } else {
        Err(ModelError::Weights(format!(
            "{}: neither a Faster R-CNN (roi_heads.box_predictor) nor a ResNet-50 (fc) checkpoint; set task",
            path.display()
        )))
    }
}

/// Errors of the model layer. Clone, so one failure can be handed to every request of a batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ModelError {
    #[error("{0}")]
    Weights(String),
    #[error("device: {0}")]
    Device(String),
    #[error("inference failed: {0}")]
    Inference(String),
}

impl From<WeightsError> for ModelError {
    fn from(e: WeightsError) -> Self {
        ModelError::Weights(e.to_string())
    }
}

/// Runs libtorch work, turning a panic (tch panics on libtorch errors) into an error so that
/// one bad batch does not take the caller down.
pub(crate) fn guard<T>(f: impl FnOnce() -> T) -> Result<T, ModelError> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        let msg = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        ModelError::Inference(msg)
    })
}
