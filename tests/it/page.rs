//! The page at `/` in headless Chromium (tests/support/page.py, playwright driving Debian's
//! chromium): upload an image, detect, and see boxes on the canvas and rows in the table. The
//! screenshot (the 1280x800 viewport) is kept at target/artifacts/page.png.

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
    assert_the_page_serves_the_picture(&report);
}

/// At 1280x800 the drawn image takes at least half the page's width; hovering a row
/// highlights its box, hovering a box marks its row (the smallest box under the pointer), and
/// leaving restores the picture; the headers sort; the table collapses.
fn assert_the_page_serves_the_picture(report: &Value) {
    let layout = &report["layout"];
    let (drawn, page) = (
        layout["drawn"].as_f64().unwrap_or(0.0),
        layout["page"].as_f64().unwrap_or(f64::INFINITY),
    );
    assert!(page > 1200.0 && drawn >= page / 2.0, "{layout}");

    let hover = &report["hover"];
    let (before, row, canvas, after) = (
        &hover["before"],
        &hover["row"],
        &hover["canvas"],
        &hover["after"],
    );
    let none: Vec<Value> = Vec::new();
    assert_eq!(before["canvas"], -1, "{hover}");
    assert_eq!(before["rows"].as_array(), Some(&none), "{hover}");
    assert_eq!(
        row["canvas"], row["index"],
        "the row's box is highlighted: {hover}"
    );
    assert_eq!(row["rows"], serde_json::json!([row["index"]]), "{hover}");
    assert_ne!(
        row["pixels"], before["pixels"],
        "the highlight is drawn: {hover}"
    );
    let hot = canvas["canvas"].as_i64().unwrap_or(-1);
    assert!(hot >= 0, "nothing highlighted under the pointer: {hover}");
    assert_eq!(
        canvas["rows"],
        serde_json::json!([hot]),
        "the box's row: {hover}"
    );
    let (point, b) = (&canvas["point"], &canvas["box"]);
    let at = |v: &Value, i: usize| v[i].as_f64().unwrap_or(f64::NAN);
    assert!(
        at(b, 0) - 0.1 <= at(point, 0)
            && at(point, 0) <= at(b, 2) + 0.1
            && at(b, 1) - 0.1 <= at(point, 1)
            && at(point, 1) <= at(b, 3) + 0.1,
        "the marked row's box holds the pointer: {hover}"
    );
    assert_eq!(after["canvas"], -1, "{hover}");
    assert_eq!(after["rows"].as_array(), Some(&none), "{hover}");
    assert_eq!(
        after["pixels"], before["pixels"],
        "leaving restores: {hover}"
    );

    let sort = &report["sort"];
    let numbers = |key: &str| -> Vec<f64> {
        sort[key]
            .as_array()
            .map(|v| v.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default()
    };
    let (up, down) = (numbers("score_up"), numbers("score_down"));
    let rows = report["rows"].as_u64().unwrap_or(0) as usize;
    assert_eq!((up.len(), down.len()), (rows, rows), "{sort}");
    assert!(up.windows(2).all(|w| w[0] <= w[1]), "{sort}");
    assert!(down.windows(2).all(|w| w[0] >= w[1]), "{sort}");
    let labels: Vec<&str> = sort["label_up"]
        .as_array()
        .map(|v| v.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert_eq!(labels.len(), rows, "{sort}");
    assert!(labels.windows(2).all(|w| w[0] <= w[1]), "{sort}");
    assert_eq!(sort["aria"], "ascending", "{sort}");

    let collapse = &report["collapse"];
    assert_eq!(
        (
            collapse["closed_visible"].as_bool(),
            collapse["open_visible"].as_bool()
        ),
        (Some(false), Some(true)),
        "{collapse}"
    );
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
        assert_the_page_serves_the_picture(&report);
    }
}
