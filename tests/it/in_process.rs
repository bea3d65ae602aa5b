//! The fast tier: the HTTP edge and the service in-process (axum's `oneshot`), over a fake
//! detector engine that answers at once. It checks routing, input forms and the request limits
//! in milliseconds; the real binary with real models is `server.rs` and `hardening.rs`.

use std::sync::Arc;
use std::time::Duration;

use crate::common::png_of;
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use base64::Engine as _;
use detectd::batch::{BatchConfig, Batcher, Engine, ModelLabels};
use detectd::http::{router, AppState, BodyLimits};
use detectd::labels::Labels;
use detectd::metrics::Metrics;
use detectd::model::{Detection, ModelError};
use detectd::service::{
    Decoding, DetectInput, Limits, LoadContext, Loaded, ModelInfo, ModelSettings, Registry, Served,
    Service, SettingsDefaults,
};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

/// Finds one person in every image.
struct FakeDetector;

impl Engine for FakeDetector {
    type Input = DetectInput;
    type Output = Vec<Detection>;
    fn run(&mut self, inputs: Vec<DetectInput>) -> Result<Vec<Vec<Detection>>, ModelError> {
        let person = Detection {
            bbox: [1.0, 2.0, 3.0, 4.0],
            score: 0.9,
            label: 1,
            ..Detection::default()
        };
        Ok(inputs.iter().map(|_| vec![person.clone()]).collect())
    }
}

struct Setup {
    max_images: usize,
    max_queue: usize,
    max_body: usize,
    max_inflight: usize,
    body_timeout: Duration,
    admin_key: Option<String>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            max_images: 32,
            max_queue: 64,
            max_body: 1 << 20,
            max_inflight: 8 << 20,
            body_timeout: Duration::from_secs(5),
            admin_key: None,
        }
    }
}

fn app(s: Setup) -> Router {
    let metrics = Arc::new(Metrics::new());
    let batch = BatchConfig {
        max_batch_size: 4,
        max_batch_delay: Duration::from_millis(1),
        max_queue: s.max_queue,
    };
    let registry = Registry::new(LoadContext {
        cache_dir: std::env::temp_dir(),
        warmup_images: None,
        min_agreement: 0.95,
        metrics: metrics.clone(),
        max_memory: None,
        defaults: SettingsDefaults::default(),
        cpu: detectd::batch::CpuShare::new(),
    });
    // Two fake detectors: `detector` (the default) and `other`.
    for name in ["detector", "other"] {
        let labels = ModelLabels::new(name, 1);
        let (batcher, started, _worker) =
            Batcher::spawn(labels, batch, metrics.clone(), None, |_| Ok(FakeDetector));
        assert!(started.blocking_recv().expect("started").is_ok());
        let info = ModelInfo {
            name: name.into(),
            version: 1,
            arch: "fake".into(),
            device: "cpu".into(),
            precision: "fp32".into(),
            num_classes: 91,
            masks: false,
            keypoints: None,
        };
        let served = Served::new(batcher, info, Labels::coco());
        let settings = ModelSettings::new(name, "fake", &SettingsDefaults::default());
        let params = Default::default();
        registry.insert(settings, Loaded::Detector { served, params });
    }
    let service = Service {
        registry: Arc::new(registry),
        metrics,
        limits: Limits {
            max_pixels: 50_000_000,
            max_images: s.max_images,
            request_timeout: Duration::from_secs(10),
            decoding: Decoding::new(64_000_000),
        },
        admission: Default::default(),
    };
    let body = BodyLimits::new(s.max_body, s.max_images, s.body_timeout, s.max_inflight);
    let state = AppState::new(Arc::new(service), None, s.admin_key, body);
    router(Arc::new(state), &[])
}

fn post(path: &str, content_type: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, content_type)
        .body(body.into())
        .expect("request")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().expect("runtime")
}

async fn send(app: &Router, request: Request<Body>) -> (StatusCode, Value) {
    let response = app.clone().oneshot(request).await.expect("response");
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn images_json(n: usize, image: &[u8]) -> Vec<u8> {
    let one = base64::engine::general_purpose::STANDARD.encode(image);
    serde_json::to_vec(&json!({ "images": vec![one; n] })).expect("json")
}

#[test]
fn answers_flow_through_the_service_and_are_labelled() {
    let app = app(Setup::default());
    runtime().block_on(async {
        let (status, body) = send(&app, post("/detect", "image/png", png_of(40, 30))).await;
        assert_eq!(status, 200, "{body}");
        let result = &body["results"][0];
        assert_eq!(
            (result["width"].as_u64(), result["height"].as_u64()),
            (Some(40), Some(30))
        );
        assert_eq!(result["detections"][0]["label"], "person");
        let (status, body) = send(
            &app,
            post("/detect", "application/json", images_json(3, &png_of(8, 8))),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["results"].as_array().map(Vec::len), Some(3));
        let (status, body) = send(&app, post("/classify", "image/png", png_of(8, 8))).await;
        assert_eq!(
            (status.as_u16(), &body["code"]),
            (404, &json!("model_not_loaded"))
        );
    });
}

#[test]
fn limits_answer_with_their_status_and_code() {
    let app = app(Setup {
        max_images: 4,
        max_queue: 3,
        max_body: 100_000,
        max_inflight: 50_000,
        body_timeout: Duration::from_millis(200),
        admin_key: None,
    });
    let small = png_of(8, 8);
    runtime().block_on(async {
        let cases: Vec<(&str, Request<Body>, u16, &str)> = vec![
            (
                "more images than allowed",
                post("/detect", "application/json", images_json(5, &small)),
                413,
                "too_many_images",
            ),
            (
                "more images than the queue holds",
                post("/detect", "application/json", images_json(4, &small)),
                413,
                "too_many_images",
            ),
            (
                "a strip with no detector size",
                post("/detect", "image/png", png_of(2000, 1)),
                422,
                "unusable_image",
            ),
            (
                "a body over the limit",
                post("/detect", "image/png", vec![0u8; 100_001]),
                413,
                "body_too_large",
            ),
            (
                "more bytes than the in-flight budget",
                Request::post("/detect")
                    .header(header::CONTENT_TYPE, "image/png")
                    .header(header::CONTENT_LENGTH, "60000")
                    .body(Body::from(vec![0u8; 60_000]))
                    .expect("request"),
                503,
                "busy",
            ),
            (
                "a body that never ends",
                post(
                    "/detect",
                    "image/png",
                    Body::from_stream(futures_util::stream::pending::<
                        Result<Vec<u8>, std::io::Error>,
                    >()),
                ),
                408,
                "body_timeout",
            ),
            (
                "an unknown content type",
                post("/detect", "text/plain", "hi"),
                415,
                "unsupported_media_type",
            ),
        ];
        for (what, request, status, code) in cases {
            let (got, body) = send(&app, request).await;
            assert_eq!(got.as_u16(), status, "{what}: {body}");
            assert_eq!(body["code"], code, "{what}: {body}");
        }
        // Nothing was left held: a normal request still goes through.
        let (status, body) = send(&app, post("/detect", "image/png", small.clone())).await;
        assert_eq!(status, 200, "{body}");
    });
}

#[test]
fn models_are_reached_by_name_and_an_unknown_one_is_404() {
    let app = app(Setup::default());
    runtime().block_on(async {
        let (status, body) = send(
            &app,
            post("/v1/models/other/detect", "image/png", png_of(8, 8)),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            (
                body["model"]["name"].as_str(),
                body["model"]["version"].as_u64()
            ),
            (Some("other"), Some(1))
        );
        let (status, body) =
            send(&app, post("/detect?model=other", "image/png", png_of(8, 8))).await;
        assert_eq!(
            (status.as_u16(), body["model"]["name"].as_str()),
            (200, Some("other")),
            "{body}"
        );
        let (_, body) = send(&app, post("/detect", "image/png", png_of(8, 8))).await;
        assert_eq!(
            body["model"]["name"], "detector",
            "the first is the default"
        );
        for path in [
            "/v1/models/nope/detect",
            "/detect?model=nope",
            "/v1/models/detector/classify",
        ] {
            let (status, body) = send(&app, post(path, "image/png", png_of(8, 8))).await;
            assert_eq!(
                (status.as_u16(), body["code"].as_str()),
                (404, Some("model_not_found")),
                "{path}: {body}"
            );
        }
        let listed = app
            .clone()
            .oneshot(
                Request::get("/v1/models")
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("response");
        let listed: Value =
            serde_json::from_slice(&listed.into_body().collect().await.expect("body").to_bytes())
                .expect("json");
        let names: Vec<&str> = listed["models"]
            .as_array()
            .expect("models")
            .iter()
            .filter_map(|m| m["name"].as_str())
            .collect();
        assert_eq!(names, ["detector", "other"]);
        assert_eq!(listed["models"][1]["state"], "ready");
        assert_eq!(listed["models"][1]["settings"]["box_nms_thresh"], 0.5);
    });
}

#[test]
fn the_admin_api_needs_its_key_and_is_absent_without_one() {
    let put = |key: Option<&str>| {
        let mut r =
            Request::put("/v1/models/other").header(header::CONTENT_TYPE, "application/json");
        if let Some(k) = key {
            r = r.header(header::AUTHORIZATION, format!("Bearer {k}"));
        }
        r.body(Body::from(r#"{"source": "/nowhere.pth"}"#))
            .expect("request")
    };
    let delete = |key: &str| {
        Request::delete("/v1/models/other")
            .header(header::AUTHORIZATION, format!("Bearer {key}"))
            .body(Body::empty())
            .expect("request")
    };
    let without = app(Setup::default());
    let with = app(Setup {
        admin_key: Some("sesame".into()),
        ..Setup::default()
    });
    runtime().block_on(async {
        let (status, _) = send(&without, put(Some("k"))).await;
        assert_eq!(status, 404, "no admin routes without --admin-key");
        let (status, _) = send(&without, delete("k")).await;
        assert_eq!(status, 404);
        for key in [None, Some("wrong")] {
            let (status, body) = send(&with, put(key)).await;
            assert_eq!(
                (status.as_u16(), body["code"].as_str()),
                (401, Some("unauthorized")),
                "{key:?}"
            );
        }
        let (status, body) = send(&with, put(Some("sesame"))).await;
        assert_eq!(
            (status.as_u16(), body["code"].as_str()),
            (422, Some("load_failed")),
            "{body}"
        );
        let (status, _) = send(&with, delete("sesame")).await;
        assert_eq!(status, 204);
        let (status, body) = send(
            &with,
            post("/v1/models/other/detect", "image/png", png_of(8, 8)),
        )
        .await;
        assert_eq!(
            (status.as_u16(), body["code"].as_str()),
            (404, Some("model_not_found")),
            "{body}"
        );
        let (status, _) = send(&with, delete("sesame")).await;
        assert_eq!(status, 404, "deleted twice");
    });
}

/// A setting the route does not read is refused, not ignored: in the query, a JSON body's
/// fields and a multipart body's text parts, with the known names and the closest one.
#[test]
fn unknown_parameters_are_refused_with_the_known_ones() {
    let app = app(Setup::default());
    let refused = |body: &Value, unknown: &str, close: Option<&str>| {
        assert_eq!(body["code"], "invalid_parameter", "{body}");
        let error = body["error"].as_str().unwrap_or("");
        assert!(error.contains(&format!("{unknown:?}")), "{error}");
        assert!(
            error.contains("; known: model, score_threshold, max_detections"),
            "{error}"
        );
        match close {
            Some(c) => assert!(error.contains(&format!("did you mean {c:?}")), "{error}"),
            None => assert!(!error.contains("did you mean"), "{error}"),
        }
    };
    runtime().block_on(async {
        for path in [
            "/detect?score_treshold=0.9",
            "/v1/models/other/detect?score_threshold=0.5&score_treshold=0.9",
        ] {
            let (status, body) = send(&app, post(path, "image/png", png_of(8, 8))).await;
            assert_eq!(status, 422, "{path}: {body}");
            refused(&body, "score_treshold", Some("score_threshold"));
        }
        let (status, body) = send(
            &app,
            post("/detect?tile=512x512", "image/png", png_of(8, 8)),
        )
        .await;
        assert_eq!(status, 422, "{body}");
        refused(&body, "tile", None);

        let one = base64::engine::general_purpose::STANDARD.encode(png_of(8, 8));
        let json = serde_json::to_vec(&json!({"image": one, "max_detection": 3})).expect("json");
        let (status, body) = send(&app, post("/detect", "application/json", json)).await;
        assert_eq!(status, 422, "{body}");
        refused(&body, "max_detection", Some("max_detections"));
        assert!(
            body["error"]
                .as_str()
                .unwrap_or("")
                .contains("image, images"),
            "{body}"
        );

        let boundary = "b0undary";
        let mut form = format!(
            "--{boundary}\r\ncontent-disposition: form-data; name=\"lables\"\r\n\r\nperson\r\n\
             --{boundary}\r\ncontent-disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\
             content-type: image/png\r\n\r\n"
        )
        .into_bytes();
        form.extend(png_of(8, 8));
        form.extend(format!("\r\n--{boundary}--\r\n").into_bytes());
        let content_type = format!("multipart/form-data; boundary={boundary}");
        let (status, body) = send(&app, post("/detect", &content_type, form)).await;
        assert_eq!(status, 422, "{body}");
        refused(&body, "lables", Some("labels"));

        // The known names still work, from every place.
        let (status, body) = send(
            &app,
            post(
                "/detect?score_threshold=0.5&max_detections=3",
                "image/png",
                png_of(8, 8),
            ),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    });
}

/// A request that is not HTTP/1.1 at all (a garbage request line, a header line without a
/// colon) is answered 400 with the JSON error body, not hyper's empty one, and the server goes
/// on serving.
#[test]
fn malformed_http_is_refused_in_json() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = app(Setup::default());
    runtime().block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let limits = detectd::http::ConnectionLimits {
            max_connections: 16,
            header_read_timeout: Duration::from_secs(5),
            max_concurrent_streams: 16,
        };
        let open = prometheus::IntGauge::new("open", "open connections").expect("gauge");
        tokio::spawn(detectd::http::serve(
            listener,
            app,
            limits,
            open,
            std::future::pending(),
        ));
        let exchange = |request: &'static [u8]| async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            stream.write_all(request).await.expect("send");
            let mut answer = Vec::new();
            let read = stream.read_to_end(&mut answer);
            tokio::time::timeout(Duration::from_secs(10), read)
                .await
                .expect("an answer within 10 s")
                .expect("read");
            String::from_utf8_lossy(&answer).into_owned()
        };
        for request in [
            &b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n"[..],
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
            b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
        ] {
            let answer = exchange(request).await;
            assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
            let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
            let body: Value = serde_json::from_str(body).unwrap_or(Value::Null);
            assert_eq!(body["code"], "bad_request", "{answer}");
            assert!(
                body["error"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("malformed HTTP request"),
                "{answer}"
            );
        }
        let answer =
            exchange(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    });
}
