//! Region proposal network: `RPNHead` and `RegionProposalNetwork.filter_proposals` (eval).

use tch::{Kind, Tensor};

use super::anchors::{grid_anchors, ANCHORS_PER_LOCATION};
use super::detector::DetectorParams;
use super::fpn::FPN_CHANNELS;
use super::layers::{Compute, Conv2d};
use super::ops::batched_nms;
use super::ops::boxes::{clip_to_image, remove_small, BoxCoder};
use crate::weights::VarPath;

const MIN_SIZE: f64 = 1e-3;
const CODER: BoxCoder = BoxCoder { weights: [1.0; 4] };

pub struct RpnHead {
    /// One 3×3 conv + ReLU for v1, two for v2 (`conv.0.0`, `conv.1.0`).
    convs: Vec<Conv2d>,
    cls_logits: Conv2d,
    bbox_pred: Conv2d,
}

impl RpnHead {
    pub fn load(p: &VarPath, depth: usize) -> Self {
        let c = FPN_CHANNELS;
        let a = ANCHORS_PER_LOCATION;
        Self {
            convs: (0..depth)
                .map(|i| Conv2d::load(&p.sub("conv").sub(i).sub(0), c, c, 3, 1, true))
                .collect(),
            cls_logits: Conv2d::load(&p.sub("cls_logits"), c, a, 1, 1, true),
            bbox_pred: Conv2d::load(&p.sub("bbox_pred"), c, a * 4, 1, 1, true),
        }
    }

    /// The shared 3×3 convs take the fast setting; the two 1×1 output convs stay f32 (but in
    /// the same layout), since objectness ranks ~240k anchors whose logits bf16 would tie.
    pub fn prepare(&mut self, c: Compute) {
        self.convs.iter_mut().for_each(|conv| conv.prepare(c));
        let out = Compute {
            kind: Kind::Float,
            ..c
        };
        self.cls_logits.prepare(out);
        self.bbox_pred.prepare(out);
    }

    /// Objectness logits `[N, ΣHWA]` and deltas `[N, ΣHWA, 4]`, flattened level by level in
    /// (y, x, anchor) order to line up with the anchors.
    fn forward(&self, features: &[Tensor]) -> (Tensor, Tensor) {
        let mut logits = Vec::new();
        let mut deltas = Vec::new();
        for f in features {
            let mut t = f.shallow_clone();
            for conv in &self.convs {
                t = conv.forward(&t).relu_();
            }
            let n = f.size()[0];
            // Scores and deltas leave the head in f32: decoding and top-k need it.
            let t = t.to_kind(Kind::Float);
            let l = self.cls_logits.forward(&t);
            logits.push(l.permute([0, 2, 3, 1]).reshape([n, -1]));
            let d = self.bbox_pred.forward(&t);
            let (h, w) = (d.size()[2], d.size()[3]);
            let d = d
                .reshape([n, ANCHORS_PER_LOCATION, 4, h, w])
                .permute([0, 3, 4, 1, 2]);
            deltas.push(d.reshape([n, -1, 4]));
        }
        (Tensor::cat(&logits, 1), Tensor::cat(&deltas, 1))
    }
}

/// Proposals per image (`[≤1000, 4]`, resized-image pixels, best first) for a padded batch.
/// `sizes` are the images' resized sizes before padding; `padded` is the batch's (Hp, Wp).
pub fn propose(
    head: &RpnHead,
    features: &[Tensor],
    sizes: &[(i64, i64)],
    padded: (i64, i64),
    params: &DetectorParams,
) -> Vec<Tensor> {
    let (logits, deltas) = head.forward(features);
    let grids: Vec<(i64, i64)> = features
        .iter()
        .map(|f| (f.size()[2], f.size()[3]))
        .collect();
    let (anchors, counts) = grid_anchors(padded, &grids, logits.device());
    sizes
        .iter()
        .enumerate()
        .map(|(b, &size)| {
            let proposals = CODER
                .decode(&deltas.get(b as i64), &anchors)
                .reshape([-1, 4]);
            filter_proposals(&proposals, &logits.get(b as i64), &counts, size, params)
        })
        .collect()
}

fn filter_proposals(
    proposals: &Tensor,
    logits: &Tensor,
    counts: &[i64],
    (h, w): (i64, i64),
    params: &DetectorParams,
) -> Tensor {
    let device = logits.device();
    let mut top = Vec::new();
    let mut levels = Vec::new();
    let mut offset = 0;
    for (level, &n) in counts.iter().enumerate() {
        // Top-k on the logits of one level, kept 2-D like torchvision's batched call.
        let (_, idx) = logits.narrow(0, offset, n).unsqueeze(0).topk(
            params.rpn_pre_nms_top_n_test.min(n),
            1,
            true,
            true,
        );
        let idx = idx.squeeze_dim(0) + offset;
        levels.push(Tensor::full(
            [idx.size()[0]],
            level as i64,
            (Kind::Int64, device),
        ));
        top.push(idx);
        offset += n;
    }
    let top = Tensor::cat(&top, 0);
    let levels = Tensor::cat(&levels, 0);
    let scores = logits.index_select(0, &top).sigmoid();
    let boxes = clip_to_image(&proposals.index_select(0, &top), h, w);
    let keep = remove_small(&boxes, MIN_SIZE);
    let (boxes, scores, levels) = (
        boxes.index_select(0, &keep),
        scores.index_select(0, &keep),
        levels.index_select(0, &keep),
    );
    // (torchvision also keeps scores >= 0.0 here, which a sigmoid always satisfies.)
    let keep = batched_nms(&boxes, &scores, &levels, params.rpn_nms_thresh);
    let keep = keep.narrow(0, 0, params.rpn_post_nms_top_n_test.min(keep.size()[0]));
    boxes.index_select(0, &keep)
}
