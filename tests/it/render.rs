//! `POST /detect?render=png|jpeg` on the real server: the input at its own size with the
//! boxes drawn where the JSON says they are and nothing changed far from them; one image only.

use std::time::Duration;

use crate::common::*;
use reqwest::blocking::{multipart, Client};
use serde_json::Value;

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .expect("client")
}

fn post(server: &Server, query: &str, body: &[u8]) -> reqwest::blocking::Response {
    client()
        .post(server.url(&format!("/detect?{query}")))
        .header("content-type", "image/png")
        .body(body.to_vec())
        .send()
        .expect("POST /detect")
}

#[test]
fn rendered_images_have_the_input_size_and_boxes_where_the_json_says() {
    let img = &images(&["r120x400.png:120x400:RGB"])[0];
    let bytes = std::fs::read(img).expect("read image");
    let input = image::load_from_memory(&bytes).expect("decode").to_rgb8();
    let server = Server::start(
        &[
            "--detector-weights",
            &detector_weights(),
            "--warmup-images",
            "0",
        ],
        true,
    );
    let query = "score_threshold=0&max_detections=1";
    let json: Value = post(&server, query, &bytes).json().expect("JSON");
    let b: Vec<f64> = json["results"][0]["detections"][0]["box"]
        .as_array()
        .expect("one detection")
        .iter()
        .map(|v| v.as_f64().expect("number"))
        .collect();

    let response = post(&server, &format!("{query}&render=png"), &bytes);
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "image/png");
    assert!(response.headers().contains_key("server-timing"));
    let drawn = image::load_from_memory(&response.bytes().expect("body"))
        .expect("a PNG")
        .to_rgb8();
    assert_eq!(drawn.dimensions(), input.dimensions());

    // The left edge of the box is drawn over.
    let (x, y1, y2) = (
        b[0].round() as u32,
        b[1].round() as u32,
        b[3].round() as u32,
    );
    let edge: Vec<u32> = (y1..y2.min(input.height())).collect();
    let changed = edge
        .iter()
        .filter(|&&y| drawn.get_pixel(x, y) != input.get_pixel(x, y))
        .count();
    assert!(
        changed * 2 > edge.len(),
        "{changed} of {} edge pixels drawn",
        edge.len()
    );
    // Nothing changes outside the box and the label tab above it.
    for (px, py, p) in drawn.enumerate_pixels() {
        let (fx, fy) = (px as f64, py as f64);
        let near = fx >= b[0] - 2.0
            && fx <= b[2].max(b[0] + 300.0) + 2.0
            && fy >= b[1] - 60.0
            && fy <= b[3] + 2.0;
        assert!(
            near || p == input.get_pixel(px, py),
            "pixel ({px}, {py}) changed far from the box {b:?}"
        );
    }

    let response = post(&server, &format!("{query}&render=jpeg"), &bytes);
    assert_eq!(response.headers()["content-type"], "image/jpeg");
    let jpeg = image::load_from_memory(&response.bytes().expect("body")).expect("a JPEG");
    assert_eq!((jpeg.width(), jpeg.height()), input.dimensions());

    let (status, body) = {
        let r = post(&server, "render=gif", &bytes);
        (r.status().as_u16(), r.json::<Value>().expect("JSON"))
    };
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("invalid_parameter"))
    );
    assert!(
        body["error"].as_str().unwrap_or("").contains("png or jpeg"),
        "{body}"
    );

    let form = multipart::Form::new()
        .part(
            "a",
            multipart::Part::bytes(bytes.clone()).file_name("a.png"),
        )
        .part(
            "b",
            multipart::Part::bytes(bytes.clone()).file_name("b.png"),
        );
    let r = client()
        .post(server.url("/detect?render=png"))
        .multipart(form)
        .send()
        .expect("POST");
    assert_eq!(r.status(), 422);
    let body: Value = r.json().expect("JSON");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("exactly one image"),
        "{body}"
    );
}
