//! The JSON shapes detectd answers with, shared by the CLI and the HTTP edge.

use serde::Serialize;

use crate::labels::Labels;
use crate::model::{Detection, Prediction};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DetectionJson {
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
    pub score: f32,
    pub label_id: i64,
    pub label: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PredictionJson {
    pub label_id: i64,
    pub label: String,
    pub score: f32,
}

pub fn detections_json(dets: &[Detection], labels: &Labels) -> Vec<DetectionJson> {
    dets.iter()
        .map(|d| DetectionJson {
            bbox: d.bbox,
            score: d.score,
            label_id: d.label,
            label: labels.name(d.label).to_owned(),
        })
        .collect()
}

pub fn predictions_json(preds: &[Prediction], labels: &Labels) -> Vec<PredictionJson> {
    preds
        .iter()
        .map(|p| PredictionJson {
            label_id: p.label,
            label: labels.name(p.label).to_owned(),
            score: p.score,
        })
        .collect()
}
