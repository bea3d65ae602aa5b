//! `torchvision.models.resnet50` as an image classifier with the ImageNet presets.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::layers::Compute;
use super::resnet::ResNet50;
use super::{guard, ModelError};
use crate::weights::{Loader, StateDict, WeightsError};

/// torchvision's `ResNet50_Weights` presets: they differ only in the resize.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// IMAGENET1K_V1: resize 256, crop 224.
    V1,
    /// IMAGENET1K_V2: resize 232, crop 224.
    V2,
}

super::named::named!(Preset { V1 => "v1", V2 => "v2" });

impl Preset {
    pub fn resize(self) -> i64 {
        match self {
            Preset::V1 => 256,
            Preset::V2 => 232,
        }
    }
}

pub const CROP: i64 = 224;

pub struct Classifier {
    pub num_classes: i64,
    pub device: Device,
    net: ResNet50,
}

/// One image's top classes, best first.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    pub label: i64,
    pub score: f32,
}

impl Classifier {
    /// Bytes of the largest activation of a CPU batch of `images` (the stem's output,
    /// `64 × 112 × 112` f32 per image); 0 on a GPU.
    pub fn largest_activation(&self, images: usize) -> usize {
        if self.device.is_cuda() {
            return 0;
        }
        64 * 112 * 112 * 4 * images.max(1)
    }

    pub fn load(path: &Path, device: Device, compute: Compute) -> Result<Self, ModelError> {
        let sd = StateDict::load(path)?;
        let num_classes =
            sd.shape("fc.weight")
                .map(|s| s[0])
                .ok_or_else(|| WeightsError::Unrecognized {
                    path: sd.path.clone(),
                    reason: "not a ResNet-50 classifier checkpoint: no fc.weight".into(),
                })?;
        let loader = Loader::new(sd, "ResNet-50", device);
        let mut net = ResNet50::load(&loader.root(), num_classes);
        loader.finish()?;
        if compute != Compute::EXACT {
            guard(|| net.prepare(compute))?;
        }
        Ok(Self {
            num_classes,
            device,
            net,
        })
    }

    /// Softmax probabilities `[N, classes]` for preprocessed `[3, 224, 224]` images.
    pub fn probabilities(&self, images: &[&Tensor]) -> Result<Tensor, ModelError> {
        guard(|| {
            let _no_grad = tch::no_grad_guard();
            let batch = Tensor::stack(images, 0).to_device(self.device);
            self.net
                .forward(&batch)
                .softmax(-1, Kind::Float)
                .to_device(Device::Cpu)
        })
    }

    /// The `k` most probable classes of each image.
    pub fn classify(&self, images: &[&Tensor], k: i64) -> Result<Vec<Vec<Prediction>>, ModelError> {
        let probs = self.probabilities(images)?;
        let (scores, labels) = probs.topk(k.min(self.num_classes), 1, true, true);
        let rows = scores.size()[0];
        Ok((0..rows)
            .map(|r| {
                let s = Vec::<f32>::try_from(scores.get(r)).expect("f32 scores");
                let l = Vec::<i64>::try_from(labels.get(r)).expect("i64 labels");
                l.into_iter()
                    .zip(s)
                    .map(|(label, score)| Prediction { label, score })
                    .collect()
            })
            .collect())
    }
}
