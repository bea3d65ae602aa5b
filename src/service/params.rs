//! Request options shared by both edges: defaults, ranges and the label filter, so HTTP and
//! gRPC accept and refuse exactly the same things.

use std::collections::HashSet;

use super::ModelInfo;
use super::ServiceError;
use crate::labels::{KeypointSchema, Labels, NamedDetection, NamedKeypoint};
use crate::model::detector::{DetectorParams, MASK_THRESHOLD};
use crate::model::Detection;
use crate::rle::MaskShape;

pub const DEFAULT_TOP_K: i64 = 5;
pub const MAX_TOP_K: i64 = 1000;

/// Detection options as sent; `None` takes the default.
#[derive(Debug, Clone, Default)]
pub struct DetectOptions {
    pub score_threshold: Option<f64>,
    pub max_detections: Option<i64>,
    /// Keep only these class names; every name must exist.
    pub labels: Option<Vec<String>>,
    /// How a mask model's masks come back (`rle`, `polygon`, `none`).
    pub mask_format: Option<String>,
    /// The probability a mask pixel must exceed (0..1, default 0.5).
    pub mask_threshold: Option<f64>,
}

/// How masks are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskFormat {
    /// COCO's compressed run-length encoding (the default).
    Rle,
    /// Outer contours as polygons.
    Polygon,
    /// No masks; the mask head does not run.
    None,
}

impl MaskFormat {
    pub const NAMES: [&'static str; 3] = ["rle", "polygon", "none"];

    pub fn parse(name: Option<&str>) -> Result<Self, ServiceError> {
        match name.unwrap_or("rle") {
            "rle" => Ok(MaskFormat::Rle),
            "polygon" => Ok(MaskFormat::Polygon),
            "none" => Ok(MaskFormat::None),
            other => Err(ServiceError::InvalidParameter(format!(
                "mask_format must be one of rle, polygon, none; got {other:?}"
            ))),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ClassifyOptions {
    pub top_k: Option<i64>,
}

/// Detection options checked against the model's labels.
pub(crate) struct DetectPlan {
    pub threshold: f64,
    /// None when masks are not wanted (or the model has none).
    pub mask_threshold: Option<f64>,
    mask_format: MaskFormat,
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
        let mask_format = MaskFormat::parse(self.mask_format.as_deref())?;
        let mask_threshold = in_range(
            "mask_threshold",
            self.mask_threshold,
            MASK_THRESHOLD,
            0.0,
            1.0,
        )?;
        Ok(DetectPlan {
            threshold,
            mask_threshold: (mask_format != MaskFormat::None).then_some(mask_threshold),
            mask_format,
            max_detections,
            keep,
        })
    }
}

impl DetectPlan {
    /// The detections the request asked for, labelled, with masks in the form asked for and
    /// keypoints named.
    pub(crate) fn select(
        &self,
        dets: &[Detection],
        labels: &Labels,
        info: &ModelInfo,
    ) -> Vec<NamedDetection> {
        let keypoints = info.keypoints.as_ref();
        dets.iter()
            .filter(|d| self.keep.as_ref().is_none_or(|k| k.contains(&d.label)))
            .take(self.max_detections)
            .map(|d| name_detection(d, labels, self.mask_format, keypoints))
            .collect()
    }
}

/// A detection with its class name, its mask in `format` and its keypoints named: what the
/// service answers and the CLI writes.
pub fn name_detection(
    d: &Detection,
    labels: &Labels,
    format: MaskFormat,
    keypoints: Option<&KeypointSchema>,
) -> NamedDetection {
    let mut named = labels.detection(d);
    named.mask = d.mask.as_ref().and_then(|m| match format {
        MaskFormat::Rle => Some(MaskShape::Rle(m.to_coco())),
        MaskFormat::Polygon => Some(MaskShape::Polygons(m.polygons())),
        MaskFormat::None => None,
    });
    named.keypoints = d.keypoints.as_ref().map(|kps| {
        kps.iter()
            .enumerate()
            .map(|(i, k)| NamedKeypoint {
                name: keypoints
                    .and_then(|s| s.names.get(i))
                    .cloned()
                    .unwrap_or_else(|| format!("keypoint_{i}")),
                x: k.x,
                y: k.y,
                score: k.score,
            })
            .collect()
    });
    named
}

impl ClassifyOptions {
    /// How many classes to return, at most the model's class count.
    pub(crate) fn top_k(&self, num_classes: i64) -> Result<usize, ServiceError> {
        let k = in_range("top_k", self.top_k, DEFAULT_TOP_K, 1, MAX_TOP_K)?;
        Ok(k.min(num_classes) as usize)
    }
}
