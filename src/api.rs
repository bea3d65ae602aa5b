//! The JSON shapes detectd answers with, shared by the CLI and the HTTP edge.

use serde::Serialize;
use utoipa::ToSchema;

use crate::labels::{NamedDetection, NamedKeypoint, NamedPrediction};
use crate::rle::MaskShape;
use crate::service::settings::SettingsJson;
use crate::service::{ModelInfo, State};

#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct DetectionJson {
    /// [x1, y1, x2, y2] in original-image pixels.
    #[serde(rename = "box")]
    #[schema(min_items = 4, max_items = 4)]
    pub bbox: [f32; 4],
    pub score: f32,
    pub label_id: i64,
    pub label: String,
    /// Mask R-CNN models: the instance mask (`mask_format`: COCO RLE by default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask: Option<MaskJson>,
    /// Keypoint R-CNN models: every keypoint, in the model's order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keypoints: Option<Vec<KeypointJson>>,
}

/// A mask: COCO's compressed RLE (`pycocotools.mask.decode` reads it as it is), or outer
/// contours as polygons `[[x, y, x, y, ...], ...]`.
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
#[serde(untagged)]
pub enum MaskJson {
    Rle {
        /// [height, width] of the image.
        size: [u32; 2],
        /// COCO's compressed run-length string, column-major.
        counts: String,
    },
    Polygons(Vec<Vec<f32>>),
}

impl From<MaskShape> for MaskJson {
    fn from(m: MaskShape) -> Self {
        match m {
            MaskShape::Rle(r) => MaskJson::Rle {
                size: r.size,
                counts: r.counts,
            },
            MaskShape::Polygons(p) => MaskJson::Polygons(p),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct KeypointJson {
    pub name: String,
    pub x: f32,
    pub y: f32,
    /// The keypoint's heatmap logit (torchvision's `keypoints_scores`).
    pub score: f32,
}

impl From<NamedKeypoint> for KeypointJson {
    fn from(k: NamedKeypoint) -> Self {
        Self {
            name: k.name,
            x: k.x,
            y: k.y,
            score: k.score,
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct PredictionJson {
    pub label_id: i64,
    pub label: String,
    pub score: f32,
}

impl From<NamedDetection> for DetectionJson {
    fn from(d: NamedDetection) -> Self {
        Self {
            bbox: d.bbox,
            score: d.score,
            label_id: d.label_id,
            label: d.label,
            mask: d.mask.map(Into::into),
            keypoints: d.keypoints.map(|k| k.into_iter().map(Into::into).collect()),
        }
    }
}

impl From<NamedPrediction> for PredictionJson {
    fn from(p: NamedPrediction) -> Self {
        Self {
            label_id: p.label_id,
            label: p.label,
            score: p.score,
        }
    }
}

pub fn detections_json(dets: Vec<NamedDetection>) -> Vec<DetectionJson> {
    dets.into_iter().map(Into::into).collect()
}

pub fn predictions_json(preds: Vec<NamedPrediction>) -> Vec<PredictionJson> {
    preds.into_iter().map(Into::into).collect()
}

/// One image's detections, with its size as decoded (EXIF orientation applied).
#[derive(Debug, Serialize, ToSchema)]
pub struct ImageDetections {
    pub width: u32,
    pub height: u32,
    /// Sorted by score, highest first.
    pub detections: Vec<DetectionJson>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DetectResponse {
    pub model: ModelInfo,
    /// One per image, in the order sent.
    pub results: Vec<ImageDetections>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ImagePredictions {
    pub width: u32,
    pub height: u32,
    pub predictions: Vec<PredictionJson>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClassifyResponse {
    pub model: ModelInfo,
    pub results: Vec<ImagePredictions>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BatchingJson {
    pub max_batch_size: usize,
    pub max_batch_delay_ms: u64,
    pub max_queue: usize,
}

/// One model by name: its serving version, a load beside it, and older versions draining.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelStatus {
    pub name: String,
    /// The serving version (none until the name's first load is done).
    pub version: Option<u64>,
    /// `detect` or `classify` (none until known from the checkpoint).
    pub task: Option<String>,
    /// loading, ready, draining (deleted, answering what it accepted) or failed.
    pub state: State,
    /// Why the last load failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Answers `/detect` (or `/classify`) without `?model=`.
    pub default: bool,
    /// The route that reaches it by name.
    pub endpoint: Option<String>,
    pub arch: Option<String>,
    /// What each detection carries: `boxes`, and `masks` or `keypoints`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outputs: Option<Vec<String>>,
    /// Keypoint models: the keypoints' names, in their order in each detection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keypoint_names: Option<Vec<String>>,
    /// Keypoint models: the skeleton's edges as pairs of indices into `keypoint_names`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skeleton: Option<Vec<[usize; 2]>>,
    pub classes: Option<i64>,
    pub device: Option<String>,
    pub precision: Option<String>,
    /// With `--precision auto`, once warm: what the trial measured and chose.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision_trial: Option<PrecisionTrialJson>,
    pub ready: bool,
    /// Resident memory the serving version's load and warm-up took (MiB).
    pub memory_mb: Option<u64>,
    /// Every setting of the version, as the `[[model]]` keys name them.
    pub settings: SettingsJson,
    pub batching: BatchingJson,
    /// A version loading beside the serving one, or the last load's failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<NextVersionJson>,
    /// Older versions still answering requests they accepted.
    pub draining: Vec<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NextVersionJson {
    pub version: u64,
    pub state: State,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PrecisionTrialJson {
    pub chosen: String,
    /// `trial` (measured at this start) or `cache` (an earlier trial on this hardware).
    pub source: String,
    /// The agreement with fp32 a setting needs to be chosen.
    pub min_agreement: f64,
    /// Seconds the trial added to the start (when measured at this start).
    pub trial_seconds: f64,
    pub candidates: Vec<PrecisionCandidateJson>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PrecisionCandidateJson {
    pub precision: String,
    /// Best time of one pass over the trial images.
    pub seconds: f64,
    /// Share of fp32's answers reproduced on the trial images.
    pub agreement: f64,
}

impl From<crate::model::autotune::Decision> for PrecisionTrialJson {
    fn from(d: crate::model::autotune::Decision) -> Self {
        Self {
            chosen: d.chosen,
            source: match d.source {
                crate::model::autotune::Source::Trial => "trial".into(),
                crate::model::autotune::Source::Cache => "cache".into(),
            },
            min_agreement: d.min_agreement,
            trial_seconds: d.trial_seconds,
            candidates: d
                .measured
                .into_iter()
                .map(|m| PrecisionCandidateJson {
                    precision: m.precision,
                    seconds: m.seconds,
                    agreement: m.agreement,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelsResponse {
    pub models: Vec<ModelStatus>,
}

/// Every error answer: a message for people and a stable code for programs.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
    pub code: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StatusBody {
    /// ok, ready, loading or draining.
    pub status: String,
}
