//! `torchvision.ops.FeaturePyramidNetwork` with `LastLevelMaxPool`, as built by
//! `_resnet_fpn_extractor` (names under `backbone.fpn`).

use tch::Tensor;

use super::layers::{Compute, ConvNorm, NormKind};
use crate::weights::VarPath;

pub const FPN_CHANNELS: i64 = 256;

pub struct Fpn {
    inner_blocks: Vec<ConvNorm>,
    layer_blocks: Vec<ConvNorm>,
}

impl Fpn {
    /// `norm` is None for v1 (convs with bias) and BatchNorm for v2.
    pub fn load(p: &VarPath, in_channels: &[i64], norm: Option<NormKind>) -> Self {
        let (inner, layer) = (p.sub("inner_blocks"), p.sub("layer_blocks"));
        Self {
            inner_blocks: (0..in_channels.len())
                .map(|i| {
                    ConvNorm::load_sequential(&inner.sub(i), in_channels[i], FPN_CHANNELS, 1, norm)
                })
                .collect(),
            layer_blocks: (0..in_channels.len())
                .map(|i| {
                    ConvNorm::load_sequential(&layer.sub(i), FPN_CHANNELS, FPN_CHANNELS, 3, norm)
                })
                .collect(),
        }
    }

    pub fn prepare(&mut self, c: Compute) {
        self.inner_blocks
            .iter_mut()
            .chain(&mut self.layer_blocks)
            .for_each(|b| b.prepare(c));
    }

    /// C2..C5 → P2..P6 ('0','1','2','3','pool'). The top-down path carries the sum before the
    /// 3×3 conv, and upsamples by nearest to the lateral's size, as torchvision does.
    pub fn forward(&self, xs: &[Tensor]) -> Vec<Tensor> {
        let top = xs.len() - 1;
        let mut last = self.inner_blocks[top].forward(&xs[top]);
        let mut outs = vec![self.layer_blocks[top].forward(&last)];
        for i in (0..top).rev() {
            let mut lateral = self.inner_blocks[i].forward(&xs[i]);
            let size = &lateral.size()[2..];
            let top_down = last.upsample_nearest2d(size, None, None);
            last = lateral.g_add_(&top_down);
            outs.insert(0, self.layer_blocks[i].forward(&last));
        }
        let pool = outs[top].max_pool2d([1, 1], [2, 2], [0, 0], [1, 1], false);
        outs.push(pool);
        outs
    }
}
