//! `--precision auto` measured at warm-up and cached, and `detectd compare`.
//!
//! The trial's choice is checked against its own measurements (the fastest setting whose
//! agreement holds), then steered by injecting timings and agreements into the cached
//! decision: the server must follow them on its next start, and never take a setting
//! below the agreement bar. `compare`'s figures are checked against the same figures
//! computed here from torchvision's fp32 detections.

use std::path::{Path, PathBuf};

use crate::common::*;
use crate::precision::{bf16_detections, calibrated_weights, AGREEMENT_IMAGES};
use serde_json::Value;

fn auto_server(cache: &Path, extra: &[&str]) -> Server {
    let weights = classifier_weights();
    let cache = path_str(cache);
    let mut args = vec![
        "--classifier-weights",
        weights.as_str(),
        "--precision",
        "auto",
        "--cache-dir",
        cache.as_str(),
    ];
    args.extend_from_slice(extra);
    Server::start(&args, true)
}

/// The classifier's entry in /v1/models.
fn classifier_status(server: &Server) -> Value {
    let (status, body) = json_of(
        client()
            .get(server.url("/v1/models"))
            .send()
            .expect("models"),
    );
    assert_eq!(status, 200);
    body["models"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "classifier"))
        .cloned()
        .expect("classifier listed")
}

fn decision_file(cache: &Path) -> PathBuf {
    std::fs::read_dir(cache.join("precision"))
        .expect("precision cache folder")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .expect("a cached decision")
}

/// Rewrites the cached measurements: `(precision, seconds, agreement)` for each candidate.
fn inject(cache: &Path, measured: &[(&str, f64, f64)]) {
    let path = decision_file(cache);
    let mut entry: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    entry["decision"]["measured"] = measured
        .iter()
        .map(|(p, s, a)| serde_json::json!({"precision": p, "seconds": s, "agreement": a}))
        .collect();
    std::fs::write(&path, serde_json::to_vec(&entry).unwrap()).unwrap();
}

fn chosen(server: &Server) -> (String, String) {
    let m = classifier_status(server);
    let trial = &m["precision_trial"];
    assert_eq!(m["precision"], trial["chosen"], "{m}");
    let metric = format!(
        "detectd_model_info{{arch=\"resnet50 (preset v2)\",device=\"cpu\",model=\"classifier\",precision={},version=\"1\"}} 1",
        m["precision"]
    );
    assert!(
        server.metrics().contains(&metric),
        "no {metric} in /metrics"
    );
    (
        trial["chosen"].as_str().unwrap().to_string(),
        trial["source"].as_str().unwrap().to_string(),
    )
}

/// Read here, not from detectd: AVX512-BF16 or AMX-BF16 in /proc/cpuinfo's flags.
fn cpu_has_bf16_instructions() -> bool {
    let info = std::fs::read_to_string("/proc/cpuinfo").expect("read /proc/cpuinfo");
    info.lines().filter(|l| l.starts_with("flags")).any(|l| {
        l.split_whitespace()
            .any(|f| f == "avx512_bf16" || f == "amx_bf16")
    })
}

#[test]
fn auto_measures_caches_and_follows_the_measurements() {
    let cache = std::env::temp_dir().join(format!("detectd-auto-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);

    // First start: a trial of fp32, fp32-fast and, where the CPU has bf16 instructions, bf16;
    // the choice is the fastest of those whose agreement holds.
    let server = auto_server(&cache, &[]);
    let m = classifier_status(&server);
    let trial = &m["precision_trial"];
    println!("trial: {trial}");
    assert_eq!(trial["source"], "trial");
    let candidates = trial["candidates"].as_array().unwrap();
    let names: Vec<&str> = candidates
        .iter()
        .map(|c| c["precision"].as_str().unwrap())
        .collect();
    let expected: &[&str] = if cpu_has_bf16_instructions() {
        &["fp32", "fp32-fast", "bf16"]
    } else {
        &["fp32", "fp32-fast"]
    };
    assert_eq!(names, expected);
    let bar = trial["min_agreement"].as_f64().unwrap();
    let fastest_ok = candidates
        .iter()
        .filter(|c| c["agreement"].as_f64().unwrap() >= bar)
        .min_by(|a, b| {
            a["seconds"]
                .as_f64()
                .unwrap()
                .total_cmp(&b["seconds"].as_f64().unwrap())
        })
        .unwrap();
    assert_eq!(trial["chosen"], fastest_ok["precision"]);
    assert!(server.log().contains("precision trial done"));
    drop(server);

    // Second start: the cached decision, no trial.
    let server = auto_server(&cache, &[]);
    assert_eq!(chosen(&server).1, "cache");
    assert!(server.log().contains("precision from the cache"));
    assert!(!server.log().contains("precision trial done"));
    drop(server);

    // Injected timings: whichever is fastest and agrees is chosen.
    inject(
        &cache,
        &[
            ("fp32", 2.0, 1.0),
            ("fp32-fast", 1.0, 1.0),
            ("bf16", 3.0, 1.0),
        ],
    );
    assert_eq!(chosen(&auto_server(&cache, &[])).0, "fp32-fast");
    inject(
        &cache,
        &[
            ("fp32", 2.0, 1.0),
            ("fp32-fast", 1.0, 1.0),
            ("bf16", 0.5, 1.0),
        ],
    );
    assert_eq!(chosen(&auto_server(&cache, &[])).0, "bf16");
    // The fastest below the agreement bar is never chosen; a lower bar admits it.
    inject(
        &cache,
        &[
            ("fp32", 2.0, 1.0),
            ("fp32-fast", 1.0, 1.0),
            ("bf16", 0.5, 0.5),
        ],
    );
    assert_eq!(chosen(&auto_server(&cache, &[])).0, "fp32-fast");
    let lax = auto_server(&cache, &["--auto-min-agreement", "0.4"]);
    assert_eq!(chosen(&lax).0, "bf16");
    drop(lax);

    // An explicit precision skips the trial and the cache.
    let weights = classifier_weights();
    let explicit = Server::start(
        &[
            "--classifier-weights",
            weights.as_str(),
            "--precision",
            "fp32-fast",
        ],
        true,
    );
    let m = classifier_status(&explicit);
    assert_eq!(m["precision"], "fp32-fast");
    assert!(m.get("precision_trial").is_none(), "{m}");
    let _ = std::fs::remove_dir_all(&cache);
}

/// Replicas that start together on one cache folder run one trial: one takes the folder's
/// lock and measures, the other waits for it and reads the decision. A cache that cannot be
/// written (here a folder that cannot be made) leaves a server measuring on its own.
#[test]
fn replicas_share_one_trial_and_an_unwritable_cache_is_measured_around() {
    let cache = std::env::temp_dir().join(format!("detectd-auto-pair-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| auto_server(&cache, &[]));
        let b = s.spawn(|| auto_server(&cache, &[]));
        (a.join().expect("replica a"), b.join().expect("replica b"))
    });
    let (ca, cb) = (chosen(&a), chosen(&b));
    let mut sources = [ca.1.as_str(), cb.1.as_str()];
    sources.sort();
    assert_eq!(sources, ["cache", "trial"], "one trial for two replicas");
    assert_eq!(ca.0, cb.0, "both replicas serve the trial's choice");
    drop((a, b));
    let _ = std::fs::remove_dir_all(&cache);

    let file = std::env::temp_dir().join(format!("detectd-auto-file-{}", std::process::id()));
    std::fs::write(&file, b"not a folder").expect("write");
    let server = auto_server(&file.join("cache"), &[]);
    assert_eq!(chosen(&server).1, "trial");
    assert!(
        server.log().contains("precision cache not usable"),
        "{}",
        server.log()
    );
    drop(server);
    let _ = std::fs::remove_file(&file);
}

fn compare(weights: &Path, precision: &str, imgs: &[PathBuf]) -> Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_detectd"))
        .args([
            "compare",
            "--json",
            "--device",
            "cpu",
            "--precision",
            precision,
        ])
        .args(["--weights", &path_str(weights)])
        .args(imgs)
        .output()
        .expect("run detectd compare");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("compare --json")
}

fn iou(a: &[f32], b: &[f32]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let area = |r: &[f32]| (r[2] - r[0]) * (r[3] - r[1]);
    w * h / (area(a) + area(b) - w * h)
}

#[test]
fn compare_prints_what_torchvision_fp32_against_detectd_bf16_gives() {
    let weights = calibrated_weights("v1");
    // The first agreement image only: the figures are checked, not the agreement (held by
    // `precision.rs` on all of them), and bf16 is emulated where the CPU has no bf16 (~25 s an
    // image on a Zen 3).
    let imgs = images(&AGREEMENT_IMAGES[..1]);
    // The same setting agrees with itself entirely.
    let same = compare(&weights, "fp32", &imgs);
    assert_eq!(same["share"], 1.0, "{same}");
    assert_eq!(same["agreement"]["max_box_drift"], 0.0);

    // bf16: the figures computed here from torchvision's fp32 detections.
    let reference = read_tensors(&tvref(
        &data_dir().join("ref_det_v1_calibrated.safetensors"),
        &[
            &[
                "ref-detector",
                "--arch",
                "v1",
                "--weights",
                &path_str(&weights),
                "--out",
                "{out}",
            ][..],
            &imgs.iter().map(|p| p.to_str().unwrap()).collect::<Vec<_>>()[..],
        ]
        .concat(),
    ));
    // detectd's bf16 detections on those images, as the agreement test ran them.
    let bf16 = &bf16_detections()[..1];
    let (mut matched, mut total, mut box_drift, mut score_drift) = (0, 0, 0f32, 0f32);
    for (i, ours) in bf16.iter().enumerate() {
        let boxes = Vec::<f32>::try_from(reference[&format!("{i}.boxes")].reshape([-1])).unwrap();
        let scores = Vec::<f32>::try_from(&reference[&format!("{i}.scores")]).unwrap();
        let labels = Vec::<i64>::try_from(&reference[&format!("{i}.labels")]).unwrap();
        for (j, (&score, &label)) in scores.iter().zip(&labels).enumerate() {
            if score < 0.3 {
                continue;
            }
            total += 1;
            let rbox = &boxes[j * 4..j * 4 + 4];
            let best = ours
                .iter()
                .filter(|d| d.label == label)
                .map(|d| (iou(&d.bbox, rbox), d))
                .max_by(|a, b| a.0.total_cmp(&b.0));
            if let Some((_, d)) = best.filter(|(o, _)| *o >= 0.9) {
                matched += 1;
                for (a, b) in d.bbox.iter().zip(rbox) {
                    box_drift = box_drift.max((a - b).abs());
                }
                score_drift = score_drift.max((d.score - score).abs());
            }
        }
    }
    let printed = compare(&weights, "bf16", &imgs);
    println!("compare bf16: {printed}; computed here: {matched}/{total}, drift {box_drift} px, {score_drift}");
    let a = &printed["agreement"];
    assert_eq!(a["matched"], matched);
    assert_eq!(a["total"], total);
    assert!(total >= 20, "too few confident detections: {total}");
    assert!((a["max_box_drift"].as_f64().unwrap() - box_drift as f64).abs() < 1e-4);
    assert!((a["max_score_drift"].as_f64().unwrap() - score_drift as f64).abs() < 1e-6);
}
