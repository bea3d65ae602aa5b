//! The CLI contract: one JSON line per image in order, boxes in original pixels sorted by
//! score, label names from the tables or a labels file; unreadable files are named on stderr
//! while the others are still printed, and the exit code says something failed.

use std::process::{Command, Output};

use crate::common::*;
use serde_json::Value;

fn detectd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_detectd"))
        .args(args)
        .output()
        .expect("run detectd")
}

fn lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

/// A fine-tuned 5-class detector with a labels file: classes from the predictor's shape, names
/// from the file, detections equal to torchvision's.
#[test]
fn detect_fine_tuned_checkpoint_with_labels_file() {
    let imgs = images(&["d480x640.png:480x640:RGB"]);
    let weights = tvref(
        &data_dir().join("det_5class.pth"),
        &[
            "make-detector",
            "--arch",
            "v1",
            "--frozen-eps",
            "0.0",
            "--num-classes",
            "5",
            "--seed",
            "9",
            "--weights",
            "{out}",
        ],
    );
    let labels = data_dir().join("5class.txt");
    std::fs::write(&labels, "background\ncat\ndog\nbird\nfish\n").expect("write labels");
    let (w, img) = (path_str(&weights), path_str(&imgs[0]));
    let refs = read_tensors(&tvref(
        &data_dir().join("ref_5class.safetensors"),
        &[
            "ref-detector",
            "--arch",
            "v1",
            "--frozen-eps",
            "0.0",
            "--num-classes",
            "5",
            "--weights",
            &w,
            "--out",
            "{out}",
            &img,
        ],
    ));
    let out = detectd(&[
        "detect",
        "--weights",
        &w,
        "--labels",
        &path_str(&labels),
        "--device",
        "cpu",
        &img,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result = &lines(&out)[0];
    assert_eq!(
        (
            result["image"].as_str(),
            result["width"].as_i64(),
            result["height"].as_i64()
        ),
        (Some(img.as_str()), Some(640), Some(480))
    );
    let dets = result["detections"].as_array().expect("detections");
    let ref_scores: Vec<f32> = refs["0.scores"].shallow_clone().try_into().expect("scores");
    let ref_labels: Vec<i64> = refs["0.labels"].shallow_clone().try_into().expect("labels");
    assert_eq!(dets.len(), ref_scores.len());
    assert!(!dets.is_empty());
    let names = ["background", "cat", "dog", "bird", "fish"];
    for (i, d) in dets.iter().enumerate() {
        assert!((d["score"].as_f64().expect("score") - ref_scores[i] as f64).abs() < 1e-4);
        assert_eq!(d["label_id"].as_i64(), Some(ref_labels[i]));
        assert_eq!(d["label"].as_str(), Some(names[ref_labels[i] as usize]));
        assert!(
            i == 0 || dets[i - 1]["score"].as_f64() >= d["score"].as_f64(),
            "sorted by score"
        );
    }
}

#[test]
fn unreadable_files_are_named_and_the_rest_still_printed() {
    let imgs = images(&["cgray.png:240x320:L", "c100x80.png:100x80:RGB"]);
    let weights = tvref(
        &data_dir().join("cls.pth"),
        &["make-classifier", "--seed", "3", "--weights", "{out}"],
    );
    let broken = data_dir().join("broken.jpg");
    std::fs::write(&broken, b"\xff\xd8\xff\xe0 truncated").expect("write broken");
    let missing = data_dir().join("no-such-file.png");
    let args = [
        "classify",
        "--weights",
        &path_str(&weights),
        "--top-k",
        "3",
        "--device",
        "cpu",
        &path_str(&imgs[0]),
        &path_str(&broken),
        &path_str(&missing),
        &path_str(&imgs[1]),
    ];
    let out = detectd(&args);
    assert!(
        !out.status.success(),
        "a failed file must fail the exit code"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("broken.jpg") && stderr.contains("no-such-file.png"),
        "{stderr}"
    );
    let results = lines(&out);
    assert_eq!(results.len(), 2);
    assert_eq!(
        results[0]["image"].as_str(),
        Some(path_str(&imgs[0]).as_str())
    );
    assert_eq!(
        results[1]["image"].as_str(),
        Some(path_str(&imgs[1]).as_str())
    );
    for r in &results {
        let preds = r["predictions"].as_array().expect("predictions");
        assert_eq!(preds.len(), 3);
        let total: f64 = preds
            .iter()
            .map(|p| p["score"].as_f64().unwrap_or(0.0))
            .sum();
        assert!(total <= 1.0 + 1e-5);
        let id = preds[0]["label_id"].as_i64().expect("label id");
        assert_eq!(
            preds[0]["label"].as_str(),
            Some(detectd::labels::Labels::imagenet().name(id))
        );
    }
}

/// `weights fetch --help` names every checkpoint `weights list` prints, and counts them: both
/// come from one table (a help text once said "all four" when there were eight).
#[test]
fn fetch_help_names_what_weights_list_lists() {
    let cache = tempfile::tempdir().expect("temp dir");
    let cache_dir = path_str(cache.path());
    let list = detectd(&["weights", "list", "--cache-dir", &cache_dir]);
    assert!(list.status.success(), "{list:?}");
    let listed: Vec<Vec<String>> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .skip(1)
        .map(|row| {
            // "fasterrcnn-v1, v1   -   /path   url": the names before the cached column.
            let names = row.split("   ").next().unwrap_or("");
            names.split(", ").map(|n| n.trim().to_owned()).collect()
        })
        .collect();
    assert!(listed.len() >= 8, "{listed:?}");
    let help = detectd(&["weights", "fetch", "--help"]);
    assert!(help.status.success(), "{help:?}");
    let help = String::from_utf8_lossy(&help.stdout).replace('\n', " ");
    assert!(
        help.contains(&format!("(all {} when none is named)", listed.len())),
        "{help}"
    );
    let words: Vec<&str> = help
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .collect();
    for name in listed.iter().flatten() {
        assert!(
            words.contains(&name.as_str()),
            "{name} is not in the help: {help}"
        );
    }
}
