//! Between protobuf messages and the service's types. proto3 cannot tell 0 from unset, so 0
//! means "the default" for every numeric option.

use super::pb;
use crate::labels::{NamedDetection, NamedPrediction};
use crate::service::{Answer, ClassifyOptions, DetectOptions, ModelState, Service, Task};

pub fn detect_options(
    score_threshold: f32,
    max_detections: u32,
    labels: Vec<String>,
) -> DetectOptions {
    DetectOptions {
        score_threshold: (score_threshold != 0.0).then_some(f64::from(score_threshold)),
        max_detections: (max_detections != 0).then_some(i64::from(max_detections)),
        labels: (!labels.is_empty()).then_some(labels),
    }
}

pub fn classify_options(top_k: u32) -> ClassifyOptions {
    ClassifyOptions {
        top_k: (top_k != 0).then_some(i64::from(top_k)),
    }
}

fn detection(d: NamedDetection) -> pb::Detection {
    let [x1, y1, x2, y2] = d.bbox;
    pb::Detection {
        x1,
        y1,
        x2,
        y2,
        score: d.score,
        label_id: d.label_id as u32,
        label: d.label,
    }
}

fn prediction(p: NamedPrediction) -> pb::Prediction {
    pb::Prediction {
        label_id: p.label_id as u32,
        label: p.label,
        score: p.score,
    }
}

pub fn detect_responses(answer: Answer<Vec<NamedDetection>>) -> Vec<pb::DetectResponse> {
    answer
        .results
        .into_iter()
        .map(|r| pb::DetectResponse {
            width: r.width,
            height: r.height,
            detections: r.output.into_iter().map(detection).collect(),
        })
        .collect()
}

pub fn classify_responses(answer: Answer<Vec<NamedPrediction>>) -> Vec<pb::ClassifyResponse> {
    answer
        .results
        .into_iter()
        .map(|r| pb::ClassifyResponse {
            width: r.width,
            height: r.height,
            predictions: r.output.into_iter().map(prediction).collect(),
        })
        .collect()
}

fn model(m: ModelState) -> pb::Model {
    let rpc = match m.task {
        Task::Detect => "Detect",
        Task::Classify => "Classify",
    };
    let b = m.batching;
    pb::Model {
        name: m.info.name,
        rpc: rpc.into(),
        arch: m.info.arch,
        num_classes: m.info.num_classes as u32,
        device: m.info.device,
        precision: m.info.precision,
        ready: m.ready,
        batching: Some(pb::Batching {
            max_batch_size: b.max_batch_size as u32,
            max_batch_delay_ms: b.max_batch_delay.as_millis() as u32,
            max_queue: b.max_queue as u32,
        }),
    }
}

pub fn models(service: &Service) -> pb::ListModelsResponse {
    let models = service.models().into_iter().map(model).collect();
    pb::ListModelsResponse { models }
}
