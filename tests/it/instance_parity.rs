//! Mask R-CNN (v1, v2) and Keypoint R-CNN parity with torchvision on seeded weights: the mask
//! logits of the 14×14 RoIAlign and mask head, the pasted masks above 0.5 pixel for pixel, the
//! keypoint heatmaps, keypoints (bicubic resize and argmax included) and their scores; on the
//! detector parity images (odd sizes, an extreme aspect ratio, grayscale); and batch
//! invariance.
//!
//! At a smaller resize than torchvision's default (`SIZES`, the same for both): what these
//! tests hold (the heads, pasting, heatmaps) does not depend on it, and it runs them in a
//! third of the time. The default resize is held by `detector_parity.rs` and by
//! `instance_serving.rs`, which serves these models as users run them.

use std::path::PathBuf;

use crate::common::*;
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

/// The resize of every model and reference here: `min_size`, `max_size`.
const SIZES: (i64, i64) = (320, 533);
const KNOBS: [&str; 4] = ["--min-size", "320", "--max-size", "533"];

/// Keypoint R-CNN's detections per image here (torchvision's default is 100). Its head (eight
/// 512-channel 3×3 convolutions on 14×14 per detection, ~3.7 GFLOP each) is most of its time:
/// at 100 it took ~9 s an image on each side on a 2-core Zen 3. Each detection's keypoints go
/// through the same code; all 100, at the default resize, are held by `instance_serving.rs`.
const KEYPOINT_DETECTIONS: i64 = 25;

fn params() -> DetectorParams {
    DetectorParams {
        min_size: SIZES.0,
        max_size: SIZES.1,
        ..DetectorParams::default()
    }
}

/// Seeded weights made by torchvision, loaded by detectd, at `SIZES`.
fn model(arch: &str) -> FasterRcnn {
    model_with(arch, params())
}

fn model_with(arch: &str, params: DetectorParams) -> FasterRcnn {
    let weights = instance_weights(arch);
    let config = DetectorConfig {
        arch: ArchChoice::Auto,
        frozen_bn_eps: None,
        device: Device::Cpu,
        compute: fp32(),
        params,
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
        .map(|p| params().resize().prepare(&decode_file(p)).expect("prepare"))
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
    assert_equal(
        &format!("{what} boxes"),
        &Tensor::from_slice(&boxes).view([-1, 4]),
        &r("boxes"),
    );
    assert_equal(
        &format!("{what} scores"),
        &Tensor::from_slice(&scores),
        &r("scores"),
    );
    assert_eq!(
        Tensor::from_slice(&labels),
        r("labels").to_kind(Kind::Int64),
        "{what} labels"
    );
}

/// Each detection's mask (decoded from detectd's RLE) against torchvision's `masks > 0.5` for
/// the same detection, pixel for pixel: fails naming the first detection with a differing
/// pixel. Returns the pixels compared and those set.
fn assert_masks_equal(what: &str, dets: &[Detection], theirs: &Tensor) -> (u64, u64) {
    assert_eq!(
        theirs.size()[0],
        dets.len() as i64,
        "{what}: one mask per detection"
    );
    let (mut all, mut set) = (0u64, 0u64);
    for (k, d) in dets.iter().enumerate() {
        let ours = d.mask.as_ref().expect("a mask per detection").decode();
        let theirs = Vec::<u8>::try_from(theirs.get(k as i64).reshape([-1])).expect("u8 mask");
        assert_eq!(ours.len(), theirs.len(), "{what}: detection {k}: mask size");
        let differ = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
        assert_eq!(
            differ,
            0,
            "{what}: detection {k} (box {:?}): {differ} of {} mask pixels differ",
            d.bbox,
            ours.len()
        );
        all += ours.len() as u64;
        set += theirs.iter().filter(|b| **b != 0).count() as u64;
    }
    (all, set)
}

fn mask_parity(arch: &str) {
    let images = images(&IMAGES);
    let model = model(arch);
    assert_eq!(model.family, Family::MaskRcnn);
    let refs = instance_reference(arch, &format!("det_{arch}"), &KNOBS, &images);
    let (mut all, mut set) = (0, 0);
    for (i, (dets, trace)) in run(&model, &images).into_iter().enumerate() {
        let what = format!("{arch} {}", path_str(&images[i]));
        let r = |k: &str| refs[&format!("{i}.{k}")].shallow_clone();
        check_boxes(&what, &dets, &r);
        let logits = trace.mask_logits.expect("mask logits");
        assert_equal(&format!("{what} mask logits"), &logits, &r("mask_logits"));
        let (a, n) = assert_masks_equal(&what, &dets, &r("masks"));
        eprintln!("{what}: {a} mask pixels equal, {n} set");
        (all, set) = (all + a, set + n);
    }
    // Seeded v1 finds small boxes; their masks still hold thousands of pixels.
    assert!(
        set > 1000,
        "{arch}: the masks should not be empty ({set} of {all})"
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
    let model = model_with(
        arch,
        DetectorParams {
            box_detections_per_img: KEYPOINT_DETECTIONS,
            ..params()
        },
    );
    assert_eq!(
        (model.family, model.num_keypoints()),
        (Family::KeypointRcnn, Some(17))
    );
    let per_image = KEYPOINT_DETECTIONS.to_string();
    let knobs = [&KNOBS[..], &["--box-detections-per-img", &per_image]].concat();
    let refs = instance_reference(arch, &format!("det_{arch}"), &knobs, &images);
    for (i, (dets, trace)) in run(&model, &images).into_iter().enumerate() {
        let what = format!("{arch} {}", path_str(&images[i]));
        let r = |k: &str| refs[&format!("{i}.{k}")].shallow_clone();
        check_boxes(&what, &dets, &r);
        let maps = trace.keypoint_logits.expect("heatmaps");
        assert_equal(&format!("{what} heatmaps"), &maps, &r("keypoint_logits"));
        let kps: Vec<_> = dets
            .iter()
            .flat_map(|d| d.keypoints.clone().expect("keypoints"))
            .collect();
        let xy: Vec<f32> = kps.iter().flat_map(|k| [k.x, k.y]).collect();
        let scores: Vec<f32> = kps.iter().map(|k| k.score).collect();
        let theirs = r("keypoints").narrow(2, 0, 2).contiguous();
        assert_equal(
            &format!("{what} keypoints"),
            &Tensor::from_slice(&xy).view_as(&theirs),
            &theirs,
        );
        let theirs = r("keypoints_scores");
        assert_equal(
            &format!("{what} keypoint scores"),
            &Tensor::from_slice(&scores).view_as(&theirs),
            &theirs,
        );
    }
}

/// Images of one padded size share a forward pass (as on a GPU); each image's masks and
/// keypoints equal its single-image ones.
#[test]
fn masks_and_keypoints_are_batch_invariant() {
    // At torchvision's default resize, not `SIZES`: both resized to 800×1066 and padded to
    // 800×1088 (427×640 would pad to 800×1216 and run alone, testing nothing). At 320×448 a
    // batched pass is not bitwise a single one (oneDNN picks other kernels for two images:
    // a box 1e-4 px off, measured on a Zen 3), so the claim is held at the size it is made for.
    let images = images(&["b375x500.png:375x500:RGB", "b480x640.png:480x640:RGB"]);
    let prepared: Vec<_> = images
        .iter()
        .map(|p| prepare_detector(&decode_file(p)).expect("prepare"))
        .collect();
    assert_eq!(
        prepared[0].padded(),
        prepared[1].padded(),
        "the two images must share a forward pass"
    );
    for arch in ["mask-v2", "keypoint"] {
        let per_image = match arch {
            "keypoint" => KEYPOINT_DETECTIONS,
            _ => DetectorParams::default().box_detections_per_img,
        };
        let params = DetectorParams {
            box_detections_per_img: per_image,
            ..DetectorParams::default()
        };
        let mut model = model_with(arch, params);
        model.images_per_forward = usize::MAX;
        let requests = DetectRequest::each(&prepared, 0.05);
        let batch = model.detect(&requests).expect("batch");
        for (i, request) in requests.iter().enumerate() {
            let single = model.detect(std::slice::from_ref(request)).expect("single");
            let (b, s) = (&batch[i], &single[0]);
            assert!(!b.is_empty() && b.len() == s.len(), "{arch}: detections");
            for (k, (x, y)) in b.iter().zip(s).enumerate() {
                let what = format!("{arch}: image {i} detection {k}");
                assert_eq!(
                    (x.bbox, x.score, x.label),
                    (y.bbox, y.score, y.label),
                    "{what}"
                );
                if arch == "keypoint" {
                    let (p, q) = (x.keypoints.as_ref(), y.keypoints.as_ref());
                    let (p, q) = (p.expect("batched keypoints"), q.expect("single keypoints"));
                    let xys = |k: &Vec<detectd::model::detector::Keypoint>| -> Vec<[f32; 3]> {
                        k.iter().map(|k| [k.x, k.y, k.score]).collect()
                    };
                    assert_eq!(xys(p), xys(q), "{what}: keypoints");
                } else {
                    let m = x.mask.as_ref().expect("a batched mask").decode();
                    let n = y.mask.as_ref().expect("a single mask").decode();
                    let differ = m.iter().zip(&n).filter(|(a, b)| a != b).count();
                    assert!(
                        m.len() == n.len() && differ == 0,
                        "{what}: {differ} mask pixels differ"
                    );
                }
            }
        }
    }
}
