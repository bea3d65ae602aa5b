//! Between protobuf messages and the service's types. proto3 cannot tell 0 from unset, so 0
//! means "the default" for every numeric option.

use super::pb;
use crate::labels::{NamedDetection, NamedPrediction};
use crate::model::Named;
use crate::rle::MaskShape;
use crate::service::{
    ClassifyOptions, DetectOptions, ModelInfo, ModelState, Results, Service, Task,
};
use tonic::Status;

/// proto3's empty string: no model named, the default one.
pub fn model_name(model: String) -> Option<String> {
    (!model.is_empty()).then_some(model)
}

pub fn version(info: &ModelInfo) -> pb::ModelVersion {
    pb::ModelVersion {
        name: info.name.clone(),
        version: info.version,
    }
}

/// A Detect or DetectBatch request's options.
pub struct DetectFields {
    pub score_threshold: f32,
    pub max_detections: u32,
    pub labels: Vec<String>,
    pub mask_format: String,
    pub mask_threshold: f32,
}

pub fn detect_options(r: DetectFields) -> DetectOptions {
    DetectOptions {
        score_threshold: (r.score_threshold != 0.0).then_some(f64::from(r.score_threshold)),
        max_detections: (r.max_detections != 0).then_some(i64::from(r.max_detections)),
        labels: (!r.labels.is_empty()).then_some(r.labels),
        mask_format: (!r.mask_format.is_empty()).then_some(r.mask_format),
        mask_threshold: (r.mask_threshold != 0.0).then_some(f64::from(r.mask_threshold)),
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
        mask: d.mask.map(mask),
        keypoints: d
            .keypoints
            .unwrap_or_default()
            .into_iter()
            .map(|k| pb::Keypoint {
                name: k.name,
                x: k.x,
                y: k.y,
                score: k.score,
            })
            .collect(),
    }
}

fn mask(m: MaskShape) -> pb::Mask {
    match m {
        MaskShape::Rle(r) => pb::Mask {
            height: r.size[0],
            width: r.size[1],
            counts: r.counts,
            polygons: Vec::new(),
        },
        MaskShape::Polygons(p) => pb::Mask {
            polygons: p.into_iter().map(|xy| pb::Polygon { xy }).collect(),
            ..Default::default()
        },
    }
}

fn prediction(p: NamedPrediction) -> pb::Prediction {
    pb::Prediction {
        label_id: p.label_id as u32,
        label: p.label,
        score: p.score,
    }
}

/// The service checks a model's task against the request's, so the other task's results
/// would be a bug on this side.
fn other_task() -> Status {
    Status::internal("the model answered for another task")
}

pub fn detect_responses(results: Results) -> Result<Vec<pb::DetectResponse>, Status> {
    let Results::Detections(results) = results else {
        return Err(other_task());
    };
    Ok(results
        .into_iter()
        .map(|r| pb::DetectResponse {
            width: r.width,
            height: r.height,
            detections: r.output.into_iter().map(detection).collect(),
            model: None,
        })
        .collect())
}

pub fn classify_responses(results: Results) -> Result<Vec<pb::ClassifyResponse>, Status> {
    let Results::Predictions(results) = results else {
        return Err(other_task());
    };
    Ok(results
        .into_iter()
        .map(|r| pb::ClassifyResponse {
            width: r.width,
            height: r.height,
            predictions: r.output.into_iter().map(prediction).collect(),
            model: None,
        })
        .collect())
}

fn model(m: ModelState) -> pb::Model {
    let rpc = match m.task {
        Some(Task::Detect) => "Detect",
        Some(Task::Classify) => "Classify",
        None => "",
    };
    let b = m.batching;
    let info = m.info.as_ref();
    let text = |f: fn(&ModelInfo) -> &String| info.map(f).cloned().unwrap_or_default();
    let keypoints = m.keypoints();
    pb::Model {
        name: m.name.clone(),
        rpc: rpc.into(),
        arch: text(|i| &i.arch),
        num_classes: info.map_or(0, |i| i.num_classes as u32),
        device: text(|i| &i.device),
        precision: text(|i| &i.precision),
        ready: m.ready(),
        batching: Some(pb::Batching {
            max_batch_size: b.max_batch_size as u32,
            max_batch_delay_ms: b.max_batch_delay.as_millis() as u32,
            max_queue: b.max_queue as u32,
        }),
        version: m.version.unwrap_or(0),
        task: m.task.map(|t| t.name().to_string()).unwrap_or_default(),
        state: m.state.name().into(),
        error: m.error().unwrap_or_default().into(),
        default: m.default,
        memory_mb: m.memory_mib().unwrap_or(0),
        settings: m
            .settings
            .entries()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        draining: m.draining.clone(),
        outputs: m.outputs().unwrap_or_default(),
        keypoint_names: keypoints.map(|k| k.names.clone()).unwrap_or_default(),
        skeleton: keypoints
            .map(|k| {
                k.skeleton
                    .iter()
                    .map(|&[from, to]| pb::Edge {
                        from: from as u32,
                        to: to as u32,
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

pub fn models(service: &Service) -> pb::ListModelsResponse {
    let models = service.models().into_iter().map(model).collect();
    pb::ListModelsResponse { models }
}
