//! Checkpoint loading: torch.save zip and legacy formats, safetensors, pre-0.13 key names,
//! fine-tuned class counts with a labels file, and an error that names what does not fit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common::*;
use detectd::model::detector::{rename_legacy_keys, DetectorConfig};
use detectd::model::{ArchChoice, Classifier, FasterRcnn};
use detectd::weights::StateDict;
use tch::{Device, Tensor};

fn v1(format: &str, extra: &[&str]) -> PathBuf {
    let ext = if format == "safetensors" {
        "safetensors"
    } else {
        "pth"
    };
    let tag = extra.join("").replace('-', "");
    let out = data_dir().join(format!("w_v1_{format}{tag}.{ext}"));
    let mut args = vec![
        "make-detector",
        "--arch",
        "v1",
        "--frozen-eps",
        "0.0",
        "--seed",
        "7",
        "--format",
        format,
        "--weights",
        "{out}",
    ];
    args.extend_from_slice(extra);
    tvref(&out, &args)
}

fn load(path: &Path) -> Result<FasterRcnn, String> {
    let config = DetectorConfig {
        arch: ArchChoice::Auto,
        frozen_bn_eps: None,
        device: Device::Cpu,
        compute: fp32(),
        params: Default::default(),
    };
    FasterRcnn::load(path, &config).map_err(|e| e.to_string())
}

fn assert_same_tensors(a: &StateDict, b: &StateDict) {
    assert_eq!(
        a.tensors.keys().collect::<Vec<_>>(),
        b.tensors.keys().collect::<Vec<_>>()
    );
    for (k, t) in &a.tensors {
        assert!(t.equal(&b.tensors[k]), "{k} differs");
    }
}

#[test]
fn zip_legacy_pickle_and_safetensors_hold_the_same_tensors() {
    let zip = StateDict::load(&v1("pth", &[])).expect("zip .pth");
    let legacy = StateDict::load(&v1("pth-legacy", &[])).expect("legacy .pth");
    let safetensors = StateDict::load(&v1("safetensors", &[])).expect("safetensors");
    assert_same_tensors(&zip, &legacy);
    assert_same_tensors(&zip, &safetensors);
    for f in ["pth-legacy", "safetensors"] {
        load(&v1(f, &[])).unwrap_or_else(|e| panic!("{f}: {e}"));
    }
    let cls = tvref(
        &data_dir().join("w_cls_legacy.pth"),
        &[
            "make-classifier",
            "--format",
            "pth-legacy",
            "--weights",
            "{out}",
        ],
    );
    Classifier::load(&cls, Device::Cpu, fp32()).expect("legacy-format classifier");
}

#[test]
fn pre_013_key_names_are_renamed() {
    let mut legacy = StateDict::load(&v1("pth", &["--legacy-names"])).expect("legacy names");
    assert!(legacy.has("backbone.fpn.inner_blocks.0.weight") && legacy.has("rpn.head.conv.weight"));
    rename_legacy_keys(&mut legacy);
    assert_same_tensors(
        &legacy,
        &StateDict::load(&v1("pth", &[])).expect("current names"),
    );
    load(&v1("pth", &["--legacy-names"])).expect("legacy names load");
}

/// Mask R-CNN and Keypoint R-CNN load like the detector: old key names (`mask_fcn{i}`),
/// the legacy pickle format, safetensors, and a fine-tuned class count.
#[test]
fn mask_and_keypoint_checkpoints_load_in_every_form() {
    use detectd::model::detector::Family;
    let make = |arch: &str, classes: &str, format: &str, ext: &str, extra: &[&str]| {
        let out = data_dir().join(format!(
            "w_{arch}_{classes}_{format}{}.{ext}",
            extra.concat()
        ));
        let mut args = vec![
            "make-detector",
            "--arch",
            arch,
            "--seed",
            "7",
            "--num-classes",
            classes,
            "--format",
            format,
            "--weights",
            "{out}",
        ];
        args.extend_from_slice(extra);
        tvref(&out, &args)
    };
    let old = make(
        "mask-v1",
        "5",
        "safetensors",
        "safetensors",
        &["--legacy-names"],
    );
    let mut sd = StateDict::load(&old).expect("legacy names");
    assert!(sd.has("roi_heads.mask_head.mask_fcn1.weight"));
    rename_legacy_keys(&mut sd);
    let current = make("mask-v1", "5", "safetensors", "safetensors", &[]);
    assert_same_tensors(&sd, &StateDict::load(&current).expect("current names"));
    let model = load(&old).expect("old mask names load");
    assert_eq!((model.family, model.num_classes), (Family::MaskRcnn, 5));
    let keypoints = load(&make("keypoint", "2", "pth-legacy", "pth", &[])).expect("keypoints");
    assert_eq!(
        (keypoints.family, keypoints.num_keypoints()),
        (Family::KeypointRcnn, Some(17))
    );
    assert_eq!(keypoints.arch_name(), "keypointrcnn_resnet50_fpn_v1");
}

/// Writes a copy of the v1 checkpoint with `edit` applied, as safetensors.
fn edited(name: &str, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) -> PathBuf {
    let mut sd = StateDict::load(&v1("pth", &[])).expect("load v1");
    edit(&mut sd.tensors);
    let path = data_dir().join(format!("edited_{name}.safetensors"));
    let list: Vec<(&str, &Tensor)> = sd.tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    Tensor::write_safetensors(&list, &path).expect("write safetensors");
    path
}

#[test]
fn wrong_files_name_what_does_not_fit() {
    let missing = edited("missing", |t| {
        t.remove("roi_heads.box_head.fc7.bias");
    });
    let err = load(&missing).err().expect("missing key must fail");
    assert!(
        err.contains("1 missing keys: roi_heads.box_head.fc7.bias"),
        "{err}"
    );

    let extra = edited("extra", |t| {
        t.insert(
            "roi_heads.mask_head.weight".into(),
            Tensor::zeros([2], (tch::Kind::Float, Device::Cpu)),
        );
    });
    let err = load(&extra).err().expect("unexpected key must fail");
    assert!(
        err.contains("unexpected keys: roi_heads.mask_head.weight"),
        "{err}"
    );

    let shape = edited("shape", |t| {
        t.insert(
            "roi_heads.box_head.fc7.weight".into(),
            Tensor::zeros([1024, 10], (tch::Kind::Float, Device::Cpu)),
        );
    });
    let err = load(&shape).err().expect("shape mismatch must fail");
    assert!(
        err.contains(
            "roi_heads.box_head.fc7.weight: file has [1024, 10], model expects [1024, 1024]"
        ),
        "{err}"
    );

    let cls = tvref(
        &data_dir().join("cls.pth"),
        &["make-classifier", "--seed", "3", "--weights", "{out}"],
    );
    let err = load(&cls).err().expect("classifier is not a detector");
    assert!(err.contains("not a Faster R-CNN checkpoint"), "{err}");
    let err = Classifier::load(&v1("pth", &[]), Device::Cpu, fp32())
        .err()
        .expect("detector is not a classifier")
        .to_string();
    assert!(err.contains("no fc.weight"), "{err}");

    let garbage = data_dir().join("garbage.pth");
    std::fs::write(&garbage, b"this is not a checkpoint").expect("write garbage");
    let err = load(&garbage).err().expect("garbage must fail");
    assert!(err.contains("not a PyTorch checkpoint"), "{err}");

    let config = DetectorConfig {
        arch: ArchChoice::V2,
        frozen_bn_eps: None,
        device: Device::Cpu,
        compute: fp32(),
        params: Default::default(),
    };
    let err = FasterRcnn::load(&v1("pth", &[]), &config)
        .err()
        .expect("arch mismatch")
        .to_string();
    assert!(err.contains("holds a V1 detector"), "{err}");
}
