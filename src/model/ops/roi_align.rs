//! RoIAlign (aligned=False) with the arithmetic of torchvision's CPU kernel.
//!
//! Per roi and output bin the kernel averages `sampling_ratio²` bilinear samples. Sample
//! coordinates, the out-of-range rule (outside [-1, H] gives 0), the clamps at the edges and
//! the order of the additions are reproduced exactly, so the result is bitwise torchvision's.
//! Two implementations with the same arithmetic: a loop over f32 slices for CPU tensors (fast:
//! the bilinear weights are shared by all channels), and gathers from a `[H·W, C]` view for
//! other devices, so CUDA feature maps never come to the host.

use tch::{Kind, Tensor};

/// Rois per gather: bounds the `[rois·bins·samples, C]` temporaries (~25 MB at C=256).
const ROI_CHUNK: i64 = 128;

/// `rois` `[K, 4]` (x1, y1, x2, y2) in image pixels on one image's features `[C, H, W]`.
/// Returns f32 `[K, C, out, out]`.
pub fn roi_align(
    features: &Tensor,
    rois: &Tensor,
    spatial_scale: f64,
    out: i64,
    sampling_ratio: i64,
) -> Tensor {
    if features.device() == tch::Device::Cpu {
        super::roi_align_cpu::roi_align(features, rois, spatial_scale as f32, out, sampling_ratio)
    } else {
        roi_align_gather(features, rois, spatial_scale, out, sampling_ratio)
    }
}

/// The tensor-op implementation, for any device.
pub fn roi_align_gather(
    features: &Tensor,
    rois: &Tensor,
    spatial_scale: f64,
    out: i64,
    sampling_ratio: i64,
) -> Tensor {
    let (c, h, w) = features.size3().expect("features are [C, H, W]");
    // `[H·W, C]` rows: a free view of channels-last features, a copy of NCHW ones.
    let table = features.permute([1, 2, 0]).reshape([h * w, c]);
    let k = rois.size()[0];
    let chunks: Vec<Tensor> = (0..k)
        .step_by(ROI_CHUNK as usize)
        .map(|start| {
            let part = rois.narrow(0, start, ROI_CHUNK.min(k - start));
            align_chunk(
                &table,
                (h, w),
                &part,
                spatial_scale as f32,
                out,
                sampling_ratio,
            )
        })
        .collect();
    if chunks.is_empty() {
        return Tensor::zeros([0, c, out, out], (features.kind(), features.device()));
    }
    Tensor::cat(&chunks, 0)
}

fn align_chunk(
    table: &Tensor,
    (h, w): (i64, i64),
    rois: &Tensor,
    scale: f32,
    out: i64,
    grid: i64,
) -> Tensor {
    let k = rois.size()[0];
    let c = table.size()[1];
    let scaled = rois * f64::from(scale);
    let ys = SampleAxis::new(&scaled.select(1, 1), &scaled.select(1, 3), h, out, grid);
    let xs = SampleAxis::new(&scaled.select(1, 0), &scaled.select(1, 2), w, out, grid);
    // Per (roi, ys, xs) sample: four corner weights and indices, shared by all channels.
    let (yv, xv) = (ys.valid.unsqueeze(2), xs.valid.unsqueeze(1));
    let valid = yv.logical_and(&xv).to_kind(Kind::Float);
    let (hy, ly) = (ys.high_weight.unsqueeze(2), ys.low_weight.unsqueeze(2));
    let (hx, lx) = (xs.high_weight.unsqueeze(1), xs.low_weight.unsqueeze(1));
    let weights =
        [&hy * &hx, &hy * &lx, &ly * &hx, &ly * &lx].map(|wgt| (wgt * &valid).reshape([-1, 1]));
    let (y0, y1) = ((ys.low.unsqueeze(2) * w), (ys.high.unsqueeze(2) * w));
    let (x0, x1) = (xs.low.unsqueeze(1), xs.high.unsqueeze(1));
    let index = |yy: &Tensor, xx: &Tensor| ((yy + xx) * valid.to_kind(Kind::Int64)).reshape([-1]);
    let corners = [
        index(&y0, &x0),
        index(&y0, &x1),
        index(&y1, &x0),
        index(&y1, &x1),
    ];
    let mut sample = &weights[0] * table.index_select(0, &corners[0]);
    for (wgt, idx) in weights.iter().zip(&corners).skip(1) {
        sample += wgt * table.index_select(0, idx);
    }
    // [K, out, grid, out, grid, C]: accumulate sub-samples iy-major, then divide by the count.
    let s = sample.view([k, out, grid, out, grid, c]);
    let mut acc = s.select(2, 0).select(3, 0);
    for iy in 0..grid {
        for ix in 0..grid {
            if iy + ix > 0 {
                // acc starts as a view of the (0, 0) samples, which are not read again.
                acc += s.select(2, iy).select(3, ix);
            }
        }
    }
    (acc / (grid * grid) as f64)
        .permute([0, 3, 1, 2])
        .contiguous()
}

/// Sample positions along one axis for every roi: `[K, out·grid]`.
struct SampleAxis {
    valid: Tensor,
    low: Tensor,
    high: Tensor,
    low_weight: Tensor,
    high_weight: Tensor,
}

impl SampleAxis {
    fn new(start: &Tensor, end: &Tensor, size: i64, out: i64, grid: i64) -> Self {
        let dev = start.device();
        let opts = (Kind::Float, dev);
        let extent = (end - start).clamp_min(1.0);
        let bin = (extent / out as f64).unsqueeze(1);
        let p = Tensor::arange(out, opts).repeat_interleave_self_int(grid, 0, None);
        let i = (Tensor::arange(grid, opts) + 0.5).repeat([out]);
        // (start + p * bin) + ((i + 0.5) * bin) / grid, in this association.
        let pos = (start.unsqueeze(1) + &p * &bin) + (&i * &bin) / grid as f64;
        let valid = pos.ge(-1.0).logical_and(&pos.le(size as f64));
        let pos = pos.clamp_min(0.0);
        let low = pos.to_kind(Kind::Int64);
        let at_edge = low.ge(size - 1);
        let low = low.clamp_max(size - 1);
        let high = (&low + 1).clamp_max(size - 1);
        let pos = pos.where_self(&at_edge.logical_not(), &low.to_kind(Kind::Float));
        let low_weight = pos - low.to_kind(Kind::Float);
        let high_weight = 1.0 - &low_weight;
        Self {
            valid,
            low,
            high,
            low_weight,
            high_weight,
        }
    }
}
