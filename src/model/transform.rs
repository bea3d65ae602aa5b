//! Preprocessing as torchvision's `GeneralizedRCNNTransform` (detector) and
//! `ImageClassification` preset (classifier), on uint8 `[3, H, W]` tensors.

use tch::{Kind, Tensor};

use super::{guard, ModelError};

const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];
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
        Self::padded_size(self.resized.0, self.resized.1)
    }

    /// The padded size of an image resized to `h`×`w`.
    pub fn padded_size(h: i64, w: i64) -> (i64, i64) {
        (round_up(h), round_up(w))
    }
}

fn round_up(v: i64) -> i64 {
    (v + SIZE_DIVISIBLE - 1) / SIZE_DIVISIBLE * SIZE_DIVISIBLE
}

/// Most pixels the classifier's resize may produce. torchvision resizes the short side to 232
/// (or 256) before the 224 crop, so a thin image grows: 1×20,000 would become 232×4.64 M
/// (13 GB of f32). The bound admits aspect ratios up to ~297:1 (v2) and ~244:1 (v1).
pub const MAX_RESIZED_PIXELS: i64 = 16_000_000;

/// Why an image cannot be prepared for a model, known from its size alone.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SizeError {
    #[error("a {h}x{w} image resizes to {oh}x{ow} for the detector ({min_size} px short side, {max_size} px long side at most): one side would be empty")]
    EmptySide {
        h: i64,
        w: i64,
        oh: i64,
        ow: i64,
        min_size: i64,
        max_size: i64,
    },
    #[error("a {h}x{w} image resizes to {oh}x{ow} = {pixels} pixels before the classifier's crop, over the bound of {limit}: its aspect ratio is too extreme")]
    TooElongated {
        h: i64,
        w: i64,
        oh: i64,
        ow: i64,
        pixels: i64,
        limit: i64,
    },
}

/// From uint8 to normalized f32 in place on one f32 copy: the same operations (and bits) as
/// torchvision's `x / 255`, `(x - mean) / std`, at a quarter of the peak memory.
fn to_normalized(image: &Tensor) -> Result<Tensor, tch::TchError> {
    let mut x = image.f_to_kind(Kind::Float)?;
    let mean = Tensor::from_slice(&MEAN)
        .f_to_device(x.device())?
        .f_view([3, 1, 1])?;
    let std = Tensor::from_slice(&STD)
        .f_to_device(x.device())?
        .f_view([3, 1, 1])?;
    let _ = x.f_div_scalar_(255.0)?;
    let _ = x.f_sub_(&mean)?;
    let _ = x.f_div_(&std)?;
    Ok(x)
}

fn size3(image: &Tensor) -> Result<(i64, i64, i64), ModelError> {
    image
        .size3()
        .map_err(|_| ModelError::Inference(format!("image is {:?}, not [3, H, W]", image.size())))
}

fn torch(e: tch::TchError) -> ModelError {
    ModelError::Inference(format!("preprocessing: {e}"))
}

/// torchvision's `GeneralizedRCNNTransform(min_size, max_size)`: the short side scaled to
/// `min_size` unless the long side would then pass `max_size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DetectorResize {
    pub min_size: i64,
    pub max_size: i64,
}

impl Default for DetectorResize {
    /// torchvision's defaults.
    fn default() -> Self {
        Self {
            min_size: 800,
            max_size: 1333,
        }
    }
}

impl DetectorResize {
    /// Output size: f64 arithmetic and truncation exactly as torchvision (so a short side of
    /// 97 becomes 799, not 800).
    pub fn size(&self, h: i64, w: i64) -> (i64, i64) {
        let (short, long) = (h.min(w) as f64, h.max(w) as f64);
        let scale = (self.min_size as f64 / short).min(self.max_size as f64 / long);
        (
            (h as f64 * scale).floor() as i64,
            (w as f64 * scale).floor() as i64,
        )
    }

    /// The largest padded input the resize can make: `min_size` by `max_size`, each rounded
    /// up to the padding's multiple.
    pub fn largest_padded(&self) -> (i64, i64) {
        (round_up(self.min_size), round_up(self.max_size))
    }

    /// The work an `h`×`w` image is for the detector: the pixels of its padded input.
    pub fn units(&self, h: i64, w: i64) -> u64 {
        let (oh, ow) = self.size(h, w);
        (round_up(oh).max(0) as u64) * (round_up(ow).max(0) as u64)
    }

    /// Whether an `h`×`w` image can go through the resize.
    pub fn check(&self, h: i64, w: i64) -> Result<(), SizeError> {
        let (oh, ow) = self.size(h, w);
        if oh < 1 || ow < 1 {
            return Err(SizeError::EmptySide {
                h,
                w,
                oh,
                ow,
                min_size: self.min_size,
                max_size: self.max_size,
            });
        }
        Ok(())
    }

    /// Normalize first, then bilinear resize (align_corners false, scale derived from sizes).
    pub fn prepare(&self, image: &Tensor) -> Result<Prepared, ModelError> {
        let (_, h, w) = size3(image)?;
        self.check(h, w)
            .map_err(|e| ModelError::Inference(e.to_string()))?;
        let (oh, ow) = self.size(h, w);
        // tch panics on some libtorch errors even through the f_ API (allocation failures
        // among them): the guard turns those into errors too.
        let tensor = guard(|| -> Result<Tensor, tch::TchError> {
            to_normalized(image)?
                .f_unsqueeze(0)?
                .f_upsample_bilinear2d([oh, ow], false, None, None)?
                .f_squeeze_dim(0)
        })?
        .map_err(torch)?;
        Ok(Prepared {
            tensor,
            original: (h, w),
            resized: (oh, ow),
        })
    }
}

/// The detector's input at torchvision's default sizes.
pub fn prepare_detector(image: &Tensor) -> Result<Prepared, ModelError> {
    DetectorResize::default().prepare(image)
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
pub fn prepare_classifier(image: &Tensor, resize: i64, crop: i64) -> Result<Tensor, ModelError> {
    let (_, h, w) = size3(image)?;
    check_classifier(h, w, resize).map_err(|e| ModelError::Inference(e.to_string()))?;
    let (oh, ow) = classifier_size(h, w, resize);
    guard(|| -> Result<Tensor, tch::TchError> {
        let resized = if (oh, ow) == (h, w) {
            image.shallow_clone()
        } else {
            let x = image.f_to_kind(Kind::Float)?.f_unsqueeze(0)?;
            let mut y = x.f_internal_upsample_bilinear2d_aa([oh, ow], false, None, None)?;
            drop(x);
            let _ = y.f_round_()?;
            y.f_to_kind(Kind::Uint8)?.f_squeeze_dim(0)?
        };
        to_normalized(&center_crop(&resized, crop)?)
    })?
    .map_err(torch)
}

/// Whether an `h`×`w` image can go through the classifier's resize to `resize` within
/// `MAX_RESIZED_PIXELS`.
pub fn check_classifier(h: i64, w: i64, resize: i64) -> Result<(), SizeError> {
    let (oh, ow) = classifier_size(h, w, resize);
    let pixels = oh.saturating_mul(ow);
    if pixels > MAX_RESIZED_PIXELS {
        return Err(SizeError::TooElongated {
            h,
            w,
            oh,
            ow,
            pixels,
            limit: MAX_RESIZED_PIXELS,
        });
    }
    Ok(())
}

/// Short side to `resize`, long side `int(resize * long / short)` in f64.
pub fn classifier_size(h: i64, w: i64, resize: i64) -> (i64, i64) {
    let (short, long) = (h.min(w), h.max(w));
    let new_long = (resize as f64 * long as f64 / short as f64) as i64;
    if h <= w {
        (resize, new_long)
    } else {
        (new_long, resize)
    }
}

/// torchvision's center crop: offsets rounded half to even; zero padding when too small.
fn center_crop(image: &Tensor, crop: i64) -> Result<Tensor, tch::TchError> {
    let (_, h, w) = image.size3()?;
    let image = if h < crop || w < crop {
        let (ph, pw) = ((crop - h).max(0), (crop - w).max(0));
        image.f_constant_pad_nd([pw / 2, (pw + 1) / 2, ph / 2, (ph + 1) / 2])?
    } else {
        image.shallow_clone()
    };
    let (_, h, w) = image.size3()?;
    let top = ((h - crop) as f64 / 2.0).round_ties_even() as i64;
    let left = ((w - crop) as f64 / 2.0).round_ties_even() as i64;
    image.f_narrow(1, top, crop)?.f_narrow(2, left, crop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_keeps_torchvision_f64_truncation() {
        let detector_size = |h, w| DetectorResize::default().size(h, w);
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
    fn degenerate_sizes_are_refused_from_the_size_alone() {
        let check_detector = |h, w| DetectorResize::default().check(h, w);
        assert!(check_detector(1, 2000).is_err());
        assert!(check_detector(2000, 1).is_err());
        assert!(check_detector(1, 1333).is_ok());
        assert!(check_detector(1, 1).is_ok());
        assert!(check_classifier(1, 20_000, 232).is_err());
        assert!(check_classifier(20_000, 1, 256).is_err());
        assert!(check_classifier(100, 29_000, 232).is_ok());
        let img = Tensor::zeros([3, 1, 2000], (Kind::Uint8, tch::Device::Cpu));
        assert!(prepare_detector(&img).is_err());
        let img = Tensor::zeros([3, 20_000, 1], (Kind::Uint8, tch::Device::Cpu));
        assert!(prepare_classifier(&img, 232, CROP_FOR_TESTS).is_err());
        let img = Tensor::zeros([1, 5, 5], (Kind::Uint8, tch::Device::Cpu));
        assert!(prepare_classifier(&img.squeeze(), 232, CROP_FOR_TESTS).is_err());
    }

    const CROP_FOR_TESTS: i64 = 224;

    #[test]
    fn crop_offsets_round_half_to_even() {
        let img = Tensor::zeros([3, 375, 341], (Kind::Uint8, tch::Device::Cpu));
        // (341 - 224) / 2 = 58.5 → 58; (375 - 224) / 2 = 75.5 → 76.
        let marked = img.copy();
        let _ = marked.narrow(1, 76, 1).narrow(2, 58, 1).fill_(7);
        let c = center_crop(&marked, 224).expect("crop");
        assert_eq!(c.int64_value(&[0, 0, 0]), 7);
    }
}
