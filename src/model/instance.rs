//! Mask R-CNN's and Keypoint R-CNN's extra RoI heads in eval, run on the final detections as
//! torchvision runs them: a 14×14 MultiScaleRoIAlign, the head, the predictor, then
//! `maskrcnn_inference` and `paste_masks_in_image`, or `heatmaps_to_keypoints` and
//! `resize_keypoints`. The same ops in the same order as torchvision, so the same bits.

use tch::{Kind, Tensor};

use super::fpn::FPN_CHANNELS;
use super::layers::{Compute, Conv2d, ConvNorm, NormKind};
use crate::rle::Rle;
use crate::weights::VarPath;

/// Output size of the mask and keypoint RoIAlign (`MultiScaleRoIAlign(output_size=14)`).
pub const POOL: i64 = 14;
const MASK_CHANNELS: i64 = 256;
const KEYPOINT_CHANNELS: i64 = 512;
const KEYPOINT_LAYERS: i64 = 8;
/// `paste_masks_in_image`'s padding: the 28×28 mask gains a zero border before pasting.
const PASTE_PADDING: i64 = 1;

/// `nn.ConvTranspose2d` (square kernel, groups 1, dilation 1, no output padding).
pub struct ConvTranspose2d {
    weight: Tensor,
    bias: Tensor,
    stride: i64,
    padding: i64,
}

impl ConvTranspose2d {
    pub fn load(p: &VarPath, cin: i64, cout: i64, k: i64, stride: i64, padding: i64) -> Self {
        Self {
            weight: p.get("weight", &[cin, cout, k, k]),
            bias: p.get("bias", &[cout]),
            stride,
            padding,
        }
    }

    pub fn prepare(&mut self, c: Compute) {
        self.weight = self.weight.to_kind(c.kind);
        self.bias = self.bias.to_kind(c.kind);
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.conv_transpose2d(
            &self.weight,
            Some(&self.bias),
            [self.stride; 2],
            [self.padding; 2],
            [0, 0],
            1,
            [1, 1],
        )
    }
}

/// `MaskRCNNHeads` (four 3×3 conv blocks; v2 with BatchNorm) and `MaskRCNNPredictor`.
pub struct MaskBranch {
    blocks: Vec<ConvNorm>,
    conv5_mask: ConvTranspose2d,
    mask_fcn_logits: Conv2d,
    compute: Compute,
}

impl MaskBranch {
    /// `roi` is `roi_heads`; `norm` is v2's BatchNorm, none for v1.
    pub fn load(roi: &VarPath, num_classes: i64, norm: Option<NormKind>) -> Self {
        let head = roi.sub("mask_head");
        let pred = roi.sub("mask_predictor");
        let c = MASK_CHANNELS;
        let blocks = (0..4)
            .map(|i| {
                let cin = if i == 0 { FPN_CHANNELS } else { c };
                ConvNorm::load_sequential(&head.sub(i), cin, c, 3, norm)
            })
            .collect();
        Self {
            blocks,
            conv5_mask: ConvTranspose2d::load(&pred.sub("conv5_mask"), c, c, 2, 2, 0),
            mask_fcn_logits: Conv2d::load(&pred.sub("mask_fcn_logits"), c, num_classes, 1, 1, true),
            compute: Compute::EXACT,
        }
    }

    pub fn prepare(&mut self, c: Compute) {
        self.blocks.iter_mut().for_each(|b| b.prepare(c));
        self.conv5_mask.prepare(c);
        self.mask_fcn_logits.prepare(c);
        self.compute = c;
    }

    /// Pooled f32 features `[K, 256, 14, 14]` → mask logits `[K, classes, 28, 28]` in f32.
    pub fn forward(&self, pooled: &Tensor) -> Tensor {
        let mut x = self.compute.input(pooled);
        for block in &self.blocks {
            x = block.forward(&x).relu();
        }
        let x = self.conv5_mask.forward(&x).relu();
        self.mask_fcn_logits.forward(&x).to_kind(Kind::Float)
    }
}

/// `maskrcnn_inference`: the sigmoid of each detection's own class channel, `[K, 28, 28]`.
pub fn mask_probabilities(logits: &Tensor, labels: &Tensor) -> Tensor {
    let k = logits.size()[0];
    let index = Tensor::arange(k, (Kind::Int64, logits.device()));
    logits
        .sigmoid()
        .index(&[Some(index), Some(labels.shallow_clone())])
}

/// `KeypointRCNNHeads` (eight 3×3 convs with ReLU) and `KeypointRCNNPredictor`.
pub struct KeypointBranch {
    convs: Vec<Conv2d>,
    kps_score_lowres: ConvTranspose2d,
    pub num_keypoints: i64,
    compute: Compute,
}

impl KeypointBranch {
    pub fn load(roi: &VarPath, num_keypoints: i64) -> Self {
        let head = roi.sub("keypoint_head");
        let c = KEYPOINT_CHANNELS;
        // nn.Sequential of [conv, ReLU] pairs: the convs sit at the even indices.
        let convs = (0..KEYPOINT_LAYERS)
            .map(|i| {
                let cin = if i == 0 { FPN_CHANNELS } else { c };
                Conv2d::load(&head.sub(2 * i), cin, c, 3, 1, true)
            })
            .collect();
        let pred = roi.sub("keypoint_predictor").sub("kps_score_lowres");
        Self {
            convs,
            kps_score_lowres: ConvTranspose2d::load(&pred, c, num_keypoints, 4, 2, 1),
            num_keypoints,
            compute: Compute::EXACT,
        }
    }

    pub fn prepare(&mut self, c: Compute) {
        self.convs.iter_mut().for_each(|conv| conv.prepare(c));
        self.kps_score_lowres.prepare(c);
        self.compute = c;
    }

    /// Pooled f32 features `[K, 256, 14, 14]` → heatmaps `[K, keypoints, 56, 56]` in f32.
    pub fn forward(&self, pooled: &Tensor) -> Tensor {
        let mut x = self.compute.input(pooled);
        for conv in &self.convs {
            x = conv.forward(&x).relu();
        }
        let x = self.kps_score_lowres.forward(&x).to_kind(Kind::Float);
        let (h, w) = (x.size()[2], x.size()[3]);
        // interpolate(scale_factor=2, recompute_scale_factor=False) passes the scale on.
        x.upsample_bilinear2d([2 * h, 2 * w], false, Some(2.0), Some(2.0))
    }
}

/// One detection's keypoints in resized-image pixels: `[keypoints, 2]` (x, y) and scores.
pub struct RawKeypoints {
    pub xy: Tensor,
    pub scores: Tensor,
}

/// `heatmaps_to_keypoints` for one RoI: the heatmaps resized (bicubic) to the box's size in
/// pixels, each keypoint at its map's argmax, scored by the resized map's value there.
pub fn heatmap_to_keypoints(maps: &Tensor, roi: &Tensor) -> RawKeypoints {
    let n = maps.size()[0];
    let offset_x = roi.get(0);
    let offset_y = roi.get(1);
    let width = (roi.get(2) - roi.get(0)).clamp_min(1.0);
    let height = (roi.get(3) - roi.get(1)).clamp_min(1.0);
    let map_w = width.ceil().double_value(&[]) as i64;
    let map_h = height.ceil().double_value(&[]) as i64;
    let width_correction = &width / map_w;
    let height_correction = &height / map_h;
    let resized = maps
        .unsqueeze(1)
        .upsample_bicubic2d([map_h, map_w], false, None, None)
        .squeeze_dim(1);
    let pos = resized.reshape([n, -1]).argmax(1, false);
    let x_int = pos.remainder(map_w);
    let y_int = (&pos - &x_int).floor_divide_scalar(map_w);
    let x = (x_int.to_kind(Kind::Float) + 0.5) * width_correction + offset_x;
    let y = (y_int.to_kind(Kind::Float) + 0.5) * height_correction + offset_y;
    let index = Tensor::arange(n, (Kind::Int64, maps.device()));
    let scores = resized.index(&[Some(index), Some(y_int), Some(x_int)]);
    RawKeypoints {
        xy: Tensor::stack(&[x, y], 1),
        scores,
    }
}

/// A pasted mask above its threshold, cut to the part inside the image: `bits` (bool,
/// `[h, w]`) at `(x0, y0)`. The rest of the image is 0.
pub struct PastedMask {
    pub x0: i64,
    pub y0: i64,
    pub bits: Tensor,
}

/// `expand_boxes` with `expand_masks`' scale, then to int64: the pixel boxes masks are pasted
/// into. `boxes` are `[K, 4]` f32 in original-image pixels.
pub fn paste_boxes(boxes: &Tensor, mask_size: i64) -> Tensor {
    let scale = (mask_size + 2 * PASTE_PADDING) as f64 / mask_size as f64;
    let col = |i: i64| boxes.select(1, i);
    let w_half = (col(2) - col(0)) * 0.5 * scale;
    let h_half = (col(3) - col(1)) * 0.5 * scale;
    let x_c = (col(2) + col(0)) * 0.5;
    let y_c = (col(3) + col(1)) * 0.5;
    Tensor::stack(
        &[
            &x_c - &w_half,
            &y_c - &h_half,
            &x_c + &w_half,
            &y_c + &h_half,
        ],
        1,
    )
    .to_kind(Kind::Int64)
}

/// `paste_mask_in_image` for one detection, then `> threshold`: the padded 28×28
/// probabilities resized (bilinear) to the expanded box and cut to the image. Only this
/// detection's box is ever held, never a full-size mask per detection.
pub fn paste_mask(
    prob: &Tensor,
    pixel_box: [i64; 4],
    (im_h, im_w): (i64, i64),
    threshold: f64,
) -> PastedMask {
    let [b0, b1, b2, b3] = pixel_box;
    let w = (b2 - b0 + 1).max(1);
    let h = (b3 - b1 + 1).max(1);
    let padded = prob
        .view([1, 1, prob.size()[0], prob.size()[1]])
        .constant_pad_nd([PASTE_PADDING; 4]);
    let resized = padded.upsample_bilinear2d([h, w], false, None, None);
    let (x0, x1) = (b0.max(0), (b2 + 1).min(im_w));
    let (y0, y1) = (b1.max(0), (b3 + 1).min(im_h));
    let bits = resized
        .get(0)
        .get(0)
        .narrow(0, y0 - b1, (y1 - y0).max(0))
        .narrow(1, x0 - b0, (x1 - x0).max(0))
        .gt(threshold);
    PastedMask { x0, y0, bits }
}

impl PastedMask {
    /// The mask over the whole `(height, width)` image as COCO runs.
    pub fn to_rle(&self, (height, width): (i64, i64)) -> Rle {
        let (h, w) = (self.bits.size()[0], self.bits.size()[1]);
        let bits = self.bits.to_kind(Kind::Uint8).to_device(tch::Device::Cpu);
        let bits = Vec::<u8>::try_from(bits.reshape([-1])).expect("u8 mask");
        debug_assert_eq!(bits.len() as i64, h * w);
        Rle::from_block(
            (height as u32, width as u32),
            (self.x0 as u32, self.y0 as u32),
            w as u32,
            &bits,
        )
    }
}
