//! The API document: generated from the handlers, it lists every route, and schemathesis
//! (PyPI) finds no 5xx and no answer that departs from it, on a live server (whose detector is
//! a Mask R-CNN, so that answers with masks are checked too).

use std::process::Command;
use std::sync::OnceLock;

use crate::common::*;
use serde_json::Value;

/// A Mask R-CNN as the detector, so that schemathesis also checks answers carrying masks
/// against the document; one server for both tests, which only read from it.
fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    shared(&SERVER, || {
        let masks = path_str(&instance_weights("mask-v1"));
        Server::start(
            &[
                "--detector-weights",
                &masks,
                "--classifier-weights",
                &classifier_weights(),
                "--warmup-images",
                "0",
            ],
            true,
        )
    })
}

#[test]
fn the_document_lists_every_route_and_docs_render_it() {
    let server = server();
    let doc: Value = reqwest::blocking::get(server.url("/openapi.json"))
        .and_then(|r| r.json())
        .expect("GET /openapi.json");
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().expect("paths");
    for (path, method) in [
        ("/detect", "post"),
        ("/classify", "post"),
        ("/v1/models", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/", "get"),
    ] {
        assert!(paths[path][method].is_object(), "{method} {path} missing");
    }
    let detect = &doc["paths"]["/detect"]["post"];
    let forms = detect["requestBody"]["content"]
        .as_object()
        .expect("bodies");
    for form in ["image/jpeg", "application/json", "multipart/form-data"] {
        assert!(forms.contains_key(form), "{form} body missing");
    }
    let statuses = detect["responses"].as_object().expect("responses");
    for status in [
        "200", "400", "401", "404", "413", "415", "422", "429", "503", "504",
    ] {
        assert!(statuses.contains_key(status), "/detect lacks {status}");
    }
    let docs = reqwest::blocking::get(server.url("/docs/")).expect("GET /docs/");
    assert_eq!(docs.status(), 200);
    assert!(docs.text().unwrap_or_default().contains("swagger-ui"));
}

/// A count from the server's metrics, 0 when the series is absent.
fn count(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn schemathesis_finds_no_server_error_and_no_answer_off_the_document() {
    let server = server();
    let report = root().join("target/artifacts/schemathesis");
    std::fs::create_dir_all(&report).expect("report dir");
    let out = Command::new(root().join(".venv/bin/schemathesis"))
        .current_dir(&report)
        .args(["run", &server.url("/openapi.json")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance",
        ])
        .args(["--max-examples", "20", "--seed", "1", "--workers", "1"])
        .args(["--request-timeout", "120", "--no-color"])
        .args(["--report", "junit", "--report-dir", "."])
        .output()
        .expect("run schemathesis (did scripts/setup run?)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis failed:\n{text}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    // The document's examples hold a real image, so the success answers were checked too.
    let metrics = server.metrics();
    for endpoint in ["/detect", "/classify"] {
        let ok = format!(r#"detectd_requests_total{{endpoint="{endpoint}",status="200"}}"#);
        assert!(
            count(&metrics, &ok) >= 1.0,
            "no 200 from {endpoint}:\n{text}"
        );
    }
    println!("{text}");
}
