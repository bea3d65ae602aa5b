//! ResNet-50 (torchvision's v1.5 layout: stride on the 3×3 conv), as the detector's body and
//! as the ImageNet classifier. Module names follow `torchvision.models.resnet`.

use tch::{Kind, Tensor};

use super::layers::{Compute, Conv2d, ConvNorm, Linear, Norm, NormKind};
use crate::weights::VarPath;

/// Blocks per layer and bottleneck width of ResNet-50.
const LAYERS: [(i64, i64); 4] = [(3, 64), (4, 128), (6, 256), (3, 512)];
const EXPANSION: i64 = 4;

/// `conv{i}` + `bn{i}` of a block or the stem.
fn conv_bn(
    p: &VarPath,
    i: &str,
    cin: i64,
    cout: i64,
    k: i64,
    stride: i64,
    norm: NormKind,
) -> ConvNorm {
    let conv = Conv2d::load(&p.sub(format!("conv{i}")), cin, cout, k, stride, false);
    ConvNorm::new(conv, Some(Norm::load(&p.sub(format!("bn{i}")), cout, norm)))
}

struct Bottleneck {
    convs: [ConvNorm; 3],
    downsample: Option<ConvNorm>,
}

impl Bottleneck {
    fn load(p: &VarPath, cin: i64, width: i64, stride: i64, norm: NormKind) -> Self {
        let cout = width * EXPANSION;
        let downsample = (stride != 1 || cin != cout).then(|| {
            let d = p.sub("downsample");
            let conv = Conv2d::load(&d.sub(0), cin, cout, 1, stride, false);
            ConvNorm::new(conv, Some(Norm::load(&d.sub(1), cout, norm)))
        });
        Self {
            convs: [
                conv_bn(p, "1", cin, width, 1, 1, norm),
                conv_bn(p, "2", width, width, 3, stride, norm),
                conv_bn(p, "3", width, cout, 1, 1, norm),
            ],
            downsample,
        }
    }

    fn prepare(&mut self, c: Compute) {
        self.convs
            .iter_mut()
            .chain(self.downsample.as_mut())
            .for_each(|b| b.prepare(c));
    }

    /// In-place ReLU and residual sum on tensors this block made: torchvision's ops and bits,
    /// less memory traffic.
    fn forward(&self, x: &Tensor) -> Tensor {
        let y = self.convs[0].forward(x).relu_();
        let y = self.convs[1].forward(&y).relu_();
        let mut y = self.convs[2].forward(&y);
        let mut y = match &self.downsample {
            Some(d) => y.g_add_(&d.forward(x)),
            None => y.g_add_(x),
        };
        y.relu_()
    }
}

/// conv1 … layer4, returning the output of each layer (C2..C5).
pub struct ResNetBody {
    stem: ConvNorm,
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
            stem: conv_bn(p, "1", 3, 64, 7, 2, norm),
            layers,
        }
    }

    pub fn prepare(&mut self, c: Compute) {
        self.stem.prepare(c);
        self.layers.iter_mut().flatten().for_each(|b| b.prepare(c));
    }

    /// Output channels of each returned layer.
    pub fn channels() -> [i64; 4] {
        LAYERS.map(|(_, w)| w * EXPANSION)
    }

    pub fn forward(&self, x: &Tensor) -> Vec<Tensor> {
        let x = self.stem.forward(x).relu_();
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
    compute: Compute,
}

impl ResNet50 {
    pub fn load(p: &VarPath, num_classes: i64) -> Self {
        Self {
            body: ResNetBody::load(p, NormKind::Batch { eps: 1e-5 }),
            fc: Linear::load(&p.sub("fc"), 2048, num_classes),
            compute: Compute::EXACT,
        }
    }

    pub fn prepare(&mut self, c: Compute) {
        self.body.prepare(c);
        self.fc.prepare(c);
        self.compute = c;
    }

    /// f32 logits for a batch `[N, 3, 224, 224]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let c5 = self
            .body
            .forward(&self.compute.input(x))
            .pop()
            .expect("ResNetBody returns four levels");
        self.fc
            .forward(&c5.adaptive_avg_pool2d([1, 1]).flatten(1, -1))
            .to_kind(Kind::Float)
    }

    pub fn num_classes(&self) -> i64 {
        self.fc.out_features()
    }
}
