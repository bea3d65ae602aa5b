//! `RoIHeads` in eval: MultiScaleRoIAlign, the box head (v1 TwoMLPHead, v2 conv head), the
//! FastRCNNPredictor and `postprocess_detections`.

use tch::{Kind, Tensor};

use super::detector::DetectorParams;
use super::fpn::FPN_CHANNELS;
use super::layers::{Compute, ConvNorm, Linear, NormKind};
use super::ops::boxes::{area, clip_to_image, remove_small, BoxCoder};
use super::ops::{batched_nms, roi_align};
use crate::weights::VarPath;

/// Output size of the box head's RoIAlign.
pub const POOL: i64 = 7;
const SAMPLING_RATIO: i64 = 2;
const REPRESENTATION: i64 = 1024;
const MIN_SIZE: f64 = 1e-2;
const CODER: BoxCoder = BoxCoder {
    weights: [10.0, 10.0, 5.0, 5.0],
};

/// Boxes, scores and labels of one image, best first, in resized-image pixels.
pub struct RawDetections {
    pub boxes: Tensor,
    pub scores: Tensor,
    pub labels: Tensor,
}

/// MultiScaleRoIAlign over P2..P5 for one image, `pool × pool` per box (sampling ratio 2). The level scales are inferred from this
/// image's own size: torchvision infers them from the first batch it sees and caches them;
/// for one image processed alone the two agree, and detectd's results must not depend on
/// which image came first.
pub fn multiscale_roi_align(
    features: &[Tensor],
    proposals: &Tensor,
    (h, _w): (i64, i64),
    pool: i64,
) -> Tensor {
    let scales: Vec<f64> = features
        .iter()
        .map(|f| infer_scale(f.size()[1], h))
        .collect();
    let k_min = -(scales[0] as f32).log2();
    let k_max = -(scales[scales.len() - 1] as f32).log2();
    let (k_min, k_max) = (k_min as i64, k_max as i64);
    let levels = map_levels(proposals, k_min, k_max);
    let k = proposals.size()[0];
    // Pooled features are f32 whatever the features' dtype: RoIAlign interpolates in f32.
    let mut result = Tensor::zeros(
        [k, FPN_CHANNELS, pool, pool],
        (Kind::Float, features[0].device()),
    );
    for (level, (feature, &scale)) in features.iter().zip(&scales).enumerate() {
        let idx = levels.eq(level as i64).nonzero().squeeze_dim(1);
        if idx.size()[0] == 0 {
            continue;
        }
        let pooled = roi_align(
            feature,
            &proposals.index_select(0, &idx),
            scale,
            pool,
            SAMPLING_RATIO,
        );
        let _ = result.index_copy_(0, &idx, &pooled);
    }
    result
}

/// `2 ** round(log2(feature_h / image_h))`, the log and round in f32 as torchvision does.
fn infer_scale(feature_h: i64, image_h: i64) -> f64 {
    let approx = feature_h as f64 / image_h as f64;
    let exponent = Tensor::from(approx as f32).log2().round().double_value(&[]);
    2f64.powf(exponent)
}

/// torchvision's LevelMapper: canonical box 224 at level 4, eps 1e-6, in f32.
fn map_levels(boxes: &Tensor, k_min: i64, k_max: i64) -> Tensor {
    let s = area(boxes).sqrt();
    let eps = Tensor::from(1e-6f32).to_device(boxes.device());
    let lvl = ((s / 224.0).log2() + 4.0 + eps).floor();
    lvl.clamp(k_min, k_max).to_kind(Kind::Int64) - k_min
}

pub enum BoxHead {
    /// v1 `TwoMLPHead`: fc6, fc7.
    Mlp { fc6: Linear, fc7: Linear },
    /// v2 `FastRCNNConvFCHead`: four conv-BN-ReLU blocks, then one fc at index 5.
    Conv {
        blocks: Vec<ConvNorm>,
        fc: Linear,
        compute: Compute,
    },
}

impl BoxHead {
    pub fn load_mlp(p: &VarPath) -> Self {
        let flat = FPN_CHANNELS * POOL * POOL;
        BoxHead::Mlp {
            fc6: Linear::load(&p.sub("fc6"), flat, REPRESENTATION),
            fc7: Linear::load(&p.sub("fc7"), REPRESENTATION, REPRESENTATION),
        }
    }

    pub fn load_conv(p: &VarPath) -> Self {
        let c = FPN_CHANNELS;
        let norm = Some(NormKind::Batch { eps: 1e-5 });
        let blocks = (0..4)
            .map(|i| ConvNorm::load_sequential(&p.sub(i), c, c, 3, norm))
            .collect();
        let fc = Linear::load(&p.sub(5), c * POOL * POOL, REPRESENTATION);
        BoxHead::Conv {
            blocks,
            fc,
            compute: Compute::EXACT,
        }
    }

    pub fn prepare(&mut self, c: Compute) {
        match self {
            BoxHead::Mlp { fc6, fc7 } => {
                fc6.prepare(c);
                fc7.prepare(c);
            }
            BoxHead::Conv {
                blocks,
                fc,
                compute,
            } => {
                blocks.iter_mut().for_each(|b| b.prepare(c));
                fc.prepare(c);
                *compute = c;
            }
        }
    }

    /// Pooled f32 features `[K, 256, 7, 7]` → box features `[K, 1024]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            BoxHead::Mlp { fc6, fc7 } => fc7.forward(&fc6.forward(&x.flatten(1, -1)).relu()).relu(),
            BoxHead::Conv {
                blocks,
                fc,
                compute,
            } => {
                let mut x = compute.input(x);
                for block in blocks {
                    x = block.forward(&x).relu();
                }
                fc.forward(&x.flatten(1, -1)).relu()
            }
        }
    }
}

/// `FastRCNNPredictor`: class logits and per-class box deltas.
pub struct Predictor {
    pub cls_score: Linear,
    pub bbox_pred: Linear,
}

impl Predictor {
    /// The predictor is tiny (1024 → classes) and sets scores and boxes: it stays f32.
    pub fn prepare(&mut self, c: Compute) {
        let out = Compute {
            kind: Kind::Float,
            ..c
        };
        self.cls_score.prepare(out);
        self.bbox_pred.prepare(out);
    }

    pub fn load(p: &VarPath, num_classes: i64) -> Self {
        Self {
            cls_score: Linear::load(&p.sub("cls_score"), REPRESENTATION, num_classes),
            bbox_pred: Linear::load(&p.sub("bbox_pred"), REPRESENTATION, num_classes * 4),
        }
    }
}

/// `postprocess_detections` for one image: per-class boxes, scores above `score_thresh`,
/// per-class NMS, at most `box_detections_per_img`, best first.
pub fn postprocess(
    logits: &Tensor,
    deltas: &Tensor,
    proposals: &Tensor,
    (h, w): (i64, i64),
    score_thresh: f64,
    params: &DetectorParams,
) -> RawDetections {
    let num_classes = logits.size()[1];
    let boxes = clip_to_image(&CODER.decode(deltas, proposals), h, w);
    let scores = logits.softmax(-1, Kind::Float);
    let labels = Tensor::arange(num_classes, (Kind::Int64, logits.device()))
        .view([1, -1])
        .expand_as(&scores);
    // Drop the background column, then flatten proposal-major.
    let boxes = boxes.narrow(1, 1, num_classes - 1).reshape([-1, 4]);
    let scores = scores.narrow(1, 1, num_classes - 1).reshape([-1]);
    let labels = labels.narrow(1, 1, num_classes - 1).reshape([-1]);
    let select = |idx: &Tensor, b: &Tensor, s: &Tensor, l: &Tensor| {
        (
            b.index_select(0, idx),
            s.index_select(0, idx),
            l.index_select(0, idx),
        )
    };
    let idx = scores.gt(score_thresh).nonzero().squeeze_dim(1);
    let (boxes, scores, labels) = select(&idx, &boxes, &scores, &labels);
    let idx = remove_small(&boxes, MIN_SIZE);
    let (boxes, scores, labels) = select(&idx, &boxes, &scores, &labels);
    let keep = batched_nms(&boxes, &scores, &labels, params.box_nms_thresh);
    let keep = keep.narrow(0, 0, params.box_detections_per_img.min(keep.size()[0]));
    let (boxes, scores, labels) = select(&keep, &boxes, &scores, &labels);
    RawDetections {
        boxes,
        scores,
        labels,
    }
}
