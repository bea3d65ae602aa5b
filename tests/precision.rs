//! Accuracy guard for the fast precisions against exact fp32, on the same seeded weights: the
//! share of fp32 detections scoring ≥ 0.3 that have a detection with the same label and
//! IoU ≥ 0.9, and classifier top-1 agreement. fp32-fast must reach 95% (the bar `auto` holds
//! every setting to; tests/precision_auto.rs). bf16 is run and its figures printed, without a
//! bar: on random weights
//! it cannot be judged (torchvision's own bf16 conversion of the same random backbone is off by
//! 13-17% in its features, where a trained network is off by ~1%), and no pretrained weights
//! can be downloaded here.

mod common;

use common::*;
use detectd::model::agreement::DetectionAgreement;
use detectd::model::classifier::CROP;
use detectd::model::detector::DetectorConfig;
use detectd::model::transform::{prepare_classifier, prepare_detector};
use detectd::model::{
    resolve_precision, ArchChoice, Classifier, Compute, DetectRequest, FasterRcnn, Named,
    Precision, Preset,
};
use tch::Device;

fn detector(arch: &str, precision: Precision) -> FasterRcnn {
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
    let weights = tvref(
        &data_dir().join(format!("det_{arch}_calibrated.pth")),
        &args,
    );
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

/// The share of confident fp32 detections that `precision` reproduces, over three images.
fn detector_agreement(arch: &str, precision: Precision) -> (usize, usize) {
    let imgs = images(&[
        "d480x640.png:480x640:RGB",
        "dgray.png:150x200:L",
        "b375x500.png:375x500:RGB",
    ]);
    let prepared: Vec<_> = imgs
        .iter()
        .map(|p| prepare_detector(&decode_file(p)).expect("prepare"))
        .collect();
    let requests = DetectRequest::each(&prepared, 0.05);
    let exact = detector(arch, Precision::Fp32)
        .detect(&requests)
        .expect("fp32");
    let fast = detector(arch, precision)
        .detect(&requests)
        .expect("fast precision");
    let mut a = DetectionAgreement::default();
    for (e, f) in exact.iter().zip(&fast) {
        a.add(e, f, 0);
    }
    let (matched, total) = (a.matched, a.total);
    println!(
        "detector {arch} {}: matches {matched} of {total} fp32 detections scoring >= 0.3 ({:.1}%)",
        precision.name(),
        matched as f64 * 100.0 / total.max(1) as f64
    );
    (matched, total)
}

#[test]
fn fp32_fast_detections_agree_with_fp32() {
    for arch in ["v1", "v2"] {
        let (matched, total) = detector_agreement(arch, Precision::Fp32Fast);
        assert!(
            total >= 20,
            "{arch}: too few confident detections to judge: {total}"
        );
        assert!(
            matched as f64 / total as f64 >= 0.95,
            "{arch}: fp32-fast agreement {matched}/{total}"
        );
    }
}

#[test]
fn bf16_detections_are_reported() {
    let (_, total) = detector_agreement("v1", Precision::Bf16);
    assert!(
        total >= 20,
        "too few confident detections to judge: {total}"
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
    for precision in [Precision::Fp32Fast, Precision::Bf16] {
        let fast = top1(resolve_precision(precision, Device::Cpu).1);
        let same = exact.iter().zip(&fast).filter(|(a, b)| a == b).count();
        println!(
            "classifier {}: top-1 equals fp32 on {same} of {} images",
            precision.name(),
            exact.len()
        );
        if precision == Precision::Fp32Fast {
            assert!(same as f64 / exact.len() as f64 >= 0.95);
        }
    }
}
