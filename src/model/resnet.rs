//! ResNet-50 (torchvision's v1.5 layout: stride on the 3×3 conv), as the detector's body and
//! as the ImageNet classifier. Module names follow `torchvision.models.resnet`.

use tch::Tensor;

use super::layers::{Conv2d, Linear, Norm, NormKind};
use crate::weights::VarPath;

/// Blocks per layer and bottleneck width of ResNet-50.
const LAYERS: [(i64, i64); 4] = [(3, 64), (4, 128), (6, 256), (3, 512)];
const EXPANSION: i64 = 4;

struct Bottleneck {
    conv1: Conv2d,
    bn1: Norm,
    conv2: Conv2d,
    bn2: Norm,
    conv3: Conv2d,
    bn3: Norm,
    downsample: Option<(Conv2d, Norm)>,
}

impl Bottleneck {
    fn load(p: &VarPath, cin: i64, width: i64, stride: i64, norm: NormKind) -> Self {
        let cout = width * EXPANSION;
        let downsample = (stride != 1 || cin != cout).then(|| {
            let d = p.sub("downsample");
            (
                Conv2d::load(&d.sub(0), cin, cout, 1, stride, false),
                Norm::load(&d.sub(1), cout, norm),
            )
        });
        Self {
            conv1: Conv2d::load(&p.sub("conv1"), cin, width, 1, 1, false),
            bn1: Norm::load(&p.sub("bn1"), width, norm),
            conv2: Conv2d::load(&p.sub("conv2"), width, width, 3, stride, false),
            bn2: Norm::load(&p.sub("bn2"), width, norm),
            conv3: Conv2d::load(&p.sub("conv3"), width, cout, 1, 1, false),
            bn3: Norm::load(&p.sub("bn3"), cout, norm),
            downsample,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let y = self.bn1.forward(&self.conv1.forward(x)).relu();
        let y = self.bn2.forward(&self.conv2.forward(&y)).relu();
        let y = self.bn3.forward(&self.conv3.forward(&y));
        let identity = match &self.downsample {
            Some((conv, bn)) => bn.forward(&conv.forward(x)),
            None => x.shallow_clone(),
        };
        (y + identity).relu()
    }
}

/// conv1 … layer4, returning the output of each layer (C2..C5).
pub struct ResNetBody {
    conv1: Conv2d,
    bn1: Norm,
    layers: Vec<Vec<Bottleneck>>,
}

impl ResNetBody {
    pub fn load(p: &VarPath, norm: NormKind) -> Self {
        let mut cin = 64;
        let mut layers = Vec::new();
        for (i, &(blocks, width)) in LAYERS.iter().enumerate() {
            let lp = p.sub(format!("layer{}", i + 1));
            let stride = if i == 0 { 1 } else { 2 };
            let mut layer = Vec::new();
            for b in 0..blocks {
                layer.push(Bottleneck::load(
                    &lp.sub(b),
                    cin,
                    width,
                    if b == 0 { stride } else { 1 },
                    norm,
                ));
                cin = width * EXPANSION;
            }
            layers.push(layer);
        }
        Self {
            conv1: Conv2d::load(&p.sub("conv1"), 3, 64, 7, 2, false),
            bn1: Norm::load(&p.sub("bn1"), 64, norm),
            layers,
        }
    }

    /// Output channels of each returned layer.
    pub fn channels() -> [i64; 4] {
        LAYERS.map(|(_, w)| w * EXPANSION)
    }

    pub fn forward(&self, x: &Tensor) -> Vec<Tensor> {
        let x = self.bn1.forward(&self.conv1.forward(x)).relu();
        let mut x = x.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        let mut outs = Vec::with_capacity(4);
        for layer in &self.layers {
            for block in layer {
                x = block.forward(&x);
            }
            outs.push(x.shallow_clone());
        }
        outs
    }
}

/// `torchvision.models.resnet50`: body, global average pool, fc.
pub struct ResNet50 {
    body: ResNetBody,
    fc: Linear,
}

impl ResNet50 {
    pub fn load(p: &VarPath, num_classes: i64) -> Self {
        Self {
            body: ResNetBody::load(p, NormKind::Batch { eps: 1e-5 }),
            fc: Linear::load(&p.sub("fc"), 2048, num_classes),
        }
    }

    /// Logits for a batch `[N, 3, 224, 224]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let c5 = self
            .body
            .forward(x)
            .pop()
            .expect("ResNetBody returns four levels");
        self.fc
            .forward(&c5.adaptive_avg_pool2d([1, 1]).flatten(1, -1))
    }

    pub fn num_classes(&self) -> i64 {
        self.fc.out_features()
    }
}
