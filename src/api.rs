//! The JSON shapes detectd answers with, shared by the CLI and the HTTP edge.

use serde::Serialize;
use utoipa::ToSchema;

use crate::labels::{NamedDetection, NamedPrediction};
use crate::service::ModelInfo;

#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct DetectionJson {
    /// [x1, y1, x2, y2] in original-image pixels.
    #[serde(rename = "box")]
    #[schema(min_items = 4, max_items = 4)]
    pub bbox: [f32; 4],
    pub score: f32,
    pub label_id: i64,
    pub label: String,
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

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelStatus {
    pub name: String,
    /// The route that reaches it.
    pub endpoint: String,
    pub arch: String,
    pub classes: i64,
    pub device: String,
    pub precision: String,
    /// With `--precision auto`, once warm: what the trial measured and chose.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision_trial: Option<PrecisionTrialJson>,
    pub ready: bool,
    pub batching: BatchingJson,
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
