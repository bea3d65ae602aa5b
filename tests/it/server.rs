//! The HTTP service, tested on the real binary on 127.0.0.1 with seeded random torchvision
//! weights: input forms, batching, every error status, queue limits, timeouts, the drain on
//! SIGTERM, the API key and the metrics.

use std::path::PathBuf;
use std::time::Duration;

use crate::common::*;
use base64::Engine as _;
use reqwest::blocking::{multipart, Response};
use serde_json::{json, Value};

fn read(p: &PathBuf) -> Vec<u8> {
    std::fs::read(p).expect("read image")
}

fn b64(p: &PathBuf) -> String {
    base64::engine::general_purpose::STANDARD.encode(read(p))
}

/// Detections agree: same labels, scores within 1e-4, boxes within 1e-3.
fn assert_same_detections(a: &Value, b: &Value, what: &str) {
    let (a, b) = (a.as_array().expect("array"), b.as_array().expect("array"));
    assert_eq!(a.len(), b.len(), "{what}: detection count");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x["label_id"], y["label_id"], "{what}: label");
        assert_eq!(x["label"], y["label"], "{what}: label name");
        assert!(
            (x["score"].as_f64().unwrap_or(9.0) - y["score"].as_f64().unwrap_or(0.0)).abs() < 1e-4,
            "{what}: score"
        );
        for k in 0..4 {
            assert!(
                (x["box"][k].as_f64().unwrap_or(9.0) - y["box"][k].as_f64().unwrap_or(0.0)).abs()
                    < 1e-3,
                "{what}: box"
            );
        }
    }
}

fn cli_detections(weights: &str, images: &[PathBuf]) -> Vec<Value> {
    let mut args = vec![
        "detect".to_string(),
        "--weights".into(),
        weights.into(),
        "--device".into(),
        "cpu".into(),
    ];
    args.extend(images.iter().map(|p| path_str(p)));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_detectd"))
        .args(&args)
        .output()
        .expect("run CLI");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("JSON")["detections"].clone())
        .collect()
}

#[test]
fn every_input_form_gives_the_cli_result() {
    let imgs = images(&["d480x640.png:480x640:RGB", "dgray.png:150x200:L"]);
    let weights = detector_weights();
    let expected = cli_detections(&weights, &imgs);
    let server = Server::start(
        &[
            "--detector-weights",
            &weights,
            "--warmup-images",
            "1",
            "--max-batch-size",
            "2",
        ],
        true,
    );
    let (a, b) = (&imgs[0], &imgs[1]);

    let raw = post(&server, "/detect", "image/png", read(a));
    assert!(raw.headers().get("x-request-id").is_some());
    let timing = raw
        .headers()
        .get("server-timing")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert!(
        timing.contains("queue;dur=")
            && timing.contains("inference;dur=")
            && timing.contains("total;dur="),
        "{timing}"
    );
    let (status, body) = json_of(raw);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"]["name"], "detector");
    assert_eq!(
        (
            body["results"][0]["width"].as_i64(),
            body["results"][0]["height"].as_i64()
        ),
        (Some(640), Some(480))
    );
    assert_same_detections(
        &body["results"][0]["detections"],
        &expected[0],
        "raw image/png",
    );

    let (status, body) = json_of(post(
        &server,
        "/detect",
        "application/octet-stream",
        read(b),
    ));
    assert_eq!(status, 200);
    assert_same_detections(
        &body["results"][0]["detections"],
        &expected[1],
        "octet-stream",
    );

    let form = multipart::Form::new()
        .part("first", multipart::Part::bytes(read(a)).file_name("a.png"))
        .part("second", multipart::Part::bytes(read(b)).file_name("b.png"));
    let (status, body) = json_of(
        client()
            .post(server.url("/detect"))
            .multipart(form)
            .send()
            .expect("multipart"),
    );
    assert_eq!(status, 200);
    assert_same_detections(
        &body["results"][0]["detections"],
        &expected[0],
        "multipart part 1",
    );
    assert_same_detections(
        &body["results"][1]["detections"],
        &expected[1],
        "multipart part 2",
    );

    let (status, body) = json_of(
        client()
            .post(server.url("/detect"))
            .json(&json!({"images": [b64(b), b64(a)]}))
            .send()
            .expect("json"),
    );
    assert_eq!(status, 200);
    assert_same_detections(
        &body["results"][0]["detections"],
        &expected[1],
        "json images[0]",
    );
    assert_same_detections(
        &body["results"][1]["detections"],
        &expected[0],
        "json images[1]",
    );

    // Parameters: as JSON fields and in the query string.
    let (status, body) = json_of(
        client()
            .post(server.url("/detect"))
            .json(&json!({"image": b64(b), "max_detections": 3}))
            .send()
            .expect("json"),
    );
    assert_eq!(status, 200);
    assert_eq!(
        body["results"][0]["detections"].as_array().map(Vec::len),
        Some(3.min(expected[1].as_array().map_or(0, Vec::len)))
    );
    let top = expected[0][0]["label"].as_str().unwrap_or("").to_owned();
    let r = client()
        .post(server.url("/detect"))
        .query(&[("labels", top.as_str()), ("score_threshold", "0.3")])
        .header("content-type", "image/png")
        .body(read(a))
        .send();
    let (status, body) = json_of(r.expect("query params"));
    assert_eq!(status, 200);
    let dets = body["results"][0]["detections"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        !dets.is_empty()
            && dets
                .iter()
                .all(|d| d["label"] == top.as_str() && d["score"].as_f64() > Some(0.3))
    );
}

/// 16 concurrent requests over different images each get their single-request answer, and
/// the worker batched some of them.
#[test]
fn concurrent_requests_are_batched_and_keep_their_own_results() {
    let specs: Vec<String> = (0..16)
        .map(|i| format!("k{i}.png:{}x{}:RGB", 120 + 7 * i, 150 + 11 * i))
        .collect();
    let imgs = images(&specs.iter().map(String::as_str).collect::<Vec<_>>());
    let weights = classifier_weights();
    let server = Server::start(
        &[
            "--classifier-weights",
            &weights,
            "--max-batch-size",
            "8",
            "--max-batch-delay-ms",
            "200",
            "--warmup-images",
            "1",
        ],
        true,
    );
    let single: Vec<Value> = imgs
        .iter()
        .map(|p| {
            json_of(post(&server, "/classify?top_k=3", "image/png", read(p))).1["results"][0]
                ["predictions"]
                .clone()
        })
        .collect();
    let handles: Vec<_> = imgs
        .iter()
        .cloned()
        .map(|p| {
            let url = server.url("/classify?top_k=3");
            std::thread::spawn(move || {
                json_of(
                    client()
                        .post(url)
                        .header("content-type", "image/png")
                        .body(read(&p))
                        .send()
                        .expect("POST"),
                )
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (status, body) = h.join().expect("request thread");
        assert_eq!(status, 200, "{body}");
        let got = &body["results"][0]["predictions"];
        for k in 0..3 {
            assert_eq!(got[k]["label_id"], single[i][k]["label_id"], "image {i}");
            assert!(
                (got[k]["score"].as_f64().unwrap_or(9.0)
                    - single[i][k]["score"].as_f64().unwrap_or(0.0))
                .abs()
                    < 1e-4,
                "image {i}"
            );
        }
    }
    let (count, le1) = histogram_count_and_le1(
        &server.metrics(),
        "detectd_batch_size",
        "model=\"classifier\",version=\"1\"",
    );
    assert!(
        count > le1,
        "some batch held more than one image: {count} batches, {le1} of size 1"
    );
}

#[test]
fn each_error_has_its_status_and_a_json_body() {
    let imgs = images(&["dgray.png:150x200:L"]);
    let server = Server::start(
        &[
            "--detector-weights",
            &detector_weights(),
            "--warmup-images",
            "0",
            "--max-body-bytes",
            "300000",
        ],
        true,
    );
    let jpeg = {
        let bytes = std::fs::read(imgs[0].with_extension("jpg")).ok();
        bytes.unwrap_or_else(|| {
            let out = std::process::Command::new(python())
                .args(["-c", "import sys; from PIL import Image; Image.open(sys.argv[1]).convert('RGB').save(sys.argv[2], quality=90)"])
                .arg(&imgs[0])
                .arg(imgs[0].with_extension("jpg"))
                .output()
                .expect("make jpeg");
            assert!(out.status.success());
            std::fs::read(imgs[0].with_extension("jpg")).expect("read jpeg")
        })
    };
    let cases: Vec<(&str, Response, u16, &str)> = vec![
        (
            "bomb header",
            post(
                &server,
                "/detect",
                "image/png",
                png_header_claiming(60000, 60000),
            ),
            413,
            "image_too_large",
        ),
        (
            "truncated jpeg",
            post(
                &server,
                "/detect",
                "image/jpeg",
                jpeg[..jpeg.len() / 2].to_vec(),
            ),
            400,
            "invalid_image",
        ),
        (
            "zero bytes",
            post(&server, "/detect", "image/png", vec![]),
            400,
            "invalid_image",
        ),
        (
            "not an image",
            post(&server, "/detect", "image/png", b"hello".to_vec()),
            400,
            "invalid_image",
        ),
        (
            "invalid base64",
            post(
                &server,
                "/detect",
                "application/json",
                br#"{"image": "@@not base64@@"}"#.to_vec(),
            ),
            400,
            "bad_request",
        ),
        (
            "bad json",
            post(
                &server,
                "/detect",
                "application/json",
                b"{\"image\": ".to_vec(),
            ),
            400,
            "bad_request",
        ),
        (
            "no image",
            post(&server, "/detect", "application/json", b"{}".to_vec()),
            400,
            "bad_request",
        ),
        (
            "body over limit",
            post(&server, "/detect", "image/png", vec![0u8; 400_000]),
            413,
            "body_too_large",
        ),
        (
            "content type",
            post(&server, "/detect", "text/plain", b"hi".to_vec()),
            415,
            "unsupported_media_type",
        ),
        (
            "threshold range",
            post(
                &server,
                "/detect?score_threshold=2",
                "image/png",
                read(&imgs[0]),
            ),
            422,
            "invalid_parameter",
        ),
        (
            "threshold type",
            post(
                &server,
                "/detect?score_threshold=abc",
                "image/png",
                read(&imgs[0]),
            ),
            422,
            "invalid_parameter",
        ),
        (
            "max detections",
            post(
                &server,
                "/detect?max_detections=0",
                "image/png",
                read(&imgs[0]),
            ),
            422,
            "invalid_parameter",
        ),
        (
            "unknown label",
            post(
                &server,
                "/detect?labels=unicorn",
                "image/png",
                read(&imgs[0]),
            ),
            422,
            "invalid_parameter",
        ),
        (
            "no classifier",
            post(&server, "/classify", "image/png", read(&imgs[0])),
            404,
            "model_not_loaded",
        ),
        (
            "no route",
            post(&server, "/nowhere", "image/png", vec![1]),
            404,
            "not_found",
        ),
    ];
    for (what, response, status, code) in cases {
        assert_error(what, response, status, code);
    }
    assert_eq!(
        client()
            .get(server.url("/healthz"))
            .send()
            .expect("healthz")
            .status(),
        200
    );
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let imgs = images(&["c375x500.png:375x500:RGB"]);
    let server = Server::start(
        &[
            "--classifier-weights",
            &classifier_weights(),
            "--max-queue",
            "1",
            "--max-batch-size",
            "1",
            "--warmup-images",
            "0",
        ],
        true,
    );
    let handles: Vec<_> = (0..12)
        .map(|_| {
            let (url, body) = (server.url("/classify"), read(&imgs[0]));
            std::thread::spawn(move || {
                let r = client()
                    .post(url)
                    .header("content-type", "image/png")
                    .body(body)
                    .send()
                    .expect("POST");
                let retry = r.headers().get("retry-after").is_some();
                let (status, body) = json_of(r);
                (
                    status,
                    body["code"].as_str().unwrap_or_default().to_owned(),
                    retry,
                )
            })
        })
        .collect();
    let results: Vec<(u16, String, bool)> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    assert!(
        results
            .iter()
            .all(|(s, code, retry)| *s == 200 || (*s == 429 && code == "queue_full" && *retry)),
        "{results:?}"
    );
    assert!(results.iter().any(|(s, ..)| *s == 200), "{results:?}");
    assert!(results.iter().any(|(s, ..)| *s == 429), "{results:?}");
}

/// Past the deadline the client gets 504, and queued requests whose deadline passed never
/// reach the model.
#[test]
fn a_short_request_timeout_gives_504_and_skips_expired_work() {
    let imgs = images(&["dgray.png:150x200:L"]);
    let server = Server::start(
        &[
            "--detector-weights",
            &detector_weights(),
            "--request-timeout-ms",
            "300",
            "--max-batch-size",
            "1",
            "--warmup-images",
            "0",
        ],
        true,
    );
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let (url, body) = (server.url("/detect"), read(&imgs[0]));
            std::thread::spawn(move || {
                json_of(
                    client()
                        .post(url)
                        .header("content-type", "image/png")
                        .body(body)
                        .send()
                        .expect("POST"),
                )
            })
        })
        .collect();
    for h in handles {
        let (status, body) = h.join().expect("thread");
        assert_eq!((status, body["code"].as_str()), (504, Some("timeout")));
    }
    // The worker takes the queue in order, one job at a time: once the queue is empty it has
    // taken the last request, so the second had ended (run, or dropped) before that.
    let ran_series = "detectd_images_total{model=\"detector\",version=\"1\"}";
    wait_until(
        "the worker took every queued request",
        Duration::from_secs(60),
        || {
            let metrics = server.metrics();
            try_series(&metrics, DETECTOR_QUEUE) == Some(0.0)
                && try_series(&metrics, ran_series).is_some_and(|n| n >= 1.0)
        },
    );
    let ran = series_value(&server.metrics(), ran_series);
    assert!(
        ran <= 1.0,
        "expired requests reached the model: {ran} images ran"
    );
    assert_eq!(
        client()
            .get(server.url("/healthz"))
            .send()
            .expect("healthz")
            .status(),
        200
    );
}

#[test]
fn sigterm_finishes_in_flight_requests_then_exits_0() {
    let imgs = images(&["d480x640.png:480x640:RGB"]);
    let mut server = Server::start(
        &[
            "--detector-weights",
            &detector_weights(),
            "--max-batch-size",
            "1",
            "--warmup-images",
            "0",
        ],
        true,
    );
    // Four detector passes of a second or more each, one at a time: SIGTERM goes once all
    // four are admitted and at least two still wait behind the one running.
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (url, body) = (server.url("/detect"), read(&imgs[0]));
            std::thread::spawn(move || {
                client()
                    .post(url)
                    .header("content-type", "image/png")
                    .body(body)
                    .send()
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    wait_until(
        "four requests admitted, two waiting behind a running one",
        Duration::from_secs(60),
        || detector_admitted(&server, 4.0, 2.0),
    );
    let pid = server.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    // While requests are still in flight the listener answers, and readiness turns off.
    wait_until("/readyz 503 while draining", Duration::from_secs(5), || {
        let r = client().get(server.url("/readyz")).send();
        r.expect("the listener answers while requests are in flight")
            .status()
            == 503
    });
    for h in handles {
        assert_eq!(h.join().expect("thread").expect("request completed"), 200);
    }
    let status = server.child.wait().expect("wait for exit");
    assert_eq!(status.code(), Some(0), "log:\n{}", server.log());
}

#[test]
fn the_api_key_guards_model_endpoints_only() {
    let imgs = images(&["c100x80.png:100x80:RGB"]);
    let server = Server::start(
        &[
            "--classifier-weights",
            &classifier_weights(),
            "--api-key",
            "s3cret-key",
            "--warmup-images",
            "0",
        ],
        true,
    );
    let c = client();
    let classify = |auth: Option<&str>| {
        let mut r = c
            .post(server.url("/classify"))
            .header("content-type", "image/png")
            .body(read(&imgs[0]));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send().expect("POST")
    };
    let (status, body) = json_of(classify(None));
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")));
    assert_eq!(classify(Some("Bearer wrong")).status(), 401);
    assert_eq!(classify(Some("Bearer s3cret-key")).status(), 200);
    assert_eq!(
        c.get(server.url("/v1/models"))
            .send()
            .expect("models")
            .status(),
        401
    );
    let models = c
        .get(server.url("/v1/models"))
        .bearer_auth("s3cret-key")
        .send()
        .expect("models");
    let (status, body) = json_of(models);
    assert_eq!(status, 200);
    assert_eq!(body["models"][0]["classes"], 1000);
    for open in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            c.get(server.url(open)).send().expect("GET").status(),
            200,
            "{open}"
        );
    }
    assert!(
        !server.log().contains("s3cret-key"),
        "the key must not be logged"
    );
}

#[test]
fn metrics_expose_every_named_series() {
    let imgs = images(&["c100x80.png:100x80:RGB"]);
    let server = Server::start(
        &[
            "--classifier-weights",
            &classifier_weights(),
            "--warmup-images",
            "0",
        ],
        true,
    );
    assert_eq!(
        post(&server, "/classify", "image/png", read(&imgs[0])).status(),
        200
    );
    let m = server.metrics();
    for series in [
        "detectd_requests_total{endpoint=\"/classify\",status=\"200\"} 1",
        "detectd_request_duration_seconds_bucket{endpoint=\"/classify\"",
        "detectd_queue_duration_seconds_bucket{model=\"classifier\",version=\"1\"",
        "detectd_inference_duration_seconds_bucket{model=\"classifier\",version=\"1\"",
        "detectd_batch_size_bucket{model=\"classifier\",version=\"1\"",
        "detectd_queue_depth{model=\"classifier\",version=\"1\"} 0",
        "detectd_images_total{model=\"classifier\",version=\"1\"} 1",
        "detectd_model_info{arch=\"resnet50 (preset v2)\",device=\"cpu\",model=\"classifier\",precision=\"fp32\",version=\"1\"} 1",
    ] {
        assert!(m.contains(series), "missing {series} in:\n{m}");
    }
}
