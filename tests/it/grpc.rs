//! The gRPC API, called by a client generated from proto/ against the real binary: every RPC
//! (answers equal to the HTTP API's), health, reflection, and each error code.

use std::time::Duration;

use crate::common::*;
use detectd::grpc::pb;
use pb::detector_client::DetectorClient;
use serde_json::Value;
use tonic::transport::Channel;
use tonic::{Code, Request};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Cheap for the detector: 40×1000 is resized to about 53×1333.
const SKINNY: &str = "skinny.png:40x1000:RGB";
const PHOTO: &str = "c375x500.png:375x500:RGB";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().expect("tokio runtime")
}

fn grpc_server(args: &[&str], wait_ready: bool) -> Server {
    let mut all = vec!["--grpc-addr", "127.0.0.1:0", "--warmup-images", "0"];
    all.extend_from_slice(args);
    let server = Server::start(&all, wait_ready);
    assert!(server.grpc.is_some(), "no gRPC address printed");
    if wait_ready {
        runtime().block_on(wait_serving(&server));
    }
    server
}

/// gRPC health follows readiness by polling (every 50 ms), so it may still say NOT_SERVING
/// just after /readyz turned 200: wait for it to catch up.
async fn wait_serving(server: &Server) {
    for _ in 0..200 {
        if health(server).await == ServingStatus::Serving {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("gRPC health never turned SERVING");
}

async fn detector(server: &Server) -> DetectorClient<Channel> {
    let url = server.grpc.clone().expect("grpc address");
    DetectorClient::connect(url)
        .await
        .expect("connect")
        .max_decoding_message_size(64 << 20)
}

async fn health(server: &Server) -> ServingStatus {
    let url = server.grpc.clone().expect("grpc address");
    let mut client = HealthClient::new(channel(url).await);
    let r = client
        .check(HealthCheckRequest {
            service: "detectd.v1.Detector".into(),
        })
        .await
        .expect("health check");
    r.into_inner().status()
}

async fn channel(url: String) -> Channel {
    Channel::from_shared(url)
        .expect("grpc url")
        .connect()
        .await
        .expect("connect")
}

fn bytes(p: &std::path::Path) -> Vec<u8> {
    std::fs::read(p).expect("read image")
}

fn http_json(server: &Server, path: &str, image: Vec<u8>) -> Value {
    reqwest::blocking::Client::new()
        .post(server.url(path))
        .header("content-type", "image/png")
        .body(image)
        .timeout(Duration::from_secs(300))
        .send()
        .expect("POST")
        .json()
        .expect("JSON")
}

fn assert_detections_match(grpc: &pb::DetectResponse, http: &Value) {
    assert_eq!(u64::from(grpc.width), http["width"].as_u64().unwrap_or(0));
    let dets = http["detections"].as_array().expect("detections");
    assert_eq!(grpc.detections.len(), dets.len());
    assert!(!dets.is_empty(), "no detection to compare");
    for (g, h) in grpc.detections.iter().zip(dets) {
        // JSON carries the shortest decimal that reads back as the same f32.
        let b: Vec<f32> = h["box"]
            .as_array()
            .expect("box")
            .iter()
            .filter_map(|v| v.as_f64().map(|v| v as f32))
            .collect();
        assert_eq!(vec![g.x1, g.y1, g.x2, g.y2], b, "box");
        assert_eq!(g.score, h["score"].as_f64().unwrap_or(-1.0) as f32);
        assert_eq!(i64::from(g.label_id), h["label_id"].as_i64().unwrap_or(-1));
        assert_eq!(g.label, h["label"].as_str().unwrap_or(""));
    }
}

#[test]
fn every_rpc_answers_as_the_http_api_does() {
    let imgs = images(&[SKINNY, PHOTO]);
    let server = grpc_server(
        &[
            "--detector-weights",
            &detector_weights(),
            "--classifier-weights",
            &classifier_weights(),
        ],
        true,
    );
    let http_det = http_json(&server, "/detect?score_threshold=0", bytes(&imgs[0]));
    let http_cls = http_json(&server, "/classify?top_k=3", bytes(&imgs[1]));
    let rt = runtime();
    rt.block_on(async {
        let mut c = detector(&server).await;
        let det = c
            .detect(pb::DetectRequest {
                image: bytes(&imgs[0]),
                score_threshold: 1e-9,
                ..Default::default()
            })
            .await
            .expect("Detect")
            .into_inner();
        assert_eq!((det.width, det.height), (1000, 40));
        assert_detections_match(&det, &http_det["results"][0]);

        // max_detections and labels filter as in HTTP.
        let label = det.detections[0].label.clone();
        let few = c
            .detect(pb::DetectRequest {
                image: bytes(&imgs[0]),
                score_threshold: 1e-9,
                max_detections: 2,
                labels: vec![label.clone()],
                ..Default::default()
            })
            .await
            .expect("Detect with options")
            .into_inner();
        assert!(!few.detections.is_empty() && few.detections.len() <= 2);
        assert!(few.detections.iter().all(|d| d.label == label));

        let batch = c
            .detect_batch(pb::DetectBatchRequest {
                images: vec![bytes(&imgs[0]), bytes(&imgs[0])],
                score_threshold: 1e-9,
                ..Default::default()
            })
            .await
            .expect("DetectBatch")
            .into_inner();
        assert_eq!(batch.results.len(), 2);
        for r in &batch.results {
            assert_detections_match(r, &http_det["results"][0]);
        }

        let cls = c
            .classify(pb::ClassifyRequest {
                image: bytes(&imgs[1]),
                top_k: 3,
                ..Default::default()
            })
            .await
            .expect("Classify")
            .into_inner();
        let http_preds = http_cls["results"][0]["predictions"]
            .as_array()
            .expect("predictions");
        assert_eq!(cls.predictions.len(), 3);
        for (g, h) in cls.predictions.iter().zip(http_preds) {
            assert_eq!(i64::from(g.label_id), h["label_id"].as_i64().unwrap_or(-1));
            assert_eq!(g.score, h["score"].as_f64().unwrap_or(-1.0) as f32);
        }
        let default_k = c
            .classify_batch(pb::ClassifyBatchRequest {
                images: vec![bytes(&imgs[1]), bytes(&imgs[0])],
                top_k: 0,
                ..Default::default()
            })
            .await
            .expect("ClassifyBatch")
            .into_inner();
        assert_eq!(default_k.results.len(), 2);
        assert_eq!(
            default_k.results[0].predictions.len(),
            5,
            "0 means the default"
        );
        assert_eq!(
            (default_k.results[1].width, default_k.results[1].height),
            (1000, 40)
        );

        let models = c
            .list_models(pb::ListModelsRequest {})
            .await
            .expect("ListModels")
            .into_inner()
            .models;
        let names: Vec<(&str, &str, u32, bool)> = models
            .iter()
            .map(|m| (m.name.as_str(), m.rpc.as_str(), m.num_classes, m.ready))
            .collect();
        assert_eq!(
            names,
            vec![
                ("detector", "Detect", 91, true),
                ("classifier", "Classify", 1000, true)
            ]
        );
        assert_eq!(health(&server).await, ServingStatus::Serving);
        assert!(reflected_services(&server)
            .await
            .contains(&"detectd.v1.Detector".to_owned()));
    });
    let metrics = server.metrics();
    assert!(
        metrics.contains(r#"detectd_requests_total{endpoint="grpc:Detect",status="OK"}"#),
        "{metrics}"
    );
}

async fn reflected_services(server: &Server) -> Vec<String> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let url = server.grpc.clone().expect("grpc address");
    let mut client = ServerReflectionClient::new(channel(url).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection")
        .into_inner();
    match stream.message().await.expect("reflection answer") {
        Some(r) => match r.message_response {
            Some(MessageResponse::ListServicesResponse(l)) => {
                l.service.into_iter().map(|s| s.name).collect()
            }
            other => panic!("unexpected reflection answer {other:?}"),
        },
        None => panic!("no reflection answer"),
    }
}

fn code_of<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(ok) => panic!("expected an error, got {ok:?}"),
        Err(status) => {
            assert!(!status.message().is_empty(), "{status:?} has no message");
            status.code()
        }
    }
}

#[test]
fn bad_input_missing_models_and_full_queues_have_their_codes() {
    let imgs = images(&[SKINNY]);
    let server = grpc_server(
        &[
            "--detector-weights",
            &detector_weights(),
            "--max-queue",
            "1",
            "--max-batch-size",
            "1",
        ],
        true,
    );
    let rt = runtime();
    rt.block_on(async {
        let mut c = detector(&server).await;
        let bad = |image: Vec<u8>, score_threshold: f32, labels: Vec<String>| pb::DetectRequest {
            image,
            score_threshold,
            labels,
            ..Default::default()
        };
        let image = bytes(&imgs[0]);
        for (what, request) in [
            ("garbage bytes", bad(b"not an image".to_vec(), 0.0, vec![])),
            ("empty image", bad(vec![], 0.0, vec![])),
            ("threshold 2", bad(image.clone(), 2.0, vec![])),
            (
                "unknown label",
                bad(image.clone(), 0.0, vec!["unicorn".into()]),
            ),
        ] {
            assert_eq!(
                code_of(c.detect(request).await),
                Code::InvalidArgument,
                "{what}"
            );
        }
        let empty = pb::DetectBatchRequest::default();
        assert_eq!(code_of(c.detect_batch(empty).await), Code::InvalidArgument);
        // A 2000x1 strip has no detector size; a job larger than the queue (1) never fits.
        let strip = png_of(2000, 1);
        assert_eq!(
            code_of(c.detect(bad(strip, 0.0, vec![])).await),
            Code::InvalidArgument
        );
        let two = pb::DetectBatchRequest {
            images: vec![image.clone(), image.clone()],
            ..Default::default()
        };
        assert_eq!(code_of(c.detect_batch(two).await), Code::InvalidArgument);
        let classify = pb::ClassifyRequest {
            image: image.clone(),
            top_k: 1,
            ..Default::default()
        };
        assert_eq!(code_of(c.classify(classify).await), Code::NotFound);

        // One image runs, one waits in the queue of 1; the rest are refused at once.
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let mut c = c.clone();
                let image = image.clone();
                tokio::spawn(async move {
                    let r = c.detect(bad(image, 0.0, vec![])).await;
                    r.map(|_| ()).map_err(|s| s.code())
                })
            })
            .collect();
        let mut codes = Vec::new();
        for call in calls {
            codes.push(call.await.expect("task"));
        }
        assert!(codes.contains(&Ok(())), "{codes:?}");
        assert!(codes.contains(&Err(Code::ResourceExhausted)), "{codes:?}");
        assert!(
            codes
                .iter()
                .all(|c| matches!(c, Ok(()) | Err(Code::ResourceExhausted))),
            "{codes:?}"
        );
    });
}

#[test]
fn deadlines_and_the_api_key_have_their_codes() {
    let imgs = images(&[PHOTO]);
    let server = grpc_server(
        &[
            "--classifier-weights",
            &classifier_weights(),
            "--request-timeout-ms",
            "1",
            "--api-key",
            "k3y",
        ],
        true,
    );
    let rt = runtime();
    rt.block_on(async {
        let mut c = detector(&server).await;
        let call = |key: Option<&str>| {
            let mut r = Request::new(pb::ClassifyRequest {
                image: bytes(&imgs[0]),
                top_k: 1,
                ..Default::default()
            });
            if let Some(k) = key {
                let value = format!("Bearer {k}").parse().expect("metadata value");
                r.metadata_mut().insert("authorization", value);
            }
            r
        };
        assert_eq!(code_of(c.classify(call(None)).await), Code::Unauthenticated);
        assert_eq!(
            code_of(c.classify(call(Some("nope"))).await),
            Code::Unauthenticated
        );
        let models = c.list_models(pb::ListModelsRequest {}).await;
        assert_eq!(code_of(models), Code::Unauthenticated);
        // The key admits the call; 1 ms is too short for any image.
        assert_eq!(
            code_of(c.classify(call(Some("k3y"))).await),
            Code::DeadlineExceeded
        );
        // Health stays open, as /healthz does.
        assert_eq!(health(&server).await, ServingStatus::Serving);
    });
}

#[test]
fn a_drain_turns_health_off_refuses_new_calls_and_finishes_running_ones() {
    let imgs = images(&["d480x640.png:480x640:RGB"]);
    let mut server = grpc_server(
        &[
            "--detector-weights",
            &detector_weights(),
            "--max-batch-size",
            "1",
        ],
        true,
    );
    let rt = runtime();
    rt.block_on(async {
        let c = detector(&server).await;
        // Four detector passes of a second or more each, one at a time: SIGTERM goes once
        // all four are admitted and at least two still wait behind the one running.
        let running: Vec<_> = (0..4)
            .map(|_| {
                let mut c = c.clone();
                let image = bytes(&imgs[0]);
                tokio::spawn(async move {
                    c.detect(pb::DetectRequest {
                        image,
                        ..Default::default()
                    })
                    .await
                })
            })
            .collect();
        tokio::task::block_in_place(|| {
            wait_until(
                "four calls admitted, two waiting behind a running one",
                Duration::from_secs(60),
                || detector_admitted(&server, 4.0, 2.0),
            )
        });
        let pid = server.child.id().to_string();
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        assert!(killed.expect("kill").success());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while health(&server).await != ServingStatus::NotServing {
            assert!(
                tokio::time::Instant::now() < deadline,
                "health still SERVING 5 s into the drain"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let late = c
            .clone()
            .detect(pb::DetectRequest {
                image: bytes(&imgs[0]),
                ..Default::default()
            })
            .await;
        assert_eq!(code_of(late), Code::Unavailable);
        for call in running {
            call.await
                .expect("task")
                .expect("an in-flight call finishes");
        }
    });
    let status = server.child.wait().expect("wait for exit");
    assert_eq!(status.code(), Some(0), "log:\n{}", server.log());
}

/// A message over `--max-body-bytes` is OUT_OF_RANGE (tonic's check); a call whose message
/// never finishes arriving is CANCELLED at `--body-read-timeout-s` + `--request-timeout-ms`;
/// the server goes on serving after both.
#[test]
fn oversized_and_unfinished_messages_have_their_codes() {
    let server = grpc_server(
        &[
            "--classifier-weights",
            &classifier_weights(),
            "--max-body-bytes",
            "10000",
            "--body-read-timeout-s",
            "1",
            "--request-timeout-ms",
            "500",
        ],
        true,
    );
    let rt = runtime();
    rt.block_on(async {
        let mut c = detector(&server).await;
        let big = c
            .classify(pb::ClassifyRequest {
                image: vec![0u8; 20_000],
                top_k: 1,
                ..Default::default()
            })
            .await;
        assert_eq!(code_of(big), Code::OutOfRange);

        let started = std::time::Instant::now();
        let status = unfinished_call(&server).await;
        assert_eq!(
            status,
            Code::Cancelled as i32,
            "grpc-status of the unfinished call"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(1400),
            "cancelled early"
        );
        c.list_models(pb::ListModelsRequest {})
            .await
            .expect("still serving");
    });
}

/// Sends a Classify call whose message announces 1000 bytes and sends 10, over raw HTTP/2
/// (a generated client always sends whole messages); returns the call's grpc-status.
async fn unfinished_call(server: &Server) -> i32 {
    let grpc = server.grpc.clone().expect("grpc address");
    let addr = grpc.trim_start_matches("http://").to_owned();
    let tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let (h2c, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let mut h2c = h2c.ready().await.expect("HTTP/2 ready");
    let request = http::Request::post(format!("{grpc}/detectd.v1.Detector/Classify"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (response, mut body) = h2c.send_request(request, false).expect("send headers");
    let mut frame = vec![0u8, 0, 0, 0x03, 0xe8];
    frame.extend([0u8; 10]);
    body.send_data(frame.into(), false)
        .expect("send part of the message");
    let response = tokio::time::timeout(Duration::from_secs(30), response)
        .await
        .expect("an answer within 30 s")
        .expect("a response");
    let code = |v: &http::HeaderValue| v.to_str().ok().and_then(|s| s.parse().ok());
    if let Some(status) = response.headers().get("grpc-status").and_then(code) {
        return status; // a trailers-only answer
    }
    let mut answer = response.into_body();
    while answer.data().await.is_some() {}
    let trailers = answer
        .trailers()
        .await
        .expect("trailers")
        .expect("trailers sent");
    trailers
        .get("grpc-status")
        .and_then(code)
        .expect("a grpc-status trailer")
}

#[test]
fn calls_before_the_model_is_ready_are_unavailable() {
    let imgs = images(&[PHOTO]);
    // A long warm-up keeps the model loading while the first call arrives.
    let weights = classifier_weights();
    let args = [
        "--grpc-addr",
        "127.0.0.1:0",
        "--classifier-weights",
        &weights,
    ];
    let server = Server::start(&[&args[..], &["--warmup-images", "16"]].concat(), false);
    assert_error(
        "HTTP before the model is ready",
        post(&server, "/classify", "image/png", bytes(&imgs[0])),
        503,
        "not_ready",
    );
    let rt = runtime();
    rt.block_on(async {
        let mut c = detector(&server).await;
        let early = c
            .classify(pb::ClassifyRequest {
                image: bytes(&imgs[0]),
                top_k: 1,
                ..Default::default()
            })
            .await;
        assert_eq!(code_of(early), Code::Unavailable);
        assert_eq!(health(&server).await, ServingStatus::NotServing);
    });
    server.wait_ready();
    rt.block_on(wait_serving(&server));
}

#[test]
fn at_the_connection_cap_a_new_channel_waits_for_a_free_place() {
    let server = grpc_server(
        &[
            "--classifier-weights",
            &classifier_weights(),
            "--max-connections",
            "1",
        ],
        true,
    );
    let rt = runtime();
    rt.block_on(async {
        // The readiness checks' channels close first.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut first = detector(&server).await;
        first
            .list_models(pb::ListModelsRequest {})
            .await
            .expect("the first channel is served");
        let url = server.grpc.clone().expect("grpc address");
        let second = tokio::spawn(async move {
            let mut c = DetectorClient::new(channel(url).await);
            c.list_models(pb::ListModelsRequest {}).await.map(|_| ())
        });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            !second.is_finished(),
            "a second connection was served at a cap of 1"
        );
        drop(first);
        let served = tokio::time::timeout(Duration::from_secs(10), second)
            .await
            .expect("served once the first channel closed")
            .expect("task");
        assert!(served.is_ok(), "{served:?}");
    });
}
