//! Mask R-CNN (v1, v2) and Keypoint R-CNN parity with torchvision on seeded weights: the mask
//! logits of the 14×14 RoIAlign and mask head, the pasted masks above 0.5 pixel for pixel, the
//! keypoint heatmaps, keypoints (bicubic resize and argmax included) and their scores; on the
//! detector parity images (odd sizes, an extreme aspect ratio, grayscale); and batch
//! invariance.

mod common;

use std::path::PathBuf;

use common::*;
use detectd::model::detector::{DetectorConfig, DetectorParams, Family};
use detectd::model::transform::prepare_detector;
use detectd::model::{ArchChoice, DetectRequest, Detection, FasterRcnn};
use tch::{Device, Kind, Tensor};

const IMAGES: [&str; 4] = [
    "d480x640.png:480x640:RGB",
    "d97x130.png:97x130:RGB",
    "d100x2000.png:100x2000:RGB",
    "dgray.png:150x200:L",
];

/// Seeded weights made by torchvision, loaded by detectd.
fn model(arch: &str) -> FasterRcnn {
    let weights = instance_weights(arch);
    let config = DetectorConfig {
        arch: ArchChoice::Auto,
        frozen_bn_eps: None,
        device: Device::Cpu,
        compute: fp32(),
        params: DetectorParams::default(),
    };
    FasterRcnn::load(&weights, &config).expect("load")
}

/// Every image of IMAGES at once (results must not depend on the batch), traced.
fn run(
    model: &FasterRcnn,
    images: &[PathBuf],
) -> Vec<(Vec<Detection>, detectd::model::detector::Trace)> {
    let prepared: Vec<_> = images
        .iter()
        .map(|p| prepare_detector(&decode_file(p)).expect("prepare"))
        .collect();
    let requests = DetectRequest::each(&prepared, 0.05);
    model
        .detect_traced(&requests, true)
        .expect("detect")
        .into_iter()
        .map(|(d, t)| (d, t.expect("trace")))
        .collect()
}

fn check_boxes(what: &str, dets: &[Detection], r: &dyn Fn(&str) -> Tensor) {
    assert!(
        !dets.is_empty(),
        "{what}: the seeded weights should detect something"
    );
    let boxes: Vec<f32> = dets.iter().flat_map(|d| d.bbox).collect();
    let scores: Vec<f32> = dets.iter().map(|d| d.score).collect();
    let labels: Vec<i64> = dets.iter().map(|d| d.label).collect();
    assert_close(
        &format!("{what} boxes"),
        &Tensor::from_slice(&boxes).view([-1, 4]),
        &r("boxes"),
        1e-3,
    );
    assert_close(
        &format!("{what} scores"),
        &Tensor::from_slice(&scores),
        &r("scores"),
        1e-4,
    );
    assert_eq!(
        Tensor::from_slice(&labels),
        r("labels").to_kind(Kind::Int64),
        "{what} labels"
    );
}

/// Pixels where detectd's masks (decoded from its RLE) and torchvision's (`masks > 0.5`)
/// agree, over every detection, and how many were compared.
fn mask_agreement(dets: &[Detection], theirs: &Tensor) -> (u64, u64, u64) {
    let theirs = Vec::<u8>::try_from(theirs.reshape([-1])).expect("u8 masks");
    let mut same = 0u64;
    let mut set = 0u64;
    let mut i = 0usize;
    for d in dets {
        let ours = d.mask.as_ref().expect("a mask per detection").decode();
        for (a, b) in ours.iter().zip(&theirs[i..i + ours.len()]) {
            same += (a == b) as u64;
            set += (*b != 0) as u64;
        }
        i += ours.len();
    }
    assert_eq!(i, theirs.len(), "mask sizes");
    (same, i as u64, set)
}

fn mask_parity(arch: &str) {
    let images = images(&IMAGES);
    let model = model(arch);
    assert_eq!(model.family, Family::MaskRcnn);
    let refs = instance_reference(arch, &format!("det_{arch}"), &images);
    let (mut same, mut all, mut set) = (0, 0, 0);
    for (i, (dets, trace)) in run(&model, &images).into_iter().enumerate() {
        let what = format!("{arch} {}", path_str(&images[i]));
        let r = |k: &str| refs[&format!("{i}.{k}")].shallow_clone();
        check_boxes(&what, &dets, &r);
        let logits = trace.mask_logits.expect("mask logits");
        assert_close(
            &format!("{what} mask logits"),
            &logits,
            &r("mask_logits"),
            1e-4,
        );
        let (s, a, n) = mask_agreement(&dets, &r("masks"));
        eprintln!("{what}: {s} of {a} mask pixels equal, {n} set");
        (same, all, set) = (same + s, all + a, set + n);
    }
    // Seeded v1 finds small boxes; their masks still hold thousands of pixels.
    assert!(
        set > 1000,
        "{arch}: the masks should not be empty ({set} of {all})"
    );
    let share = same as f64 / all as f64;
    assert!(
        share >= 0.9999,
        "{arch}: {same} of {all} mask pixels equal ({share})"
    );
}

#[test]
fn mask_v1_matches_torchvision() {
    mask_parity("mask-v1");
}

#[test]
fn mask_v2_matches_torchvision() {
    mask_parity("mask-v2");
}

#[test]
fn keypoints_match_torchvision() {
    let arch = "keypoint";
    let images = images(&IMAGES);
    let model = model(arch);
    assert_eq!(
        (model.family, model.num_keypoints()),
        (Family::KeypointRcnn, Some(17))
    );
    let refs = instance_reference(arch, &format!("det_{arch}"), &images);
    for (i, (dets, trace)) in run(&model, &images).into_iter().enumerate() {
        let what = format!("{arch} {}", path_str(&images[i]));
        let r = |k: &str| refs[&format!("{i}.{k}")].shallow_clone();
        check_boxes(&what, &dets, &r);
        let maps = trace.keypoint_logits.expect("heatmaps");
        assert_close(
            &format!("{what} heatmaps"),
            &maps,
            &r("keypoint_logits"),
            1e-4,
        );
        let kps: Vec<_> = dets
            .iter()
            .flat_map(|d| d.keypoints.clone().expect("keypoints"))
            .collect();
        let xy: Vec<f32> = kps.iter().flat_map(|k| [k.x, k.y]).collect();
        let scores: Vec<f32> = kps.iter().map(|k| k.score).collect();
        let theirs = r("keypoints").narrow(2, 0, 2).contiguous();
        assert_close(
            &format!("{what} keypoints"),
            &Tensor::from_slice(&xy).view_as(&theirs),
            &theirs,
            1e-3,
        );
        let theirs = r("keypoints_scores");
        assert_close(
            &format!("{what} keypoint scores"),
            &Tensor::from_slice(&scores).view_as(&theirs),
            &theirs,
            1e-4,
        );
    }
}

/// Images of one padded size share a forward pass (as on a GPU); each image's masks and
/// keypoints equal its single-image ones.
#[test]
fn masks_and_keypoints_are_batch_invariant() {
    let images = images(&["b427x640.png:427x640:RGB", "b480x640.png:480x640:RGB"]);
    let prepared: Vec<_> = images
        .iter()
        .map(|p| prepare_detector(&decode_file(p)).expect("prepare"))
        .collect();
    for arch in ["mask-v2", "keypoint"] {
        let mut model = model(arch);
        model.images_per_forward = usize::MAX;
        let requests = DetectRequest::each(&prepared, 0.05);
        let batch = model.detect(&requests).expect("batch");
        for (i, request) in requests.iter().enumerate() {
            let single = model.detect(std::slice::from_ref(request)).expect("single");
            let (b, s) = (&batch[i], &single[0]);
            assert!(!b.is_empty() && b.len() == s.len(), "{arch}: detections");
            for (x, y) in b.iter().zip(s) {
                assert!((x.score - y.score).abs() < 1e-4, "{arch}: score");
                if let (Some(m), Some(n)) = (&x.mask, &y.mask) {
                    let (m, n) = (m.decode(), n.decode());
                    let differ = m.iter().zip(&n).filter(|(a, b)| a != b).count();
                    assert!(
                        differ * 10_000 <= m.len(),
                        "{arch}: {differ} mask pixels differ"
                    );
                }
                for (p, q) in x
                    .keypoints
                    .iter()
                    .flatten()
                    .zip(y.keypoints.iter().flatten())
                {
                    assert!(
                        (p.x - q.x).abs() < 1e-3 && (p.y - q.y).abs() < 1e-3,
                        "{arch}: keypoint"
                    );
                }
            }
        }
    }
}
