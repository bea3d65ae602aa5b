//! Request options shared by both edges: defaults, ranges and the label filter, so HTTP and
//! gRPC accept and refuse exactly the same things.

use std::collections::HashSet;

use super::ServiceError;
use crate::labels::{Labels, NamedDetection};
use crate::model::detector::DetectorParams;
use crate::model::Detection;

pub const DEFAULT_TOP_K: i64 = 5;
pub const MAX_TOP_K: i64 = 1000;

/// Detection options as sent; `None` takes the default.
#[derive(Debug, Clone, Default)]
pub struct DetectOptions {
    pub score_threshold: Option<f64>,
    pub max_detections: Option<i64>,
    /// Keep only these class names; every name must exist.
    pub labels: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default)]
pub struct ClassifyOptions {
    pub top_k: Option<i64>,
}

/// Detection options checked against the model's labels.
pub(crate) struct DetectPlan {
    pub threshold: f64,
    max_detections: usize,
    keep: Option<HashSet<i64>>,
}

fn in_range<T: PartialOrd + std::fmt::Display + Copy>(
    name: &str,
    v: Option<T>,
    default: T,
    lo: T,
    hi: T,
) -> Result<T, ServiceError> {
    let v = v.unwrap_or(default);
    if !(lo..=hi).contains(&v) {
        return Err(ServiceError::InvalidParameter(format!(
            "{name} must be within {lo}..={hi}, got {v}"
        )));
    }
    Ok(v)
}

/// The label ids that `names` select.
fn label_ids(names: &[String], labels: &Labels) -> Result<HashSet<i64>, ServiceError> {
    let mut ids = HashSet::new();
    let mut unknown = Vec::new();
    for name in names {
        let found: Vec<i64> = (0..labels.len() as i64)
            .filter(|&i| labels.name(i) == name)
            .collect();
        if found.is_empty() {
            unknown.push(name.as_str());
        }
        ids.extend(found);
    }
    if !unknown.is_empty() {
        return Err(ServiceError::InvalidParameter(format!(
            "unknown labels: {}",
            unknown.join(", ")
        )));
    }
    Ok(ids)
}

impl DetectOptions {
    /// Checked against the model's labels; the defaults are the model's `box_score_thresh`
    /// and `box_detections_per_img`.
    pub(crate) fn plan(
        &self,
        labels: &Labels,
        params: &DetectorParams,
    ) -> Result<DetectPlan, ServiceError> {
        let threshold = in_range(
            "score_threshold",
            self.score_threshold,
            params.box_score_thresh,
            0.0,
            1.0,
        )?;
        let most = params.box_detections_per_img;
        let max_detections =
            in_range("max_detections", self.max_detections, most, 1, most)? as usize;
        let keep = match &self.labels {
            Some(names) if !names.is_empty() => Some(label_ids(names, labels)?),
            _ => None,
        };
        Ok(DetectPlan {
            threshold,
            max_detections,
            keep,
        })
    }
}

impl DetectPlan {
    /// The detections the request asked for, labelled.
    pub(crate) fn select(&self, dets: &[Detection], labels: &Labels) -> Vec<NamedDetection> {
        dets.iter()
            .filter(|d| self.keep.as_ref().is_none_or(|k| k.contains(&d.label)))
            .take(self.max_detections)
            .map(|d| labels.detection(d))
            .collect()
    }
}

impl ClassifyOptions {
    /// How many classes to return, at most the model's class count.
    pub(crate) fn top_k(&self, num_classes: i64) -> Result<usize, ServiceError> {
        let k = in_range("top_k", self.top_k, DEFAULT_TOP_K, 1, MAX_TOP_K)?;
        Ok(k.min(num_classes) as usize)
    }
}
