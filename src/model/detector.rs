//! `torchvision.models.detection.FasterRCNN` with a ResNet-50-FPN backbone, v1 and v2.

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::fpn::Fpn;
use super::instance::{
    heatmap_to_keypoints, mask_probabilities, paste_boxes, paste_mask, KeypointBranch, MaskBranch,
    POOL as INSTANCE_POOL,
};
use super::layers::{Compute, NormKind};
use super::resnet::ResNetBody;
use super::roi_heads::{
    multiscale_roi_align, postprocess, BoxHead, Predictor, RawDetections, POOL as BOX_POOL,
};
use super::rpn::{propose, RpnHead};
use super::transform::{pad_batch, DetectorResize, Prepared};
use super::{guard, ModelError, Named};
use crate::rle::Rle;
use crate::weights::{Loader, StateDict, WeightsError};

/// torchvision's `box_detections_per_img` default.
pub const MAX_DETECTIONS: i64 = 100;
/// torchvision's `box_score_thresh` default: detections scoring at or below it are dropped
/// before NMS. The default everywhere a score threshold is not given (server, CLI, bench,
/// compare).
pub const BOX_SCORE_THRESH: f64 = 0.05;
/// The probability a pasted mask pixel must exceed to be in the mask (torchvision's
/// `mask_threshold` in its reference scripts and COCO evaluation: `masks > 0.5`).
pub const MASK_THRESHOLD: f64 = 0.5;

/// The arguments of torchvision's `FasterRCNN` constructor that change its answers at
/// inference, under torchvision's names, with its defaults. A model built with other values
/// answers what torchvision built with the same arguments answers.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct DetectorParams {
    pub min_size: i64,
    pub max_size: i64,
    pub rpn_pre_nms_top_n_test: i64,
    pub rpn_post_nms_top_n_test: i64,
    pub rpn_nms_thresh: f64,
    /// The score threshold when a request gives none.
    pub box_score_thresh: f64,
    pub box_nms_thresh: f64,
    pub box_detections_per_img: i64,
}

impl Default for DetectorParams {
    fn default() -> Self {
        Self {
            min_size: 800,
            max_size: 1333,
            rpn_pre_nms_top_n_test: 1000,
            rpn_post_nms_top_n_test: 1000,
            rpn_nms_thresh: 0.7,
            box_score_thresh: BOX_SCORE_THRESH,
            box_nms_thresh: 0.5,
            box_detections_per_img: MAX_DETECTIONS,
        }
    }
}

impl DetectorParams {
    pub fn resize(&self) -> DetectorResize {
        DetectorResize {
            min_size: self.min_size,
            max_size: self.max_size,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// `fasterrcnn_resnet50_fpn`: TwoMLPHead, FPN without norm, one RPN conv.
    V1,
    /// `fasterrcnn_resnet50_fpn_v2`: BatchNorm everywhere, conv box head, two RPN convs.
    V2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArchChoice {
    /// Read from the checkpoint's keys.
    Auto,
    V1,
    V2,
}

super::named::named!(Arch { V1 => "v1", V2 => "v2" });

/// Which member of torchvision's R-CNN family: what the RoI heads add to boxes. Read from
/// the checkpoint's keys (a mask or a keypoint predictor).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    FasterRcnn,
    MaskRcnn,
    KeypointRcnn,
}

super::named::named!(Family {
    FasterRcnn => "fasterrcnn",
    MaskRcnn => "maskrcnn",
    KeypointRcnn => "keypointrcnn",
});
super::named::named!(ArchChoice { Auto => "auto", V1 => "v1", V2 => "v2" });

#[derive(Clone, Debug)]
pub struct DetectorConfig {
    pub arch: ArchChoice,
    /// eps of v1's FrozenBatchNorm2d. None: 0.0, as the official COCO weights run.
    pub frozen_bn_eps: Option<f64>,
    pub device: Device,
    /// How to compute; `Compute::EXACT` is torchvision's f32 arithmetic.
    pub compute: Compute,
    pub params: DetectorParams,
}

pub struct FasterRcnn {
    pub arch: Arch,
    pub family: Family,
    pub num_classes: i64,
    pub norm: NormKind,
    pub device: Device,
    pub compute: Compute,
    /// Most images of one padded size that share a forward pass. On the CPU a batched pass
    /// is no faster than one image at a time and holds that many times the activations
    /// (measured at 800×1216, fp32, 2 threads: batch 4 took 17.0 s against 4 × 3.2 s), so
    /// the CPU runs images one by one (and the server's batcher hands it one job at a time);
    /// a GPU runs whole groups. Results are the same either way at 800×1088 (tested), not
    /// bitwise at every size (see the README's *Exactness*).
    pub images_per_forward: usize,
    pub params: DetectorParams,
    body: ResNetBody,
    fpn: Fpn,
    rpn: RpnHead,
    box_head: BoxHead,
    predictor: Predictor,
    mask: Option<MaskBranch>,
    keypoints: Option<KeypointBranch>,
}

/// One image's detections in original-image pixels, best first.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Detection {
    pub bbox: [f32; 4],
    pub score: f32,
    pub label: i64,
    /// Mask R-CNN: the pasted mask above the request's threshold, over the whole image.
    pub mask: Option<Rle>,
    /// Keypoint R-CNN: each keypoint in the model's order.
    pub keypoints: Option<Vec<Keypoint>>,
}

/// A keypoint in original-image pixels, scored by its heatmap's value there (a logit).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Keypoint {
    pub x: f32,
    pub y: f32,
    pub score: f32,
}

/// Intermediate results kept for parity tests.
pub struct Trace {
    pub proposals: Tensor,
    pub roi_features: Tensor,
    /// Mask R-CNN's mask logits `[K, classes, 28, 28]`.
    pub mask_logits: Option<Tensor>,
    /// Keypoint R-CNN's heatmaps `[K, keypoints, 56, 56]`.
    pub keypoint_logits: Option<Tensor>,
}

/// One image's detections with, when asked for, its intermediate results.
pub type Traced = (Vec<Detection>, Option<Trace>);

/// A request to detect in one prepared image.
pub struct DetectRequest<'a> {
    pub image: &'a Prepared,
    pub score_threshold: f64,
    /// A mask model's pixel threshold; None: no masks (the mask head does not run).
    pub mask_threshold: Option<f64>,
}

impl<'a> DetectRequest<'a> {
    /// One request per image, all with the same score threshold.
    pub fn each(images: &'a [Prepared], score_threshold: f64) -> Vec<Self> {
        images
            .iter()
            .map(|image| DetectRequest {
                image,
                score_threshold,
                mask_threshold: Some(MASK_THRESHOLD),
            })
            .collect()
    }
}

impl FasterRcnn {
    pub fn load(path: &Path, config: &DetectorConfig) -> Result<Self, ModelError> {
        let mut sd = StateDict::load(path)?;
        rename_legacy_keys(&mut sd);
        let arch = detect_arch(&sd, config.arch)?;
        let family = family_of(&sd);
        // A Keypoint R-CNN's predictor weight is `[512, keypoints, 4, 4]`.
        let num_keypoints = sd.shape(KEYPOINT_PREDICTOR).map(|s| s[1]);
        let num_classes = sd
            .shape("roi_heads.box_predictor.cls_score.weight")
            .map(|s| s[0])
            .ok_or_else(|| unrecognized(&sd, "no roi_heads.box_predictor.cls_score.weight"))?;
        let norm = body_norm(&sd, arch, config.frozen_bn_eps);
        let loader = Loader::new(sd, &format!("Faster R-CNN {arch:?}"), config.device);
        let model = Self::build(
            &loader,
            (arch, family),
            num_classes,
            num_keypoints,
            norm,
            config.device,
        );
        loader.finish()?;
        let mut model = model;
        model.params = config.params;
        if config.compute != Compute::EXACT {
            guard(|| model.prepare(config.compute))?;
        }
        Ok(model)
    }

    fn build(
        loader: &Loader,
        (arch, family): (Arch, Family),
        num_classes: i64,
        num_keypoints: Option<i64>,
        norm: NormKind,
        device: Device,
    ) -> Self {
        let root = loader.root();
        let fpn_norm = (arch == Arch::V2).then_some(NormKind::Batch { eps: 1e-5 });
        let roi = root.sub("roi_heads");
        Self {
            arch,
            family,
            num_classes,
            norm,
            device,
            compute: Compute::EXACT,
            images_per_forward: if device.is_cuda() { usize::MAX } else { 1 },
            params: DetectorParams::default(),
            body: ResNetBody::load(&root.sub("backbone").sub("body"), norm),
            fpn: Fpn::load(
                &root.sub("backbone").sub("fpn"),
                &ResNetBody::channels(),
                fpn_norm,
            ),
            rpn: RpnHead::load(
                &root.sub("rpn").sub("head"),
                if arch == Arch::V2 { 2 } else { 1 },
            ),
            box_head: match arch {
                Arch::V1 => BoxHead::load_mlp(&roi.sub("box_head")),
                Arch::V2 => BoxHead::load_conv(&roi.sub("box_head")),
            },
            predictor: Predictor::load(&roi.sub("box_predictor"), num_classes),
            mask: (family == Family::MaskRcnn)
                .then(|| MaskBranch::load(&roi, num_classes, fpn_norm)),
            keypoints: num_keypoints.map(|n| KeypointBranch::load(&roi, n)),
        }
    }

    /// torchvision's builder name, e.g. `maskrcnn_resnet50_fpn_v2` (v1 named `_v1`).
    pub fn arch_name(&self) -> String {
        format!("{}_resnet50_fpn_{}", self.family.name(), self.arch.name())
    }

    /// Keypoints per detection, for a Keypoint R-CNN.
    pub fn num_keypoints(&self) -> Option<i64> {
        self.keypoints.as_ref().map(|k| k.num_keypoints)
    }

    /// Casts and lays out the weights for `c` (folding norms if asked); the pre- and
    /// postprocessing stay f32.
    fn prepare(&mut self, c: Compute) {
        self.body.prepare(c);
        self.fpn.prepare(c);
        self.rpn.prepare(c);
        self.box_head.prepare(c);
        self.predictor.prepare(c);
        if let Some(m) = &mut self.mask {
            m.prepare(c);
        }
        if let Some(k) = &mut self.keypoints {
            k.prepare(c);
        }
        self.compute = c;
    }

    /// Detections for each image, in input order. Images are batched only with images of the
    /// same padded size, so each result equals the image's single-image result.
    pub fn detect(&self, requests: &[DetectRequest]) -> Result<Vec<Vec<Detection>>, ModelError> {
        let traced = self.detect_traced(requests, false)?;
        Ok(traced.into_iter().map(|(d, _)| d).collect())
    }

    /// As `detect`, also returning the RPN proposals and RoIAlign features when `trace`.
    pub fn detect_traced(
        &self,
        requests: &[DetectRequest],
        trace: bool,
    ) -> Result<Vec<Traced>, ModelError> {
        guard(|| {
            let _no_grad = tch::no_grad_guard();
            let mut groups: BTreeMap<(i64, i64), Vec<usize>> = BTreeMap::new();
            for (i, r) in requests.iter().enumerate() {
                groups.entry(r.image.padded()).or_default().push(i);
            }
            let mut out: Vec<Option<Traced>> = requests.iter().map(|_| None).collect();
            let chunk = self.images_per_forward.max(1);
            for (padded, members) in groups {
                for members in members.chunks(chunk) {
                    let group: Vec<&DetectRequest> =
                        members.iter().map(|&i| &requests[i]).collect();
                    for (&i, result) in members
                        .iter()
                        .zip(self.forward_group(&group, padded, trace))
                    {
                        out[i] = Some(result);
                    }
                }
            }
            out.into_iter()
                .map(|r| r.expect("every image belongs to one group"))
                .collect()
        })
    }

    fn forward_group(
        &self,
        group: &[&DetectRequest],
        padded: (i64, i64),
        trace: bool,
    ) -> Vec<Traced> {
        let images: Vec<&Prepared> = group.iter().map(|r| r.image).collect();
        let batch = self
            .compute
            .input(&pad_batch(&images, padded).to_device(self.device));
        let features = self.fpn.forward(&self.body.forward(&batch));
        let sizes: Vec<(i64, i64)> = images.iter().map(|p| p.resized).collect();
        let proposals = propose(&self.rpn, &features, &sizes, padded, &self.params);
        group
            .iter()
            .enumerate()
            .map(|(b, r)| {
                let per_image: Vec<Tensor> =
                    features[..4].iter().map(|f| f.get(b as i64)).collect();
                let pooled =
                    multiscale_roi_align(&per_image, &proposals[b], r.image.resized, BOX_POOL);
                let x = self.box_head.forward(&pooled);
                let logits = self.predictor.cls_score.forward(&x).to_kind(Kind::Float);
                let deltas = self.predictor.bbox_pred.forward(&x).to_kind(Kind::Float);
                let raw = postprocess(
                    &logits,
                    &deltas,
                    &proposals[b],
                    r.image.resized,
                    r.score_threshold,
                    &self.params,
                );
                let boxes = original_boxes(&raw.boxes, r.image);
                let mut dets = to_detections(&boxes, &raw);
                let (mask_logits, keypoint_logits) =
                    self.instances(&per_image, &raw, &boxes, r, &mut dets);
                let t = trace.then(|| Trace {
                    proposals: proposals[b].shallow_clone(),
                    roi_features: pooled,
                    mask_logits,
                    keypoint_logits,
                });
                (dets, t)
            })
            .collect()
    }
}

impl FasterRcnn {
    /// Bytes of the largest activation of a CPU pass over `images` images at the largest
    /// input the resize makes (the stem's and layer1's outputs: 64 bytes per input pixel,
    /// `64 × H/2 × W/2` f32); 0 on a GPU, whose activations are not in this process's heap.
    pub fn largest_activation(&self, images: usize) -> usize {
        if self.device.is_cuda() {
            return 0;
        }
        let (h, w) = self.params.resize().largest_padded();
        let per_image = 64 * (h.max(0) as usize) * (w.max(0) as usize);
        per_image * images.min(self.images_per_forward).max(1)
    }

    /// Mask R-CNN's masks and Keypoint R-CNN's keypoints for the final detections, as
    /// torchvision's RoIHeads and `postprocess` make them; the logits for a trace.
    fn instances(
        &self,
        features: &[Tensor],
        raw: &RawDetections,
        boxes: &Tensor,
        request: &DetectRequest,
        dets: &mut [Detection],
    ) -> (Option<Tensor>, Option<Tensor>) {
        if dets.is_empty() {
            return (None, None);
        }
        let image = request.image;
        let pool = || multiscale_roi_align(features, &raw.boxes, image.resized, INSTANCE_POOL);
        let mask_logits = match (&self.mask, request.mask_threshold) {
            (Some(branch), Some(threshold)) => {
                let logits = branch.forward(&pool());
                add_masks(&logits, raw, boxes, image, threshold, dets);
                Some(logits)
            }
            _ => None,
        };
        let keypoint_logits = self.keypoints.as_ref().map(|branch| {
            let maps = branch.forward(&pool());
            add_keypoints(&maps, raw, image, dets);
            maps
        });
        (mask_logits, keypoint_logits)
    }
}

/// `maskrcnn_inference`, then `paste_masks_in_image` and the threshold one detection at a
/// time, each kept as its RLE.
fn add_masks(
    logits: &Tensor,
    raw: &RawDetections,
    boxes: &Tensor,
    image: &Prepared,
    threshold: f64,
    dets: &mut [Detection],
) {
    let probs = mask_probabilities(logits, &raw.labels);
    let pixel_boxes = paste_boxes(boxes, probs.size()[1]).to_device(Device::Cpu);
    let pixel_boxes = Vec::<i64>::try_from(pixel_boxes.reshape([-1])).expect("i64 boxes");
    for (i, (det, b)) in dets.iter_mut().zip(pixel_boxes.chunks_exact(4)).enumerate() {
        let b = [b[0], b[1], b[2], b[3]];
        let pasted = paste_mask(&probs.get(i as i64), b, image.original, threshold);
        det.mask = Some(pasted.to_rle(image.original));
    }
}

/// `heatmaps_to_keypoints` on the resized-image boxes, then `resize_keypoints`.
fn add_keypoints(maps: &Tensor, raw: &RawDetections, image: &Prepared, dets: &mut [Detection]) {
    let ratios = Tensor::from_slice(&ratios(image)[..2]).to_device(maps.device());
    for (i, det) in dets.iter_mut().enumerate() {
        let i = i as i64;
        let kp = heatmap_to_keypoints(&maps.get(i), &raw.boxes.get(i));
        let xy = (kp.xy * &ratios).to_device(Device::Cpu);
        let xy = Vec::<f32>::try_from(xy.reshape([-1])).expect("f32 keypoints");
        let scores = Vec::<f32>::try_from(kp.scores.to_device(Device::Cpu)).expect("f32 scores");
        let points = xy.chunks_exact(2).zip(scores);
        det.keypoints = Some(
            points
                .map(|(p, score)| Keypoint {
                    x: p[0],
                    y: p[1],
                    score,
                })
                .collect(),
        );
    }
}

/// `resize_boxes`' per-axis ratios `f32(original) / f32(resized)`, as `[w, h, w, h]`.
fn ratios(image: &Prepared) -> [f32; 4] {
    let ratio_h = image.original.0 as f32 / image.resized.0 as f32;
    let ratio_w = image.original.1 as f32 / image.resized.1 as f32;
    [ratio_w, ratio_h, ratio_w, ratio_h]
}

/// Boxes `[K, 4]` back to original pixels.
fn original_boxes(boxes: &Tensor, image: &Prepared) -> Tensor {
    boxes * Tensor::from_slice(&ratios(image)).to_device(boxes.device())
}

fn to_detections(boxes: &Tensor, raw: &RawDetections) -> Vec<Detection> {
    let boxes =
        Vec::<f32>::try_from(boxes.to_device(Device::Cpu).reshape([-1])).expect("f32 boxes");
    let scores = Vec::<f32>::try_from(raw.scores.to_device(Device::Cpu)).expect("f32 scores");
    let labels = Vec::<i64>::try_from(raw.labels.to_device(Device::Cpu)).expect("i64 labels");
    boxes
        .chunks_exact(4)
        .zip(scores)
        .zip(labels)
        .map(|((b, score), label)| Detection {
            bbox: [b[0], b[1], b[2], b[3]],
            score,
            label,
            ..Detection::default()
        })
        .collect()
}

fn unrecognized(sd: &StateDict, reason: &str) -> WeightsError {
    WeightsError::Unrecognized {
        path: sd.path.clone(),
        reason: format!("not a Faster R-CNN checkpoint: {reason}"),
    }
}

/// Checkpoints saved before torchvision 0.13 name FPN blocks `inner_blocks.{i}.weight` and the
/// RPN conv `rpn.head.conv.weight`; torchvision renames them on load, and so does detectd.
pub fn rename_legacy_keys(sd: &mut StateDict) {
    for family in ["inner_blocks", "layer_blocks"] {
        for i in 0..4 {
            let old = format!("backbone.fpn.{family}.{i}.");
            for param in ["weight", "bias"] {
                if sd.has(&format!("{old}{param}")) {
                    sd.rename_prefix(&format!("{old}{param}"), &format!("{old}0.{param}"));
                }
            }
        }
    }
    // MaskRCNNHeads before its _version 2: `mask_fcn{i+1}` for `{i}.0`.
    for i in 0..4 {
        for param in ["weight", "bias"] {
            let old = format!("roi_heads.mask_head.mask_fcn{}.{param}", i + 1);
            if sd.has(&old) {
                sd.rename_prefix(&old, &format!("roi_heads.mask_head.{i}.0.{param}"));
            }
        }
    }
    for param in ["weight", "bias"] {
        let old = format!("rpn.head.conv.{param}");
        if sd.has(&old) {
            sd.rename_prefix(&old, &format!("rpn.head.conv.0.0.{param}"));
        }
    }
}

fn family_of(sd: &StateDict) -> Family {
    if sd.has("roi_heads.mask_predictor.mask_fcn_logits.weight") {
        Family::MaskRcnn
    } else if sd.has(KEYPOINT_PREDICTOR) {
        Family::KeypointRcnn
    } else {
        Family::FasterRcnn
    }
}

const KEYPOINT_PREDICTOR: &str = "roi_heads.keypoint_predictor.kps_score_lowres.weight";

fn detect_arch(sd: &StateDict, choice: ArchChoice) -> Result<Arch, WeightsError> {
    let found = if sd.has("roi_heads.box_head.fc6.weight") {
        Arch::V1
    } else if sd.has("roi_heads.box_head.5.weight") {
        Arch::V2
    } else {
        return Err(unrecognized(
            sd,
            "no roi_heads.box_head.fc6 (v1) or roi_heads.box_head.5 (v2) keys",
        ));
    };
    match choice {
        ArchChoice::Auto => Ok(found),
        ArchChoice::V1 if found == Arch::V1 => Ok(found),
        ArchChoice::V2 if found == Arch::V2 => Ok(found),
        _ => Err(WeightsError::Unrecognized {
            path: sd.path.clone(),
            reason: format!(
                "--arch {choice:?} was asked for, but the file holds a {found:?} detector"
            ),
        }),
    }
}

/// v2 and BatchNorm-built v1 checkpoints carry `num_batches_tracked`; FrozenBatchNorm2d ones
/// (the official v1 weights and anything fine-tuned from them) do not.
fn body_norm(sd: &StateDict, arch: Arch, frozen_eps: Option<f64>) -> NormKind {
    let batch_norm = arch == Arch::V2 || sd.has("backbone.body.bn1.num_batches_tracked");
    match (batch_norm, frozen_eps) {
        (_, Some(eps)) if arch == Arch::V1 => NormKind::Frozen { eps },
        (true, _) => NormKind::Batch { eps: 1e-5 },
        (false, eps) => NormKind::Frozen {
            eps: eps.unwrap_or(0.0),
        },
    }
}
