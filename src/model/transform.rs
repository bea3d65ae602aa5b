//! Preprocessing as torchvision's `GeneralizedRCNNTransform` (detector) and
//! `ImageClassification` preset (classifier), on uint8 `[3, H, W]` tensors.

use tch::{Kind, Tensor};

const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];
const MIN_SIZE: f64 = 800.0;
const MAX_SIZE: f64 = 1333.0;
const SIZE_DIVISIBLE: i64 = 32;

/// One image ready for the detector: normalized, resized, not yet padded.
pub struct Prepared {
    /// `[3, h, w]` f32.
    pub tensor: Tensor,
    /// (H, W) of the decoded image.
    pub original: (i64, i64),
    /// (h, w) after the resize.
    pub resized: (i64, i64),
}

impl Prepared {
    /// The padded size this image gets when batched alone: images that share it can share a
    /// batch without changing each other's results.
    pub fn padded(&self) -> (i64, i64) {
        (round_up(self.resized.0), round_up(self.resized.1))
    }
}

fn round_up(v: i64) -> i64 {
    (v + SIZE_DIVISIBLE - 1) / SIZE_DIVISIBLE * SIZE_DIVISIBLE
}

fn normalize(x: &Tensor) -> Tensor {
    let mean = Tensor::from_slice(&MEAN)
        .to_device(x.device())
        .view([3, 1, 1]);
    let std = Tensor::from_slice(&STD)
        .to_device(x.device())
        .view([3, 1, 1]);
    (x - mean) / std
}

/// Output size of the detector resize: f64 arithmetic and truncation exactly as torchvision
/// (so a short side of 97 becomes 799, not 800).
pub fn detector_size(h: i64, w: i64) -> (i64, i64) {
    let (short, long) = (h.min(w) as f64, h.max(w) as f64);
    let scale = (MIN_SIZE / short).min(MAX_SIZE / long);
    (
        (h as f64 * scale).floor() as i64,
        (w as f64 * scale).floor() as i64,
    )
}

/// Normalize first, then bilinear resize (align_corners false, scale derived from sizes).
pub fn prepare_detector(image: &Tensor) -> Prepared {
    let (_, h, w) = image.size3().expect("image is [3, H, W]");
    let x = normalize(&(image.to_kind(Kind::Float) / 255.0));
    let (oh, ow) = detector_size(h, w);
    let tensor = x
        .unsqueeze(0)
        .upsample_bilinear2d([oh, ow], false, None, None)
        .squeeze_dim(0);
    Prepared {
        tensor,
        original: (h, w),
        resized: (oh, ow),
    }
}

/// Zero-pads images of the same padded size into `[N, 3, Hp, Wp]`, top-left aligned.
pub fn pad_batch(images: &[&Prepared], (hp, wp): (i64, i64)) -> Tensor {
    let first = &images[0].tensor;
    let batch = Tensor::zeros(
        [images.len() as i64, 3, hp, wp],
        (first.kind(), first.device()),
    );
    for (i, p) in images.iter().enumerate() {
        let (h, w) = p.resized;
        batch
            .get(i as i64)
            .narrow(1, 0, h)
            .narrow(2, 0, w)
            .copy_(&p.tensor);
    }
    batch
}

/// Classifier preprocessing (`ImageClassification`): antialiased bilinear resize of the short
/// side to `resize` on the uint8 image (rounded back to uint8, as torchvision's tensor path
/// does), center crop `crop`, then scale to [0, 1] and normalize. Returns `[3, crop, crop]`.
pub fn prepare_classifier(image: &Tensor, resize: i64, crop: i64) -> Tensor {
    let (_, h, w) = image.size3().expect("image is [3, H, W]");
    let (oh, ow) = classifier_size(h, w, resize);
    let resized = if (oh, ow) == (h, w) {
        image.shallow_clone()
    } else {
        let x = image.to_kind(Kind::Float).unsqueeze(0);
        let y = x.internal_upsample_bilinear2d_aa([oh, ow], false, None, None);
        y.round().to_kind(Kind::Uint8).squeeze_dim(0)
    };
    let cropped = center_crop(&resized, crop);
    normalize(&(cropped.to_kind(Kind::Float) / 255.0))
}

/// Short side to `resize`, long side `int(resize * long / short)` in f64.
fn classifier_size(h: i64, w: i64, resize: i64) -> (i64, i64) {
    let (short, long) = (h.min(w), h.max(w));
    let new_long = (resize as f64 * long as f64 / short as f64) as i64;
    if h <= w {
        (resize, new_long)
    } else {
        (new_long, resize)
    }
}

/// torchvision's center crop: offsets rounded half to even; zero padding when too small.
fn center_crop(image: &Tensor, crop: i64) -> Tensor {
    let (_, h, w) = image.size3().expect("image is [3, H, W]");
    let image = if h < crop || w < crop {
        let (ph, pw) = ((crop - h).max(0), (crop - w).max(0));
        image.constant_pad_nd([pw / 2, (pw + 1) / 2, ph / 2, (ph + 1) / 2])
    } else {
        image.shallow_clone()
    };
    let (_, h, w) = image.size3().expect("image is [3, H, W]");
    let top = ((h - crop) as f64 / 2.0).round_ties_even() as i64;
    let left = ((w - crop) as f64 / 2.0).round_ties_even() as i64;
    image.narrow(1, top, crop).narrow(2, left, crop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_keeps_torchvision_f64_truncation() {
        // 800 / 97 * 97 is just below 800 in f64.
        assert_eq!(
            detector_size(97, 130).0,
            ((800.0 / 97.0) * 97.0f64).floor() as i64
        );
        assert_eq!(detector_size(800, 1216), (800, 1216));
        let (h, w) = detector_size(100, 2000);
        assert_eq!(w, 1333);
        assert_eq!(h, (100.0 * (1333.0f64 / 2000.0)).floor() as i64);
    }

    #[test]
    fn crop_offsets_round_half_to_even() {
        let img = Tensor::zeros([3, 375, 341], (Kind::Uint8, tch::Device::Cpu));
        // (341 - 224) / 2 = 58.5 → 58; (375 - 224) / 2 = 75.5 → 76.
        let marked = img.copy();
        let _ = marked.narrow(1, 76, 1).narrow(2, 58, 1).fill_(7);
        let c = center_crop(&marked, 224);
        assert_eq!(c.int64_value(&[0, 0, 0]), 7);
    }
}
