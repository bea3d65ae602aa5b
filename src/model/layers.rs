//! The building blocks torchvision's models are made of, loaded from their state_dict paths.
//!
//! Each block loads in f32 exactly as torchvision computes, and can then be `prepare`d for a
//! faster numeric setting: eval norms folded into the preceding conv, weights cast to bf16 or
//! fp16 and laid out channels-last.

use std::cell::RefCell;

use tch::{Kind, Tensor};

use crate::weights::VarPath;

/// A convolution or linear layer as one pass called it: what `detectd bench --ops` times
/// alone to find what the model's own layer shapes can reach on this machine.
#[derive(Clone, Debug)]
pub struct OpCall {
    pub input: Vec<i64>,
    pub weight: Vec<i64>,
    pub kind: Kind,
    pub channels_last: bool,
    /// For convolutions: stride and padding.
    pub conv: Option<(i64, i64)>,
}

impl OpCall {
    /// Multiply-adds × 2 of the call.
    pub fn flops(&self, output: &[i64]) -> f64 {
        let out: i64 = output.iter().product();
        let per_output: i64 = self.weight[1..].iter().product();
        2.0 * out as f64 * per_output as f64
    }

    /// Runs the call on fresh random inputs of its shapes; returns the output.
    pub fn run(&self, x: &Tensor, w: &Tensor) -> Tensor {
        match self.conv {
            Some((stride, padding)) => {
                x.conv2d(w, None::<&Tensor>, [stride; 2], [padding; 2], [1, 1], 1)
            }
            None => x.linear(w, None::<&Tensor>),
        }
    }

    /// Random input and weight of the call's shapes, kind and layout.
    pub fn operands(&self) -> (Tensor, Tensor) {
        let opts = (self.kind, tch::Device::Cpu);
        let mut x = Tensor::randn(self.input.as_slice(), opts);
        let mut w = Tensor::randn(self.weight.as_slice(), opts);
        if self.channels_last && self.conv.is_some() {
            x = channels_last(&x);
            w = channels_last(&w);
        }
        (x, w)
    }
}

thread_local! {
    static RECORDED: RefCell<Option<Vec<OpCall>>> = const { RefCell::new(None) };
}

/// Runs `f`, returning with its result every convolution and linear call made on this thread.
pub fn record_ops<T>(f: impl FnOnce() -> T) -> (T, Vec<OpCall>) {
    RECORDED.with(|r| *r.borrow_mut() = Some(Vec::new()));
    let out = f();
    let calls = RECORDED.with(|r| r.borrow_mut().take()).unwrap_or_default();
    (out, calls)
}

fn note(x: &Tensor, w: &Tensor, conv: Option<(i64, i64)>) {
    RECORDED.with(|r| {
        if let Some(calls) = r.borrow_mut().as_mut() {
            calls.push(OpCall {
                input: x.size(),
                weight: w.size(),
                kind: w.kind(),
                channels_last: x.dim() == 4 && x.stride()[1] == 1 && x.size()[1] > 1,
                conv,
            });
        }
    });
}

/// How a prepared model computes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Compute {
    /// dtype of weights and activations in the convolution and linear layers.
    pub kind: Kind,
    /// NHWC memory layout, which oneDNN's fast CPU kernels (AMX among them) want.
    pub channels_last: bool,
    /// Fold eval BatchNorm into the convs (changes results in the last bits only).
    pub fold_norms: bool,
}

impl Compute {
    /// torchvision's own arithmetic: f32, NCHW, norms applied as separate ops.
    pub const EXACT: Compute = Compute {
        kind: Kind::Float,
        channels_last: false,
        fold_norms: false,
    };

    /// Casts an activation `[N, C, H, W]` to this setting.
    pub fn input(&self, x: &Tensor) -> Tensor {
        let x = if x.kind() == self.kind {
            x.shallow_clone()
        } else {
            x.to_kind(self.kind)
        };
        if self.channels_last {
            channels_last(&x)
        } else {
            x
        }
    }
}

/// The same 4-D tensor with NHWC strides. tch has no memory-format argument, so the layout is
/// made by a contiguous copy of the permuted view, then viewed back as NCHW.
pub fn channels_last(x: &Tensor) -> Tensor {
    x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

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

    /// Folds an eval norm that follows this conv into its weight and bias.
    pub fn fold(&mut self, norm: &Norm) {
        let (scale, shift) = norm.scale_shift();
        self.weight = &self.weight * scale.view([-1, 1, 1, 1]);
        self.bias = Some(match &self.bias {
            Some(b) => b * &scale + shift,
            None => shift,
        });
    }

    pub fn prepare(&mut self, c: Compute) {
        let w = self.weight.to_kind(c.kind);
        self.weight = if c.channels_last {
            channels_last(&w)
        } else {
            w
        };
        self.bias = self.bias.as_ref().map(|b| b.to_kind(c.kind));
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        note(x, &self.weight, Some((self.stride, self.padding)));
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

    pub fn prepare(&mut self, c: Compute) {
        self.weight = self.weight.to_kind(c.kind);
        self.bias = self.bias.to_kind(c.kind);
    }

    /// Casts the input to the weights' dtype, so callers may pass f32.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let x = if x.kind() == self.weight.kind() {
            x.shallow_clone()
        } else {
            x.to_kind(self.weight.kind())
        };
        note(&x, &self.weight, None);
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

    /// Per-channel `(scale, shift)` with `norm(x) = x * scale + shift`.
    pub fn scale_shift(&self) -> (Tensor, Tensor) {
        match self {
            Norm::Frozen { scale, shift } => (scale.view([-1]), shift.view([-1])),
            Norm::Batch {
                weight,
                bias,
                mean,
                var,
                eps,
            } => {
                let scale = weight * (var + *eps).rsqrt();
                let shift = bias - mean * &scale;
                (scale, shift)
            }
        }
    }

    pub fn prepare(&mut self, c: Compute) {
        let cast = |t: &Tensor| t.to_kind(c.kind);
        *self = match &*self {
            Norm::Frozen { scale, shift } => Norm::Frozen {
                scale: cast(scale),
                shift: cast(shift),
            },
            Norm::Batch {
                weight,
                bias,
                mean,
                var,
                eps,
            } => Norm::Batch {
                weight: cast(weight),
                bias: cast(bias),
                mean: cast(mean),
                var: cast(var),
                eps: *eps,
            },
        };
    }

    /// Normalizes `x` in place where the op allows it (the caller hands over a tensor it owns,
    /// a conv's fresh output); the same element-wise ops as torchvision's, so the same bits,
    /// without allocating and writing two more tensors of the conv's size.
    pub fn forward(&self, mut x: Tensor) -> Tensor {
        match self {
            Norm::Frozen { scale, shift } => x.g_mul_(scale).g_add_(shift),
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

/// A conv followed by an optional eval norm, no activation.
pub struct ConvNorm {
    conv: Conv2d,
    norm: Option<Norm>,
}

impl ConvNorm {
    pub fn new(conv: Conv2d, norm: Option<Norm>) -> Self {
        Self { conv, norm }
    }

    /// torchvision's `Conv2dNormActivation` layout: `[conv, norm]` at `.0` and `.1`, or
    /// `[conv with bias]` at `.0` when there is no norm.
    pub fn load_sequential(
        p: &VarPath,
        cin: i64,
        cout: i64,
        k: i64,
        norm: Option<NormKind>,
    ) -> Self {
        let conv = Conv2d::load(&p.sub(0), cin, cout, k, 1, norm.is_none());
        let norm = norm.map(|kind| Norm::load(&p.sub(1), cout, kind));
        Self { conv, norm }
    }

    pub fn prepare(&mut self, c: Compute) {
        if c.fold_norms {
            if let Some(norm) = self.norm.take() {
                self.conv.fold(&norm);
            }
        }
        self.conv.prepare(c);
        if let Some(norm) = &mut self.norm {
            norm.prepare(c);
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = self.conv.forward(x);
        match &self.norm {
            Some(n) => n.forward(y),
            None => y,
        }
    }
}
