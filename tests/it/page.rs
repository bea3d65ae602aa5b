//! The page at `/` in headless Chromium (tests/support/page.py, playwright driving Debian's
//! chromium): upload an image, detect, and see boxes on the canvas and rows in the table. The
//! screenshot is kept at target/artifacts/page.png.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;
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

    let (report, screenshot) = run_page(&server, "/", img, "page.png", "page-key");
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

/// page.py on `path` of `server`: what the page showed, and where its screenshot is.
fn run_page(server: &Server, path: &str, img: &Path, name: &str, key: &str) -> (Value, PathBuf) {
    let artifacts = root().join("target/artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    let screenshot = artifacts.join(name);
    let out = Command::new(python())
        .arg(root().join("tests/support/page.py"))
        .args([
            &server.url(path),
            &path_str(img),
            &path_str(&screenshot),
            key,
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
    (report, screenshot)
}

/// A Mask R-CNN's masks and a Keypoint R-CNN's keypoints drawn on the page (`/?model=NAME`);
/// screenshots kept at target/artifacts/page-masks.png and page-keypoints.png.
#[test]
fn the_page_draws_masks_and_keypoints() {
    let img = &images(&["d480x640.png:480x640:RGB"])[0];
    let masks = path_str(&instance_weights("mask-v2"));
    let kp = path_str(&instance_weights("keypoint"));
    let server = Server::start(
        &[
            "--model",
            &format!("masks={masks}"),
            "--model",
            &format!("kp={kp}"),
            "--warmup-images",
            "0",
        ],
        true,
    );
    for (model, name, output) in [
        ("masks", "page-masks.png", "masks"),
        ("kp", "page-keypoints.png", "keypoints"),
    ] {
        let (report, screenshot) = run_page(&server, &format!("/?model={model}"), img, name, "");
        let drawn = report["canvas"][output].as_u64().unwrap_or(0);
        assert!(drawn > 0, "no {output} drawn: {report}");
        assert!(screenshot.exists());
    }
}
