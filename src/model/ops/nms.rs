//! Non-maximum suppression with the semantics of torchvision's CPU kernel: stable descending
//! score order, f32 IoU without "+1", suppression only when IoU is strictly above the
//! threshold. The IoU matrix is computed where the boxes live (CPU or GPU); only the n×n
//! suppression bits come to the host for the greedy pass, as torchvision's CUDA kernel does.

use tch::{Device, Kind, Tensor};

use super::boxes::area;

/// Most IoU entries computed at once. NMS compares every box with every other; with
/// `score_threshold=0` on a crowded image the detector hands it up to 90,000 boxes (8.1 G
/// pairs), so the comparison runs in tiles of rows: at most this many entries (~40 bytes each
/// across the temporaries, ~170 MB) live on the device, and as many bytes on the host.
const TILE_ENTRIES: i64 = 1 << 22;

/// Indices of the kept boxes, in descending score order.
pub fn nms(boxes: &Tensor, scores: &Tensor, threshold: f64) -> Tensor {
    nms_tiled(boxes, scores, threshold, TILE_ENTRIES)
}

/// NMS whose IoU rows are computed `tile_entries / n` at a time, for the rows not yet
/// suppressed. Every entry is the same f32 arithmetic as the whole matrix's, so the result
/// does not depend on the tiling.
fn nms_tiled(boxes: &Tensor, scores: &Tensor, threshold: f64, tile_entries: i64) -> Tensor {
    let device = boxes.device();
    let n = boxes.size()[0];
    if n == 0 {
        return Tensor::empty([0], (Kind::Int64, device));
    }
    let order = scores.argsort_stable(true, 0, true);
    let b = boxes.index_select(0, &order);
    let areas = area(&b);
    let rows_per_tile = (tile_entries / n).max(1) as usize;
    let n = n as usize;
    let mut suppressed = vec![false; n];
    let mut keep = Vec::new();
    let mut start = 0;
    while start < n {
        let end = (start + rows_per_tile).min(n);
        let rows: Vec<i64> = (start..end)
            .filter(|&i| !suppressed[i])
            .map(|i| i as i64)
            .collect();
        start = end;
        if rows.is_empty() {
            continue;
        }
        let over = overlaps_above(&b, &areas, &rows, threshold);
        for (r, &i) in rows.iter().enumerate() {
            let i = i as usize;
            if suppressed[i] {
                continue;
            }
            keep.push(i as i64);
            let row = &over[r * n..(r + 1) * n];
            for j in i + 1..n {
                suppressed[j] |= row[j] != 0;
            }
        }
    }
    order.index_select(0, &Tensor::from_slice(&keep).to_device(device))
}

/// `over[r * n + j]`: box j's IoU with box `rows[r]` is above the threshold (boxes in score
/// order).
fn overlaps_above(b: &Tensor, areas: &Tensor, rows: &[i64], threshold: f64) -> Vec<u8> {
    let index = Tensor::from_slice(rows).to_device(b.device());
    let r = b.index_select(0, &index);
    let r_areas = areas.index_select(0, &index);
    let col = |t: &Tensor, k: i64| t.select(1, k);
    let xx1 = col(&r, 0).unsqueeze(1).maximum(&col(b, 0).unsqueeze(0));
    let yy1 = col(&r, 1).unsqueeze(1).maximum(&col(b, 1).unsqueeze(0));
    let xx2 = col(&r, 2).unsqueeze(1).minimum(&col(b, 2).unsqueeze(0));
    let yy2 = col(&r, 3).unsqueeze(1).minimum(&col(b, 3).unsqueeze(0));
    let inter = (xx2 - xx1).clamp_min(0.0) * (yy2 - yy1).clamp_min(0.0);
    let iou = &inter / ((r_areas.unsqueeze(1) + areas.unsqueeze(0)) - &inter);
    // The kernel compares the f32 IoU with a double threshold.
    let over = iou.to_kind(Kind::Double).gt(threshold).to_kind(Kind::Uint8);
    Vec::<u8>::try_from(over.reshape([-1]).to_device(Device::Cpu))
        .expect("u8 tensor converts to Vec<u8>")
}

/// Above this many coordinates torchvision's CPU `batched_nms` loops over classes instead of
/// offsetting them apart; both paths are kept because their tie orders differ.
const CPU_VANILLA_ABOVE: i64 = 4000;
const CUDA_VANILLA_ABOVE: i64 = 400_000;

/// NMS within each class of `idxs`, as `torchvision.ops.batched_nms`.
pub fn batched_nms(boxes: &Tensor, scores: &Tensor, idxs: &Tensor, threshold: f64) -> Tensor {
    let limit = if boxes.device().is_cuda() {
        CUDA_VANILLA_ABOVE
    } else {
        CPU_VANILLA_ABOVE
    };
    if boxes.numel() as i64 > limit {
        batched_nms_vanilla(boxes, scores, idxs, threshold)
    } else {
        batched_nms_coordinate_trick(boxes, scores, idxs, threshold)
    }
}

/// Moves each class's boxes apart by a class-dependent offset so one NMS never mixes them.
fn batched_nms_coordinate_trick(
    boxes: &Tensor,
    scores: &Tensor,
    idxs: &Tensor,
    threshold: f64,
) -> Tensor {
    if boxes.numel() == 0 {
        return Tensor::empty([0], (Kind::Int64, boxes.device()));
    }
    let max_coordinate = boxes.max();
    let offsets = idxs.to_kind(boxes.kind()) * (max_coordinate + 1.0);
    nms(&(boxes + offsets.unsqueeze(1)), scores, threshold)
}

fn batched_nms_vanilla(boxes: &Tensor, scores: &Tensor, idxs: &Tensor, threshold: f64) -> Tensor {
    let mut keep_mask = scores.zeros_like().to_kind(Kind::Bool);
    let (classes, _, _) = idxs.internal_unique2(true, false, false);
    let classes = Vec::<i64>::try_from(classes.to_device(Device::Cpu)).expect("int64 classes");
    for c in classes {
        let ci = idxs.eq(c).nonzero().squeeze_dim(1);
        let k = nms(
            &boxes.index_select(0, &ci),
            &scores.index_select(0, &ci),
            threshold,
        );
        let _ = keep_mask.index_fill_(0, &ci.index_select(0, &k), 1);
    }
    let kept = keep_mask.nonzero().squeeze_dim(1);
    // torchvision orders the survivors with the default (unstable) sort.
    let (_, order) = scores.index_select(0, &kept).sort(0, true);
    kept.index_select(0, &order)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[[f32; 4]]) -> Tensor {
        Tensor::from_slice(v.as_flattened()).view([-1, 4])
    }

    #[test]
    fn iou_equal_to_threshold_is_kept() {
        // Second box covers half of the union with the first: IoU exactly 0.5.
        let boxes = t(&[[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0]]);
        let keep = nms(&boxes, &Tensor::from_slice(&[0.9f32, 0.8]), 0.5);
        assert_eq!(Vec::<i64>::try_from(keep).unwrap(), vec![0, 1]);
    }

    #[test]
    fn ties_keep_index_order() {
        let boxes = t(&[
            [0.0, 0.0, 1.0, 1.0],
            [5.0, 5.0, 6.0, 6.0],
            [0.0, 0.0, 1.0, 1.0],
        ]);
        let keep = nms(&boxes, &Tensor::from_slice(&[0.5f32, 0.5, 0.5]), 0.5);
        assert_eq!(Vec::<i64>::try_from(keep).unwrap(), vec![0, 1]);
    }

    #[test]
    fn tiles_of_any_size_keep_what_the_whole_matrix_keeps() {
        tch::manual_seed(5);
        let xy = Tensor::rand([300, 2], (Kind::Float, Device::Cpu)) * 100.0;
        let wh = Tensor::rand([300, 2], (Kind::Float, Device::Cpu)) * 40.0 + 1.0;
        let boxes = Tensor::cat(&[&xy, &(&xy + &wh)], 1);
        let scores = Tensor::rand([300], (Kind::Float, Device::Cpu));
        let whole = nms_tiled(&boxes, &scores, 0.5, 300 * 300);
        for tile in [1, 300, 7 * 300, 299 * 300] {
            let tiled = nms_tiled(&boxes, &scores, 0.5, tile);
            assert!(tiled.equal(&whole), "tile of {tile} entries");
        }
        assert!(whole.size()[0] > 10);
    }

    #[test]
    fn empty_input() {
        let keep = nms(
            &Tensor::zeros([0, 4], (Kind::Float, Device::Cpu)),
            &Tensor::zeros([0], (Kind::Float, Device::Cpu)),
            0.5,
        );
        assert_eq!(keep.size(), vec![0]);
    }
}
