//! `AnchorGenerator` with Faster R-CNN's defaults: one size per level (32..512), aspect ratios
//! (0.5, 1, 2), anchors centred on the stride grid with no half-pixel offset.

use tch::{Device, Kind, Tensor};

const SIZES: [f64; 5] = [32.0, 64.0, 128.0, 256.0, 512.0];
const ASPECT_RATIOS: [f32; 3] = [0.5, 1.0, 2.0];

pub const ANCHORS_PER_LOCATION: i64 = ASPECT_RATIOS.len() as i64;

/// Base anchors of one level, `[3, 4]`, computed in f32 with torchvision's op sequence (the
/// final round makes the exact sequence matter little, but it costs nothing to keep it).
fn cell_anchors(size: f64) -> Tensor {
    let ratios = Tensor::from_slice(&ASPECT_RATIOS);
    let h_ratios = ratios.sqrt();
    let w_ratios = h_ratios.reciprocal();
    let ws = w_ratios * size;
    let hs = h_ratios * size;
    (Tensor::stack(&[-&ws, -&hs, ws, hs], 1) / 2.0).round()
}

/// All anchors for a padded batch of `padded` = (Hp, Wp) with the given feature sizes, level
/// by level, ordered (y, x, ratio). Strides are `Hp // grid_h`, so the pool level's stride can
/// be 61 rather than 64 when its grid was rounded up: torchvision's quirk, kept.
pub fn grid_anchors(
    padded: (i64, i64),
    grids: &[(i64, i64)],
    device: Device,
) -> (Tensor, Vec<i64>) {
    let mut levels = Vec::with_capacity(grids.len());
    let mut counts = Vec::with_capacity(grids.len());
    for (&(gh, gw), &size) in grids.iter().zip(SIZES.iter()) {
        let (sh, sw) = (padded.0 / gh, padded.1 / gw);
        let opts = (Kind::Float, Device::Cpu);
        let xs = Tensor::arange(gw, opts) * sw as f64;
        let ys = Tensor::arange(gh, opts) * sh as f64;
        let grid = Tensor::meshgrid_indexing(&[ys, xs], "ij");
        let (sy, sx) = (grid[0].reshape([-1]), grid[1].reshape([-1]));
        let shifts = Tensor::stack(&[&sx, &sy, &sx, &sy], 1);
        let anchors =
            (shifts.view([-1, 1, 4]) + cell_anchors(size).view([1, -1, 4])).reshape([-1, 4]);
        counts.push(anchors.size()[0]);
        levels.push(anchors);
    }
    (Tensor::cat(&levels, 0).to_device(device), counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_anchors_match_torchvision_rounding() {
        // Widths and heights follow from sqrt(ratio) scaling; x2 - x1 = round(w/2)*2.
        let a = cell_anchors(32.0);
        let v: Vec<f32> = a.reshape([-1]).try_into().unwrap();
        assert_eq!(&v[4..8], &[-16.0, -16.0, 16.0, 16.0]);
        assert_eq!(v[0], -v[2]);
        assert!(v[2] > v[3], "ratio 0.5 (h/w) is wider than tall");
    }

    #[test]
    fn pool_level_stride_uses_integer_division() {
        let (a, counts) = grid_anchors((800, 1088), &[(13, 17)], Device::Cpu);
        assert_eq!(counts, vec![13 * 17 * 3]);
        // Second row starts at y = 800 // 13 = 61.
        let row1: Vec<f32> = a.get(17 * 3 + 1).try_into().unwrap();
        let base: Vec<f32> = a.get(1).try_into().unwrap();
        assert_eq!(row1[1] - base[1], 61.0);
    }
}
