//! NMS, batched NMS and RoIAlign against torchvision.ops on random inputs with ties, boxes on
//! the borders, degenerate and malformed boxes.

use crate::common::*;
use detectd::model::ops::{batched_nms, nms, roi_align, roi_align_gather};
use tch::{Kind, Tensor};

const CASES: i64 = 15;

fn cases() -> std::collections::HashMap<String, Tensor> {
    let out = data_dir().join("ops.safetensors");
    read_tensors(&tvref(
        &out,
        &[
            "ops",
            "--seed",
            "11",
            "--cases",
            &CASES.to_string(),
            "--out",
            "{out}",
        ],
    ))
}

#[test]
fn nms_matches_torchvision() {
    let t = cases();
    for i in 0..CASES {
        let g = |k: &str| &t[&format!("nms.{i}.{k}")];
        let thr = g("thr").double_value(&[0]);
        let keep = nms(g("boxes"), g("scores"), thr);
        assert_eq!(
            keep,
            *g("keep"),
            "nms case {i} ({} boxes, thr {thr})",
            g("boxes").size()[0]
        );
        let keep = batched_nms(g("boxes"), g("scores"), g("idxs"), thr);
        assert_eq!(
            keep,
            *g("batched_keep"),
            "batched_nms case {i} ({} boxes)",
            g("boxes").size()[0]
        );
    }
}

#[test]
fn roi_align_matches_torchvision() {
    let t = cases();
    for i in 0..CASES {
        let g = |k: &str| &t[&format!("roi.{i}.{k}")];
        let (feat, rois, scale) = (g("feat"), g("rois"), g("scale").double_value(&[0]));
        let expected = g("out");
        for b in 0..feat.size()[0] {
            let idx = rois.select(1, 0).eq(b as f64).nonzero().squeeze_dim(1);
            let boxes = rois.index_select(0, &idx).narrow(1, 1, 4);
            let theirs = expected.index_select(0, &idx);
            // The CPU kernel and the tensor-op version (used on GPUs) must both be exact.
            let cpu = roi_align(&feat.get(b), &boxes, scale, 7, 2);
            assert_eq!(
                max_abs_diff(&cpu, &theirs),
                0.0,
                "roi_align case {i} image {b}"
            );
            let gather = roi_align_gather(&feat.get(b), &boxes, scale, 7, 2);
            assert_eq!(
                max_abs_diff(&gather, &theirs),
                0.0,
                "roi_align_gather case {i} image {b}"
            );
        }
    }
    assert_eq!(t["roi.0.out"].kind(), Kind::Float);
}
