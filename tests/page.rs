//! The page at `/` in headless Chromium (tests/support/page.py, playwright driving Debian's
//! chromium): upload an image, detect, and see boxes on the canvas and rows in the table. The
//! screenshot is kept at target/artifacts/page.png.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

#[test]
fn the_page_draws_boxes_and_lists_them() {
    let img = &images(&["p120x400.png:120x400:RGB"])[0];
    let weights = detector_weights();
    let server = Server::start(
        &[
            "--detector-weights",
            &weights,
            "--warmup-images",
            "0",
            "--api-key",
            "page-key",
        ],
        true,
    );
    // The page is static HTML: open even when the API needs a key.
    let page = reqwest::blocking::get(server.url("/")).expect("GET /");
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap_or("")
        .starts_with("text/html"));
    let html = page.text().expect("HTML");
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no external resources"
    );

    let artifacts = root().join("target/artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    let screenshot = artifacts.join("page.png");
    let out = Command::new(python())
        .arg(root().join("tests/support/page.py"))
        .args([
            &server.url("/"),
            &path_str(img),
            &path_str(&screenshot),
            "page-key",
        ])
        .output()
        .expect("run page.py (did scripts/setup install playwright and chromium?)");
    assert!(
        out.status.success(),
        "page.py failed:\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("page.py JSON");
    assert_eq!(report["error"].as_str(), Some(""), "{report}");
    let rows = report["rows"].as_u64().unwrap_or(0);
    assert!(rows > 0, "no result rows: {report}");
    assert_eq!(
        report["count"].as_str(),
        Some(format!("{rows} detections").as_str())
    );
    assert!(
        report["timing"]
            .as_str()
            .unwrap_or("")
            .contains("inference"),
        "{report}"
    );
    let canvas = &report["canvas"];
    assert_eq!(
        (canvas["width"].as_u64(), canvas["height"].as_u64()),
        (Some(400), Some(120))
    );
    assert!(
        canvas["changed"].as_u64().unwrap_or(0) > 0,
        "nothing drawn: {report}"
    );
    assert_eq!(
        canvas["edge"].as_bool(),
        Some(true),
        "first box not drawn: {report}"
    );
    assert!(screenshot.exists());
}
