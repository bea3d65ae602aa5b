//! Several models by name on one real server: each answers what torchvision answers for its
//! weights and settings; versions swapped by the admin API under load without a failed
//! request; a broken checkpoint leaves the serving version alone; DELETE unloads; SIGHUP
//! applies a changed config file; --max-memory-mb refuses a load.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{json, Value};
use tch::Tensor;

const IMAGE: &str = "m480x640.png:480x640:RGB";

fn detector(name: &str, arch: &str, seed: &str, classes: &str) -> String {
    let mut args = vec!["make-detector", "--arch", arch, "--seed", seed];
    if arch == "v1" {
        args.extend(["--frozen-eps", "0.0"]);
    }
    args.extend(["--num-classes", classes, "--weights", "{out}"]);
    path_str(&tvref(&data_dir().join(name), &args))
}

/// torchvision's detections for `weights` built with `knobs` (constructor arguments).
fn tv_detections(
    tag: &str,
    arch: &str,
    weights: &str,
    classes: &str,
    knobs: &[&str],
    image: &str,
) -> HashMap<String, Tensor> {
    let mut args = vec!["ref-detector", "--arch", arch, "--num-classes", classes];
    if arch == "v1" {
        args.extend(["--frozen-eps", "0.0"]);
    }
    args.extend(knobs);
    args.extend(["--weights", weights, "--out", "{out}", image]);
    read_tensors(&tvref(
        &data_dir().join(format!("ref_models_{tag}.safetensors")),
        &args,
    ))
}

/// The server's detections equal torchvision's (boxes 1e-3 px, scores 1e-4, labels, names).
fn assert_same(what: &str, answer: &Value, refs: &HashMap<String, Tensor>, names: Option<&[&str]>) {
    let dets = answer["results"][0]["detections"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: {answer}"));
    let boxes: Vec<f32> = refs["0.boxes"].reshape([-1]).try_into().expect("boxes");
    let scores: Vec<f32> = refs["0.scores"].shallow_clone().try_into().expect("scores");
    let labels: Vec<i64> = refs["0.labels"].shallow_clone().try_into().expect("labels");
    assert_eq!(dets.len(), scores.len(), "{what}: detection count");
    assert!(
        !dets.is_empty(),
        "{what}: the seeded weights should detect something"
    );
    for (i, d) in dets.iter().enumerate() {
        assert_eq!(d["label_id"].as_i64(), Some(labels[i]), "{what} #{i}");
        let score = d["score"].as_f64().expect("score");
        assert!(
            (score - scores[i] as f64).abs() < 1e-4,
            "{what} #{i}: score"
        );
        for k in 0..4 {
            let b = d["box"][k].as_f64().expect("box");
            assert!(
                (b - boxes[4 * i + k] as f64).abs() < 1e-3,
                "{what} #{i}: box"
            );
        }
        if let Some(names) = names {
            assert_eq!(
                d["label"].as_str(),
                Some(names[labels[i] as usize]),
                "{what}"
            );
        }
    }
}

fn labels_file() -> PathBuf {
    let labels = data_dir().join("models-5class.txt");
    std::fs::write(&labels, "background\ncat\ndog\nbird\nfish\n").expect("write labels");
    labels
}

const NAMES: [&str; 5] = ["background", "cat", "dog", "bird", "fish"];

fn get_json(server: &Server, path: &str) -> Value {
    client()
        .get(server.url(path))
        .send()
        .and_then(|r| r.json())
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

fn model<'a>(list: &'a Value, name: &str) -> &'a Value {
    list["models"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == name))
        .unwrap_or_else(|| panic!("{name} not listed: {list}"))
}

/// Two detectors (v1, v2 with other constructor arguments), a fine-tuned 5-class detector with
/// its labels, and a classifier, from a config file and a --model flag: each route answers what
/// torchvision answers for that model's weights and settings.
#[test]
fn several_models_answer_as_torchvision_with_their_own_settings() {
    let img = path_str(&images(&[IMAGE])[0]);
    let v1 = detector("det_v1.pth", "v1", "7", "91");
    let v2 = detector("models_det_v2.pth", "v2", "7", "91");
    let parts = detector("det_5class.pth", "v1", "9", "5");
    let cls = classifier_weights();
    let labels = labels_file();
    let config = data_dir().join("models-several.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[model]]
name = "general"
source = "{v1}"

[[model]]
name = "parts"
source = "{parts}"
labels = "{labels}"
box_score_thresh = 0.1
default = true

[[model]]
name = "cls"
source = "{cls}"
task = "classify"
preset = "v1"
"#,
            labels = path_str(&labels)
        ),
    )
    .expect("write config");
    let v2_flag = format!(
        "v2={v2},min_size=600,max_size=1000,box_nms_thresh=0.3,rpn_post_nms_top_n_test=300"
    );
    let server = Server::start(
        &[
            "--config",
            &path_str(&config),
            "--model",
            &v2_flag,
            "--warmup-images",
            "0",
        ],
        true,
    );
    let png = std::fs::read(&img).expect("image");
    let detect = |path: &str| {
        let (status, body) = json_of(post(&server, path, "image/png", png.clone()));
        assert_eq!(status, 200, "{path}: {body}");
        body
    };

    let general = detect("/v1/models/general/detect");
    assert_eq!(general["model"]["name"], "general");
    assert_eq!(general["model"]["version"], 1);
    let refs = tv_detections("general", "v1", &v1, "91", &[], &img);
    assert_same("general", &general, &refs, None);

    let knobs = [
        "--min-size",
        "600",
        "--max-size",
        "1000",
        "--box-nms-thresh",
        "0.3",
        "--rpn-post-nms-top-n-test",
        "300",
    ];
    let refs = tv_detections("v2knobs", "v2", &v2, "91", &knobs, &img);
    assert_same(
        "v2 with its settings",
        &detect("/detect?model=v2"),
        &refs,
        None,
    );

    let refs = tv_detections(
        "parts",
        "v1",
        &parts,
        "5",
        &["--box-score-thresh", "0.1"],
        &img,
    );
    let by_default = detect("/detect");
    assert_eq!(by_default["model"]["name"], "parts", "default = true");
    assert_same("parts", &by_default, &refs, Some(&NAMES));
    assert_same(
        "parts",
        &detect("/v1/models/parts/detect"),
        &refs,
        Some(&NAMES),
    );

    let (status, answer) = json_of(post(
        &server,
        "/v1/models/cls/classify?top_k=5",
        "image/png",
        png.clone(),
    ));
    assert_eq!(status, 200, "{answer}");
    let probs = read_tensors(&tvref(
        &data_dir().join("ref_models_cls.safetensors"),
        &[
            "ref-classifier",
            "--preset",
            "v1",
            "--weights",
            &cls,
            "--out",
            "{out}",
            &img,
        ],
    ));
    let (top, idx) = probs["0.probs"].topk(5, -1, true, true);
    let top: Vec<f32> = top.try_into().expect("top");
    let idx: Vec<i64> = idx.try_into().expect("idx");
    for (i, p) in answer["results"][0]["predictions"]
        .as_array()
        .expect("predictions")
        .iter()
        .enumerate()
    {
        assert_eq!(p["label_id"].as_i64(), Some(idx[i]), "cls #{i}");
        assert!((p["score"].as_f64().expect("score") - top[i] as f64).abs() < 1e-4);
    }
    let (status, body) = json_of(post(&server, "/classify", "image/png", png.clone()));
    assert_eq!((status, body["model"]["name"].as_str()), (200, Some("cls")));

    let list = get_json(&server, "/v1/models");
    let names: Vec<&str> = list["models"]
        .as_array()
        .expect("models")
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["v2", "general", "parts", "cls"],
        "--model first, then the file's tables"
    );
    let v2 = model(&list, "v2");
    assert_eq!(
        (
            v2["state"].as_str(),
            v2["version"].as_u64(),
            v2["task"].as_str()
        ),
        (Some("ready"), Some(1), Some("detect"))
    );
    assert_eq!(v2["settings"]["min_size"], 600);
    assert_eq!(v2["settings"]["rpn_post_nms_top_n_test"], 300);
    assert_eq!(v2["arch"], "fasterrcnn_resnet50_fpn_v2");
    assert_eq!(model(&list, "parts")["classes"], 5);
    assert_eq!(model(&list, "cls")["settings"]["preset"], "v1");
    for m in list["models"].as_array().expect("models") {
        let mb = m["memory_mb"].as_u64().unwrap_or(0);
        assert!(
            mb > 50,
            "{}: memory measured at load and warm-up: {m}",
            m["name"]
        );
    }
    let metrics = server.metrics();
    assert!(
        metrics.contains(r#"detectd_images_total{model="parts",version="1"}"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"model="v2",version="1""#));
    assert_error(
        "unknown model",
        post(&server, "/v1/models/nope/detect", "image/png", png.clone()),
        404,
        "model_not_found",
    );
}

/// What the load clients saw.
#[derive(Default)]
struct Seen {
    /// (version, detections) of each answer, and when the request was sent.
    answers: Vec<(u64, Value, Instant)>,
    failures: Vec<String>,
}

/// Under continuous load from 8 clients, a PUT swaps the 5-class model to new weights: no
/// request fails, each answer comes from one version and equals that version's own answer,
/// every request sent after the PUT answered comes from the new one. A broken checkpoint is
/// refused and the serving version stays; DELETE then answers 404. /readyz is 200 throughout.
#[test]
fn versions_swap_under_load_without_a_failed_request() {
    let img = images(&["m160x200.png:160x200:RGB"]);
    let png = Arc::new(std::fs::read(&img[0]).expect("image"));
    let old = detector("det_5class.pth", "v1", "9", "5");
    let new = detector("models_det_5class_v2.pth", "v1", "11", "5");
    let labels = path_str(&labels_file());
    let broken = data_dir().join("models-broken.pth");
    std::fs::write(&broken, b"PK\x03\x04 not a checkpoint").expect("write broken");
    // Small inputs, so that a hundred requests take seconds, not minutes.
    let settings = "min_size=160,max_size=200";
    let flag = format!("parts={old},labels={labels},{settings}");
    let server = Arc::new(Server::start(
        &[
            "--model",
            &flag,
            "--admin-key",
            "sesame",
            "--warmup-images",
            "1",
        ],
        true,
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let sent = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (server, png, stop, seen, sent) = (
                server.clone(),
                png.clone(),
                stop.clone(),
                seen.clone(),
                sent.clone(),
            );
            std::thread::spawn(move || {
                let http = client();
                while !stop.load(Ordering::SeqCst) {
                    let at = Instant::now();
                    sent.fetch_add(1, Ordering::SeqCst);
                    let r = http
                        .post(server.url("/v1/models/parts/detect"))
                        .header("content-type", "image/png")
                        .body(png.to_vec())
                        .send();
                    let mut seen = seen.lock().expect("seen");
                    match r.map(|r| (r.status().as_u16(), r.json::<Value>())) {
                        Ok((200, Ok(body))) => {
                            let version = body["model"]["version"].as_u64().unwrap_or(0);
                            let dets = body["results"][0]["detections"].clone();
                            seen.answers.push((version, dets, at));
                        }
                        Ok((status, body)) => seen.failures.push(format!("{status}: {body:?}")),
                        Err(e) => seen.failures.push(e.to_string()),
                    }
                }
            })
        })
        .collect();
    let ready_checks = {
        let (server, stop) = (server.clone(), stop.clone());
        std::thread::spawn(move || {
            let http = client();
            let mut not_ready = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match http.get(server.url("/readyz")).send() {
                    Ok(r) if r.status() == 200 => {}
                    other => not_ready.push(format!("{other:?}")),
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            not_ready
        })
    };
    let admin = |method: reqwest::Method, body: Option<Value>| {
        let mut r = client()
            .request(method, server.url("/v1/models/parts"))
            .header("authorization", "Bearer sesame");
        if let Some(b) = body {
            r = r.json(&b);
        }
        r.send().expect("admin request")
    };
    // Each wait has a deadline; past it the clients stop (so the server is dropped) and the
    // test fails with what it saw, instead of hanging the suite.
    let wait_for = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let seen = seen.lock().expect("seen");
            if seen.answers.len() >= n {
                return;
            }
            if Instant::now() > deadline {
                stop.store(true, Ordering::SeqCst);
                panic!(
                    "{} answers in 180 s, waiting for {n}; failures: {:?}",
                    seen.answers.len(),
                    seen.failures
                );
            }
            drop(seen);
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for(30);
    let put = admin(
        reqwest::Method::PUT,
        Some(json!({"source": new, "labels": labels, "min_size": 160, "max_size": 200})),
    );
    let swapped_at = Instant::now();
    let (status, body) = json_of(put);
    assert_eq!((status, body["version"].as_u64()), (200, Some(2)), "{body}");
    assert_eq!(body["state"], "ready");
    let so_far = seen.lock().expect("seen").answers.len();
    wait_for(so_far + 30);
    let (status, body) = json_of(admin(
        reqwest::Method::PUT,
        Some(json!({"source": path_str(&broken), "min_size": 160})),
    ));
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("load_failed")),
        "{body}"
    );
    let listed = get_json(&server, "/v1/models");
    let parts = model(&listed, "parts");
    assert_eq!(
        (parts["version"].as_u64(), parts["state"].as_str()),
        (Some(2), Some("ready")),
        "{parts}"
    );
    assert_eq!(parts["next"]["state"], "failed", "{parts}");
    assert!(
        parts["next"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("models-broken.pth")),
        "{parts}"
    );
    let so_far = seen.lock().expect("seen").answers.len();
    wait_for((so_far + 20).max(100));
    let total = seen.lock().expect("seen").answers.len();
    assert!(total >= 100, "{total} answers");
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().expect("client");
    }
    let not_ready = ready_checks.join().expect("readyz checks");
    assert!(not_ready.is_empty(), "/readyz was not 200: {not_ready:?}");

    let seen = seen.lock().expect("seen");
    assert!(
        seen.failures.is_empty(),
        "{} failed: {:?}",
        seen.failures.len(),
        &seen.failures[..seen.failures.len().min(5)]
    );
    // One answer per version: the server is deterministic, so every answer of a version
    // equals its first; the two versions' answers differ.
    let first = |v: u64| seen.answers.iter().find(|a| a.0 == v).map(|a| a.1.clone());
    let (one, two) = (
        first(1).expect("answers of v1"),
        first(2).expect("answers of v2"),
    );
    assert_ne!(one, two, "new weights, new answers");
    for (version, dets, at) in &seen.answers {
        assert!(*version == 1 || *version == 2, "version {version}");
        let expected = if *version == 1 { &one } else { &two };
        assert_eq!(
            dets, expected,
            "an answer of version {version} differs from that version's"
        );
        if *at > swapped_at {
            assert_eq!(
                *version, 2,
                "a request sent after the swap answered got version {version}"
            );
        }
    }
    // Version 2 is torchvision's answer for the new weights.
    let refs = tv_detections(
        "parts_v2",
        "v1",
        &new,
        "5",
        &["--min-size", "160", "--max-size", "200"],
        &path_str(&img[0]),
    );
    assert_same(
        "version 2",
        &json!({"results": [{"detections": two}]}),
        &refs,
        Some(&NAMES),
    );
    drop(seen);

    let gone = admin(reqwest::Method::DELETE, None);
    assert_eq!(gone.status(), 204);
    assert_error(
        "deleted model",
        post(
            &server,
            "/v1/models/parts/detect",
            "image/png",
            png.to_vec(),
        ),
        404,
        "model_not_found",
    );
    assert_eq!(admin(reqwest::Method::DELETE, None).status(), 404);
    let metrics = server.metrics();
    assert!(
        metrics.contains(r#"detectd_images_total{model="parts",version="2"}"#),
        "{metrics}"
    );
}

/// SIGHUP re-reads --config: a changed model gets a new version, a new one is loaded, a
/// removed one unloaded.
#[test]
fn sighup_applies_the_changed_config_file() {
    let cls = classifier_weights();
    let config = data_dir().join("models-sighup.toml");
    let write = |tables: &str| std::fs::write(&config, tables).expect("write config");
    write(&format!(
        "[[model]]\nname = \"a\"\nsource = \"{cls}\"\n\n[[model]]\nname = \"b\"\nsource = \"{cls}\"\n"
    ));
    let server = Server::start(
        &["--config", &path_str(&config), "--warmup-images", "0"],
        true,
    );
    write(&format!(
        "[[model]]\nname = \"a\"\nsource = \"{cls}\"\nmax_batch_size = 2\n\n[[model]]\nname = \"c\"\nsource = \"{cls}\"\n"
    ));
    let pid = server.child.id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let list = get_json(&server, "/v1/models");
        let names: Vec<&str> = list["models"]
            .as_array()
            .expect("models")
            .iter()
            .filter_map(|m| m["name"].as_str())
            .collect();
        let a = model(&list, "a");
        if names == ["a", "c"] && a["version"] == 2 && model(&list, "c")["state"] == "ready" {
            assert_eq!(a["settings"]["max_batch_size"], 2);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SIGHUP not applied: {list}\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let png = png_of(64, 48);
    let (status, body) = json_of(post(
        &server,
        "/v1/models/c/classify",
        "image/png",
        png.clone(),
    ));
    assert_eq!(status, 200, "{body}");
    assert_error(
        "unloaded",
        post(&server, "/v1/models/b/classify", "image/png", png),
        404,
        "model_not_found",
    );
}

/// With --max-memory-mb, a load that would pass the bound is refused with a clear error, and
/// the server stays up.
#[test]
fn a_load_past_max_memory_is_refused() {
    let cls = classifier_weights();
    let server = Server::start(&["--admin-key", "k", "--max-memory-mb", "1"], true);
    let r = client()
        .put(server.url("/v1/models/cls"))
        .header("authorization", "Bearer k")
        .json(&json!({"source": cls}))
        .send()
        .expect("PUT");
    let (status, body) = json_of(r);
    assert_eq!(
        (status, body["code"].as_str()),
        (507, Some("insufficient_memory")),
        "{body}"
    );
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("--max-memory-mb")),
        "{body}"
    );
    let health = client()
        .get(server.url("/healthz"))
        .send()
        .expect("healthz");
    assert_eq!(health.status(), 200);
}

/// Start-up errors name the model and the key.
#[test]
fn bad_settings_fail_the_start_naming_model_and_key() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_detectd"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--model",
            "parts=/x.pth,box_thresh=0.3",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"parts\"") && err.contains("box_thresh"),
        "{err}"
    );
}
