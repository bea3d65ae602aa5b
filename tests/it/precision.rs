//! Agreement of the fast precisions with exact fp32, on the same seeded weights (BatchNorm
//! statistics calibrated from images): the share of fp32 detections scoring ≥ 0.3 that have a
//! detection with the same label and IoU ≥ 0.9 (the measure `auto` and `detectd compare`
//! use), their largest box and score drift, and classifier top-1 agreement. Each figure the
//! README states is asserted here at the bar it states: fp32-fast reproduces every confident
//! detection within `FP32_FAST_BOX_DRIFT`; bf16 reaches `BF16_DETECTIONS` and
//! `BF16_TOP1` (on random weights bf16 cannot do better: torchvision's own bf16 conversion of
//! the same random backbone is off by 13-17% in its features, where a trained network is off
//! by ~1%, and no pretrained weights can be downloaded here).

use crate::common::*;
use detectd::model::agreement::DetectionAgreement;
use detectd::model::classifier::CROP;
use detectd::model::detector::DetectorConfig;
use detectd::model::transform::{prepare_classifier, prepare_detector, Prepared};
use detectd::model::{
    resolve_precision, ArchChoice, Classifier, Compute, DetectRequest, Detection, FasterRcnn,
    Named, Precision, Preset,
};
use std::sync::OnceLock;
use tch::Device;

/// The calibrated seeded detector's weights, `det_{arch}_calibrated.pth`.
pub fn calibrated_weights(arch: &str) -> std::path::PathBuf {
    // BatchNorm statistics from data and small residual branches, as in trained weights.
    let args = [
        "make-detector",
        "--arch",
        arch,
        "--seed",
        "7",
        "--calibrate",
        "--weights",
        "{out}",
    ];
    tvref(
        &data_dir().join(format!("det_{arch}_calibrated.pth")),
        &args,
    )
}

/// That detector in `precision`.
fn detector(arch: &str, precision: Precision) -> FasterRcnn {
    let weights = calibrated_weights(arch);
    let compute = resolve_precision(precision, Device::Cpu).1;
    let config = DetectorConfig {
        arch: ArchChoice::Auto,
        frozen_bn_eps: None,
        device: Device::Cpu,
        compute,
        params: Default::default(),
    };
    FasterRcnn::load(&weights, &config).expect("load detector")
}

/// fp32-fast's largest box drift (pixels) and score drift on matched detections: a folded
/// BatchNorm and channels-last convolutions sum in another order, ~1e-5 relative.
const FP32_FAST_BOX_DRIFT: f32 = 0.05;
const FP32_FAST_SCORE_DRIFT: f32 = 1e-3;
/// bf16's share of fp32's confident detections on these seeded weights (measured 0.89 on an
/// EPYC Zen 4 with AVX512-BF16, 0.873 = 62/71 on a Zen 3, where oneDNN emulates bf16).
const BF16_DETECTIONS: f64 = 0.8;
/// bf16's top-1 agreement with fp32 on the 20 classifier images (measured 16/20 on the Zen 3).
/// Random weights put many top-1 classes within bf16's rounding of the second, so the bar
/// leaves two images to the CPU's kernels; a broken bf16 path (classes shifted, a wrong
/// layout) agrees on one image in twenty or none.
const BF16_TOP1: f64 = 0.7;

/// The three images the detector agreement is measured on (here and by `detectd compare`'s
/// test).
pub const AGREEMENT_IMAGES: [&str; 3] = [
    "d480x640.png:480x640:RGB",
    "dgray.png:150x200:L",
    "b375x500.png:375x500:RGB",
];

/// Those images, prepared.
fn agreement_inputs() -> Vec<Prepared> {
    images(&AGREEMENT_IMAGES)
        .iter()
        .map(|p| prepare_detector(&decode_file(p)).expect("prepare"))
        .collect()
}

/// fp32's detections on those images, run once per architecture for every test that needs
/// them.
fn exact_detections(arch: &'static str) -> &'static [Vec<Detection>] {
    static V1: OnceLock<Vec<Vec<Detection>>> = OnceLock::new();
    static V2: OnceLock<Vec<Vec<Detection>>> = OnceLock::new();
    let cell = match arch {
        "v1" => &V1,
        "v2" => &V2,
        other => panic!("no calibrated detector {other}"),
    };
    cell.get_or_init(|| run_detector(arch, Precision::Fp32))
}

/// v1's bf16 detections on those images, run once for this file's bar and for the test of
/// `detectd compare` (bf16 without bf16 instructions takes minutes on 2 cores).
pub fn bf16_detections() -> &'static [Vec<Detection>] {
    static BF16: OnceLock<Vec<Vec<Detection>>> = OnceLock::new();
    BF16.get_or_init(|| run_detector("v1", Precision::Bf16))
}

fn run_detector(arch: &str, precision: Precision) -> Vec<Vec<Detection>> {
    let prepared = agreement_inputs();
    detector(arch, precision)
        .detect(&DetectRequest::each(&prepared, 0.05))
        .expect("detect")
}

/// How `fast`, `arch`'s detections in `precision`, reproduce fp32's confident detections over
/// the three images.
fn detector_agreement(
    arch: &'static str,
    precision: Precision,
    fast: &[Vec<Detection>],
) -> DetectionAgreement {
    let exact = exact_detections(arch);
    let mut a = DetectionAgreement::default();
    for (e, f) in exact.iter().zip(fast) {
        a.add(e, f, 0);
    }
    println!(
        "detector {arch} {}: matches {} of {} fp32 detections scoring >= 0.3 ({:.1}%), \
         largest box drift {} px, score drift {}",
        precision.name(),
        a.matched,
        a.total,
        a.share() * 100.0,
        a.max_box_drift,
        a.max_score_drift
    );
    assert!(
        a.total >= 20,
        "{arch}: too few confident detections to judge: {}",
        a.total
    );
    a
}

#[test]
fn fp32_fast_reproduces_every_confident_detection() {
    for arch in ["v1", "v2"] {
        let fast = run_detector(arch, Precision::Fp32Fast);
        let a = detector_agreement(arch, Precision::Fp32Fast, &fast);
        assert_eq!(a.matched, a.total, "{arch}: fp32-fast agreement");
        assert!(
            a.max_box_drift <= FP32_FAST_BOX_DRIFT && a.max_score_drift <= FP32_FAST_SCORE_DRIFT,
            "{arch}: fp32-fast drifts {} px, {} in score",
            a.max_box_drift,
            a.max_score_drift
        );
    }
}

#[test]
fn bf16_detections_agree_with_fp32_at_the_stated_bar() {
    let a = detector_agreement("v1", Precision::Bf16, bf16_detections());
    assert!(
        a.share() >= BF16_DETECTIONS,
        "bf16 reproduces {} of {} fp32 detections, under {BF16_DETECTIONS}",
        a.matched,
        a.total
    );
}

#[test]
fn fast_classifier_top1_agrees_with_fp32() {
    let specs: Vec<String> = (0..20)
        .map(|i| format!("p{i}.png:{}x{}:RGB", 200 + 9 * i, 260 - 4 * i))
        .collect();
    let imgs = images(&specs.iter().map(String::as_str).collect::<Vec<_>>());
    let weights = tvref(
        &data_dir().join("cls_calibrated.pth"),
        &[
            "make-classifier",
            "--seed",
            "3",
            "--calibrate",
            "--weights",
            "{out}",
        ],
    );
    let inputs: Vec<_> = imgs
        .iter()
        .map(|p| prepare_classifier(&decode_file(p), Preset::V2.resize(), CROP).expect("prepare"))
        .collect();
    let refs: Vec<_> = inputs.iter().collect();
    let top1 = |compute: Compute| -> Vec<i64> {
        let model = Classifier::load(&weights, Device::Cpu, compute).expect("load classifier");
        let probs = model.probabilities(&refs).expect("classify");
        Vec::<i64>::try_from(probs.argmax(1, false)).expect("top-1")
    };
    let exact = top1(fp32());
    for (precision, bar) in [(Precision::Fp32Fast, 1.0), (Precision::Bf16, BF16_TOP1)] {
        let fast = top1(resolve_precision(precision, Device::Cpu).1);
        let same = exact.iter().zip(&fast).filter(|(a, b)| a == b).count();
        let share = same as f64 / exact.len() as f64;
        println!(
            "classifier {}: top-1 equals fp32 on {same} of {} images",
            precision.name(),
            exact.len()
        );
        assert!(
            share >= bar,
            "classifier {}: top-1 agreement {share} under {bar}",
            precision.name()
        );
    }
}
