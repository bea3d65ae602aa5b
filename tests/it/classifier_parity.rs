//! ResNet-50 classifier parity with torchvision's `ImageClassification` presets (V1: resize
//! 256, V2: resize 232), on sizes that exercise the crop rounding and upscaling.

use crate::common::*;
use detectd::model::classifier::CROP;
use detectd::model::transform::prepare_classifier;
use detectd::model::{Classifier, Preset};
use tch::Device;

const IMAGES: [&str; 5] = [
    "c375x500.png:375x500:RGB",
    "c500x341.png:500x341:RGB",
    "c100x80.png:100x80:RGB",
    "cgray.png:240x320:L",
    "c232x300.png:232x300:RGB",
];

/// How far a batch's probabilities may be from each image's alone.
const BATCHED_PROBS: f64 = 1e-4;

fn parity(preset: Preset, name: &str) {
    let images = images(&IMAGES);
    let weights = tvref(
        &data_dir().join("cls.pth"),
        &["make-classifier", "--seed", "3", "--weights", "{out}"],
    );
    let w = path_str(&weights);
    let mut args = vec![
        "ref-classifier",
        "--preset",
        name,
        "--weights",
        &w,
        "--out",
        "{out}",
    ];
    let paths: Vec<String> = images.iter().map(|p| path_str(p)).collect();
    args.extend(paths.iter().map(String::as_str));
    let refs = read_tensors(&tvref(
        &data_dir().join(format!("ref_cls_{name}.safetensors")),
        &args,
    ));
    let model = Classifier::load(&weights, Device::Cpu, fp32()).expect("load classifier");
    let inputs: Vec<_> = images
        .iter()
        .map(|p| prepare_classifier(&decode_file(p), preset.resize(), CROP).expect("prepare"))
        .collect();
    // Each image alone is torchvision's answer to the bit (torchvision's reference runs them
    // one by one). In a batch, as the server runs them, oneDNN blocks the convolutions
    // differently: the probabilities move by up to 1.4e-5 (measured), the classes do not.
    let refs_in: Vec<_> = inputs.iter().collect();
    let probs = model.probabilities(&refs_in).expect("classify");
    for (i, path) in images.iter().enumerate() {
        let what = format!("{name} {}", path_str(path));
        assert_equal(
            &format!("{what} input"),
            &inputs[i],
            &refs[&format!("{i}.input")],
        );
        let alone = model.probabilities(&[&inputs[i]]).expect("classify one");
        let theirs = &refs[&format!("{i}.probs")];
        assert_equal(&format!("{what} probabilities"), &alone.get(0), theirs);
        let batched = max_abs_diff(&probs.get(i as i64), theirs);
        assert!(
            batched <= BATCHED_PROBS,
            "{what}: in a batch of {}, probabilities {batched:e} from torchvision's",
            images.len()
        );
        assert_eq!(
            probs.get(i as i64).argmax(0, false).int64_value(&[]),
            theirs.argmax(0, false).int64_value(&[]),
            "{what}: top-1 in a batch"
        );
    }
    let top1: Vec<i64> = (0..images.len() as i64)
        .map(|i| probs.get(i).argmax(0, false).int64_value(&[]))
        .collect();
    assert!(
        top1.iter().any(|&c| c != top1[0]) || images.len() == 1,
        "perturbed weights should not predict one class for all"
    );
}

#[test]
fn preset_v1_matches_torchvision() {
    parity(Preset::V1, "v1");
}

#[test]
fn preset_v2_matches_torchvision() {
    parity(Preset::V2, "v2");
}
