//! The building blocks torchvision's models are made of, loaded from their state_dict paths.

use tch::Tensor;

use crate::weights::VarPath;

/// `nn.Conv2d` (square kernel, groups 1, dilation 1).
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: i64,
    padding: i64,
}

impl Conv2d {
    pub fn load(p: &VarPath, cin: i64, cout: i64, k: i64, stride: i64, bias: bool) -> Self {
        let weight = p.get("weight", &[cout, cin, k, k]);
        let bias = bias.then(|| p.get("bias", &[cout]));
        Self {
            weight,
            bias,
            stride,
            padding: k / 2,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(
            &self.weight,
            self.bias.as_ref(),
            [self.stride; 2],
            [self.padding; 2],
            [1, 1],
            1,
        )
    }
}

/// `nn.Linear`.
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    pub fn load(p: &VarPath, cin: i64, cout: i64) -> Self {
        Self {
            weight: p.get("weight", &[cout, cin]),
            bias: p.get("bias", &[cout]),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, Some(&self.bias))
    }

    pub fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }
}

/// Which normalization a ResNet body uses, and with what eps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NormKind {
    /// `torchvision.ops.FrozenBatchNorm2d`: the official v1 detector (eps 0.0 after
    /// `overwrite_eps`) and detectors built with a pretrained backbone (eps 1e-5).
    Frozen { eps: f64 },
    /// `nn.BatchNorm2d` in eval mode: v2, the classifier, and v1 built without weights.
    Batch { eps: f64 },
}

/// A normalization layer in eval mode.
pub enum Norm {
    /// Per-channel scale and shift, computed at load in FrozenBatchNorm2d's op order; the same
    /// element-wise ops on the same inputs give the same bits as computing them per call.
    Frozen { scale: Tensor, shift: Tensor },
    Batch {
        weight: Tensor,
        bias: Tensor,
        mean: Tensor,
        var: Tensor,
        eps: f64,
    },
}

impl Norm {
    pub fn load(p: &VarPath, c: i64, kind: NormKind) -> Self {
        let weight = p.get("weight", &[c]);
        let bias = p.get("bias", &[c]);
        let mean = p.get("running_mean", &[c]);
        let var = p.get("running_var", &[c]);
        match kind {
            NormKind::Frozen { eps } => {
                let shape = [1, c, 1, 1];
                let scale = weight.reshape(shape) * (var.reshape(shape) + eps).rsqrt();
                let shift = bias.reshape(shape) - mean.reshape(shape) * &scale;
                Norm::Frozen { scale, shift }
            }
            NormKind::Batch { eps } => Norm::Batch {
                weight,
                bias,
                mean,
                var,
                eps,
            },
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Norm::Frozen { scale, shift } => x * scale + shift,
            Norm::Batch {
                weight,
                bias,
                mean,
                var,
                eps,
            } => x.batch_norm(
                Some(weight),
                Some(bias),
                Some(mean),
                Some(var),
                false,
                0.1,
                *eps,
                true,
            ),
        }
    }
}

/// torchvision's `Conv2dNormActivation` without activation: `[conv, norm]` at `.0` and `.1`,
/// or `[conv with bias]` at `.0` when there is no norm.
pub struct ConvNorm {
    conv: Conv2d,
    norm: Option<Norm>,
}

impl ConvNorm {
    pub fn load(p: &VarPath, cin: i64, cout: i64, k: i64, norm: Option<NormKind>) -> Self {
        let conv = Conv2d::load(&p.sub(0), cin, cout, k, 1, norm.is_none());
        let norm = norm.map(|kind| Norm::load(&p.sub(1), cout, kind));
        Self { conv, norm }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = self.conv.forward(x);
        match &self.norm {
            Some(n) => n.forward(&y),
            None => y,
        }
    }
}
