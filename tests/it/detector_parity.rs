//! Faster R-CNN parity with torchvision: RPN proposals, RoIAlign features and final
//! detections, for v1 (FrozenBatchNorm, eps 0 as the COCO weights) and v2, on images whose
//! resize hits torchvision's edge cases; and batch invariance.

use crate::common::*;
use detectd::model::detector::{DetectorConfig, DetectorParams, Trace};
use detectd::model::transform::prepare_detector;
use detectd::model::{ArchChoice, DetectRequest, Detection, FasterRcnn};
use tch::{Device, Kind, Tensor};

const IMAGES: [&str; 4] = [
    "d480x640.png:480x640:RGB",
    "d97x130.png:97x130:RGB",
    "d100x2000.png:100x2000:RGB",
    "dgray.png:150x200:L",
];

fn model(arch: &str, extra: &[&str]) -> (FasterRcnn, std::path::PathBuf) {
    model_with(arch, extra, DetectorParams::default())
}

fn model_with(
    arch: &str,
    extra: &[&str],
    params: DetectorParams,
) -> (FasterRcnn, std::path::PathBuf) {
    let mut args = vec![
        "make-detector",
        "--arch",
        arch,
        "--seed",
        "7",
        "--weights",
        "{out}",
    ];
    args.extend_from_slice(extra);
    let weights = tvref(&data_dir().join(format!("det_{arch}.pth")), &args);
    let config = DetectorConfig {
        arch: ArchChoice::Auto,
        frozen_bn_eps: None,
        device: Device::Cpu,
        compute: fp32(),
        params,
    };
    (
        FasterRcnn::load(&weights, &config).expect("load detector"),
        weights,
    )
}

fn reference(
    arch: &str,
    weights: &std::path::Path,
    images: &[std::path::PathBuf],
    extra: &[&str],
) -> std::collections::HashMap<String, Tensor> {
    // One reference file per set of arguments.
    let tag: String = extra.concat().replace(['-', '.'], "");
    let out = data_dir().join(format!("ref_det_{arch}{tag}.safetensors"));
    let w = path_str(weights);
    let mut args = vec![
        "ref-detector",
        "--trace",
        "--arch",
        arch,
        "--weights",
        &w,
        "--out",
        "{out}",
    ];
    args.extend_from_slice(extra);
    let paths: Vec<String> = images.iter().map(|p| path_str(p)).collect();
    args.extend(paths.iter().map(String::as_str));
    read_tensors(&tvref(&out, &args))
}

fn as_tensors(dets: &[Detection]) -> (Tensor, Tensor, Tensor) {
    let boxes: Vec<f32> = dets.iter().flat_map(|d| d.bbox).collect();
    let scores: Vec<f32> = dets.iter().map(|d| d.score).collect();
    let labels: Vec<i64> = dets.iter().map(|d| d.label).collect();
    (
        Tensor::from_slice(&boxes).view([-1, 4]),
        Tensor::from_slice(&scores),
        Tensor::from_slice(&labels),
    )
}

fn check_image(
    name: &str,
    i: usize,
    dets: &[Detection],
    trace: &Trace,
    refs: &std::collections::HashMap<String, Tensor>,
) {
    let r = |k: &str| &refs[&format!("{i}.{k}")];
    assert_equal(
        &format!("{name} proposals"),
        &trace.proposals,
        r("proposals"),
    );
    assert_equal(
        &format!("{name} roi features"),
        &trace.roi_features,
        r("roi_features"),
    );
    let (boxes, scores, labels) = as_tensors(dets);
    assert!(
        !dets.is_empty(),
        "{name}: the perturbed weights should detect something"
    );
    assert_equal(&format!("{name} boxes"), &boxes, r("boxes"));
    assert_equal(&format!("{name} scores"), &scores, r("scores"));
    assert_eq!(labels, r("labels").to_kind(Kind::Int64), "{name} labels");
}

fn parity(arch: &str, extra: &[&str]) {
    parity_with(arch, extra, DetectorParams::default(), &[]);
}

/// `params` for detectd, `knobs` (the same values) for torchvision's constructor.
fn parity_with(arch: &str, extra: &[&str], params: DetectorParams, knobs: &[&str]) {
    let images = images(&IMAGES);
    let (model, weights) = model_with(arch, extra, params);
    let ref_args: Vec<&str> = extra.iter().chain(knobs).copied().collect();
    let refs = reference(arch, &weights, &images, &ref_args);
    for (i, path) in images.iter().enumerate() {
        let prepared = params
            .resize()
            .prepare(&decode_file(path))
            .expect("prepare");
        let request = DetectRequest {
            image: &prepared,
            score_threshold: params.box_score_thresh,
            mask_threshold: None,
        };
        let mut out = model.detect_traced(&[request], true).expect("detect");
        let (dets, trace) = out.remove(0);
        check_image(
            &format!("{arch} {}", path_str(path)),
            i,
            &dets,
            &trace.expect("trace"),
            &refs,
        );
    }
}

#[test]
fn v1_frozen_bn_eps0_matches_torchvision() {
    parity("v1", &["--frozen-eps", "0.0"]);
}

#[test]
fn v2_matches_torchvision() {
    parity("v2", &[]);
}

/// A model built with other constructor arguments (detectd's per-model keys) answers what
/// torchvision built with the same arguments answers: another resize, NMS thresholds and
/// top-n counts, score threshold and detections per image.
#[test]
fn constructor_arguments_match_torchvision_built_with_them() {
    let params = DetectorParams {
        min_size: 600,
        max_size: 1000,
        rpn_pre_nms_top_n_test: 500,
        rpn_post_nms_top_n_test: 300,
        rpn_nms_thresh: 0.6,
        box_score_thresh: 0.02,
        box_nms_thresh: 0.3,
        box_detections_per_img: 60,
    };
    let knobs = [
        "--min-size",
        "600",
        "--max-size",
        "1000",
        "--rpn-pre-nms-top-n-test",
        "500",
        "--rpn-post-nms-top-n-test",
        "300",
        "--rpn-nms-thresh",
        "0.6",
        "--box-score-thresh",
        "0.02",
        "--box-nms-thresh",
        "0.3",
        "--box-detections-per-img",
        "60",
    ];
    parity_with("v1", &["--frozen-eps", "0.0"], params, &knobs);
    parity_with("v2", &[], params, &knobs);
}

/// Each image's result in a batch of mixed sizes equals its single-image result; two of
/// these share a padded size (800×1088) and so share a forward pass.
#[test]
fn batch_results_equal_single_image_results() {
    let images = images(&[
        "b427x640.png:427x640:RGB",
        "b375x500.png:375x500:RGB",
        "b480x640.png:480x640:RGB",
    ]);
    let (mut model, _) = model("v1", &["--frozen-eps", "0.0"]);
    // Shared forward passes, as on a GPU (the CPU default runs images one by one).
    model.images_per_forward = usize::MAX;
    let prepared: Vec<_> = images
        .iter()
        .map(|p| prepare_detector(&decode_file(p)).expect("prepare"))
        .collect();
    let requests = DetectRequest::each(&prepared, 0.05);
    let batch = model.detect(&requests).expect("batch detect");
    for (i, request) in requests.iter().enumerate() {
        let single = model
            .detect(std::slice::from_ref(request))
            .expect("single detect");
        let (b, s) = (as_tensors(&batch[i]), as_tensors(&single[0]));
        assert!(!batch[i].is_empty());
        assert_equal("batched boxes", &b.0, &s.0);
        assert_equal("batched scores", &b.1, &s.1);
        assert_eq!(b.2, s.2, "batched labels");
    }
}
