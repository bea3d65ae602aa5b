//! RoIAlign over f32 slices for CPU tensors: torchvision's `roi_align_forward_kernel_impl`
//! arithmetic, with channels innermost so one set of bilinear weights serves every channel.
//! Features are read where they lie (channels-last bf16 features are already `[H, W, C]`)
//! and pooled values written straight into the result tensor: at 800×1216 the copies of
//! P2 (15.5 M values) to and from Rust vectors took longer than the pooling itself.

use tch::{Device, Kind, Tensor};

/// A feature value as RoIAlign reads it: f32, or bf16 widened (exactly) to f32, so the
/// arithmetic is the same as on features converted to f32 first.
trait Feature: Copy + Send + Sync {
    fn f32(self) -> f32;
}

impl Feature for f32 {
    fn f32(self) -> f32 {
        self
    }
}

/// bfloat16 bits: the high half of an f32.
#[derive(Clone, Copy)]
#[repr(transparent)]
struct Bf16(u16);

impl Feature for Bf16 {
    fn f32(self) -> f32 {
        f32::from_bits(u32::from(self.0) << 16)
    }
}

/// One bilinear sample: four feature rows and their weights (all zero when out of range).
#[derive(Clone, Copy, Default)]
struct Sample {
    rows: [usize; 4],
    weights: [f32; 4],
}

/// Where a sample coordinate falls on an axis of `size` cells: (low, high, weight of high).
/// Returns None out of range. Follows torchvision's `bilinear_interpolate` rules: clamp at 0,
/// collapse onto the last cell at the far edge.
fn axis(v: f32, size: usize) -> Option<(usize, usize, f32)> {
    if !(v >= -1.0 && v <= size as f32) {
        return None;
    }
    let v = if v <= 0.0 { 0.0 } else { v };
    let low = v as usize;
    if low >= size - 1 {
        return Some((size - 1, size - 1, 0.0));
    }
    Some((low, low + 1, v - low as f32))
}

fn sample(y: f32, x: f32, h: usize, w: usize) -> Sample {
    match (axis(y, h), axis(x, w)) {
        (Some((yl, yh, ly)), Some((xl, xh, lx))) => {
            let (hy, hx) = (1.0 - ly, 1.0 - lx);
            Sample {
                rows: [yl * w + xl, yl * w + xh, yh * w + xl, yh * w + xh],
                weights: [hy * hx, hy * lx, ly * hx, ly * lx],
            }
        }
        _ => Sample::default(),
    }
}

struct Geometry {
    h: usize,
    w: usize,
    c: usize,
    out: usize,
    grid: usize,
    scale: f32,
}

impl Geometry {
    /// Pools one roi into `dst` (`[out, out, C]`), reading `table` (`[H·W, C]`).
    fn pool<T: Feature>(&self, roi: &[f32], table: &[T], dst: &mut [f32]) {
        let (start_w, start_h) = (roi[0] * self.scale, roi[1] * self.scale);
        let (end_w, end_h) = (roi[2] * self.scale, roi[3] * self.scale);
        let roi_w = (end_w - start_w).max(1.0);
        let roi_h = (end_h - start_h).max(1.0);
        let (bin_h, bin_w) = (roi_h / self.out as f32, roi_w / self.out as f32);
        let grid = self.grid as f32;
        let count = (self.grid * self.grid).max(1) as f32;
        let c = self.c;
        for ph in 0..self.out {
            for pw in 0..self.out {
                let acc = &mut dst[(ph * self.out + pw) * c..][..c];
                acc.fill(0.0);
                for iy in 0..self.grid {
                    let y = (start_h + ph as f32 * bin_h) + ((iy as f32 + 0.5) * bin_h) / grid;
                    for ix in 0..self.grid {
                        let x = (start_w + pw as f32 * bin_w) + ((ix as f32 + 0.5) * bin_w) / grid;
                        let s = sample(y, x, self.h, self.w);
                        let [r1, r2, r3, r4] = s.rows.map(|r| &table[r * c..][..c]);
                        let [w1, w2, w3, w4] = s.weights;
                        for k in 0..c {
                            acc[k] += ((w1 * r1[k].f32() + w2 * r2[k].f32()) + w3 * r3[k].f32())
                                + w4 * r4[k].f32();
                        }
                    }
                }
                acc.iter_mut().for_each(|v| *v /= count);
            }
        }
    }
}

pub fn roi_align(
    features: &Tensor,
    rois: &Tensor,
    scale: f32,
    out: i64,
    sampling_ratio: i64,
) -> Tensor {
    let (c, h, w) = features.size3().expect("features are [C, H, W]");
    // [H, W, C], contiguous: a view of channels-last features, a copy of NCHW ones.
    let table = features.permute([1, 2, 0]);
    let table = match table.kind() {
        Kind::Float | Kind::BFloat16 => table.contiguous(),
        _ => table.to_kind(Kind::Float).contiguous(),
    };
    let rois = Vec::<f32>::try_from(rois.to_kind(Kind::Float).contiguous().reshape([-1]))
        .expect("f32 rois");
    let k = rois.len() / 4;
    let result = Tensor::empty([k as i64, out, out, c], (Kind::Float, Device::Cpu));
    if k > 0 && h * w * c > 0 {
        let g = Geometry {
            h: h as usize,
            w: w as usize,
            c: c as usize,
            out: out as usize,
            grid: sampling_ratio as usize,
            scale,
        };
        let n = (h * w * c) as usize;
        // SAFETY: `result` is a fresh contiguous f32 CPU tensor of k·out·out·c values, and
        // `table` a contiguous CPU tensor of n values of the kind matched; both outlive the
        // slices, and nothing else refers to `result` yet.
        let dst = unsafe {
            std::slice::from_raw_parts_mut(result.data_ptr() as *mut f32, k * g.out * g.out * g.c)
        };
        match table.kind() {
            Kind::BFloat16 => {
                let t = unsafe { std::slice::from_raw_parts(table.data_ptr() as *const Bf16, n) };
                pool_all(&g, &rois, t, dst);
            }
            _ => {
                let t = unsafe { std::slice::from_raw_parts(table.data_ptr() as *const f32, n) };
                pool_all(&g, &rois, t, dst);
            }
        }
    }
    result.permute([0, 3, 1, 2])
}

/// Pools every roi, split over libtorch's thread count.
fn pool_all<T: Feature>(g: &Geometry, rois: &[f32], table: &[T], result: &mut [f32]) {
    let per_roi = g.out * g.out * g.c;
    let k = rois.len() / 4;
    let threads = (tch::get_num_threads().max(1) as usize).min(k.max(1));
    let rois_per_thread = k.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for (chunk, dst) in rois
            .chunks(rois_per_thread * 4)
            .zip(result.chunks_mut(rois_per_thread * per_roi))
        {
            scope.spawn(move || {
                for (roi, d) in chunk.chunks_exact(4).zip(dst.chunks_exact_mut(per_roi)) {
                    g.pool(roi, table, d);
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn far_edge_collapses_onto_the_last_cell() {
        assert_eq!(axis(4.5, 5), Some((4, 4, 0.0)));
        assert_eq!(axis(5.5, 5), None);
        assert_eq!(axis(-0.5, 5), Some((0, 1, 0.0)));
        assert_eq!(axis(f32::NAN, 5), None);
    }
}
