//! Mask R-CNN and Keypoint R-CNN served: the real binary answers masks as COCO RLE that
//! pycocotools decodes to torchvision's masks, polygons on request, keypoints equal to
//! torchvision's with their names; `/v1/models` says which outputs a model has; gRPC carries
//! the same; `?render=` draws masks and keypoints (kept in target/artifacts); and the CLI's
//! COCO results load in pycocotools and run through COCOeval (segm and keypoints).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;
use detectd::grpc::pb;
use detectd::grpc::pb::detector_client::DetectorClient;
use serde_json::Value;
use tch::{Kind, Tensor};

/// Runs tvref.py on this run's own inputs (never a cached output).
fn detect(server: &Server, path: &str, image: &Path) -> Value {
    let (status, body) = json_of(post(
        server,
        path,
        "image/png",
        std::fs::read(image).expect("image"),
    ));
    assert_eq!(status, 200, "{path}: {body}");
    body
}

fn check_boxes(what: &str, dets: &[Value], r: &HashMap<String, Tensor>) {
    let scores: Vec<f32> = r["0.scores"].shallow_clone().try_into().expect("scores");
    assert_eq!(dets.len(), scores.len(), "{what}: detection count");
    assert!(
        !dets.is_empty(),
        "{what}: the seeded weights should detect something"
    );
    for (d, s) in dets.iter().zip(&scores) {
        assert!(
            (d["score"].as_f64().unwrap_or(f64::NAN) - *s as f64).abs() < 1e-4,
            "{what}: score"
        );
    }
}

fn model<'a>(list: &'a Value, name: &str) -> &'a Value {
    list["models"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == name))
        .unwrap_or_else(|| panic!("no model {name} in {list}"))
}

fn artifacts() -> PathBuf {
    let dir = root().join("target/artifacts");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}

#[test]
fn masks_and_keypoints_are_served_as_torchvision_makes_them() {
    let image = images(&["d480x640.png:480x640:RGB"]).remove(0);
    let masks_weights = path_str(&instance_weights("mask-v2"));
    let kp_weights = path_str(&instance_weights("keypoint"));
    let server = Server::start(
        &[
            "--model",
            &format!("masks={masks_weights}"),
            "--model",
            &format!("kp={kp_weights}"),
            "--grpc-addr",
            "127.0.0.1:0",
            "--warmup-images",
            "0",
        ],
        true,
    );

    let list: Value = client()
        .get(server.url("/v1/models"))
        .send()
        .and_then(|r| r.json())
        .expect("/v1/models");
    let m = model(&list, "masks");
    assert_eq!(m["arch"], "maskrcnn_resnet50_fpn_v2");
    assert_eq!(m["outputs"], serde_json::json!(["boxes", "masks"]));
    let k = model(&list, "kp");
    assert_eq!(k["arch"], "keypointrcnn_resnet50_fpn_v1");
    assert_eq!(k["outputs"], serde_json::json!(["boxes", "keypoints"]));
    assert_eq!(k["keypoint_names"][0], "nose");
    assert_eq!(k["skeleton"].as_array().map(Vec::len), Some(19));
    assert_eq!(k["classes"], 2);

    // Masks: COCO RLE that pycocotools decodes to torchvision's masks (> 0.5).
    let answer = detect(&server, "/v1/models/masks/detect", &image);
    let dets = answer["results"][0]["detections"]
        .as_array()
        .expect("detections")
        .clone();
    let refs = instance_reference(
        "mask-v2",
        "serve_mask-v2",
        &[],
        std::slice::from_ref(&image),
    );
    check_boxes("masks", &dets, &refs);
    assert_eq!(dets[0]["mask"]["size"], serde_json::json!([480, 640]));
    let answer_file = data_dir().join("serve_masks_answer.json");
    std::fs::write(&answer_file, answer.to_string()).expect("write answer");
    let decoded = read_tensors(&tvref_fresh(
        &data_dir().join("serve_masks_decoded.safetensors"),
        &[
            "decode-rle",
            "--answer",
            &path_str(&answer_file),
            "--out",
            "{out}",
        ],
    ));
    let ours = &decoded["0.masks"];
    let theirs = &refs["0.masks"];
    assert_eq!(ours.size(), theirs.size());
    let set = theirs.sum(Kind::Int64).int64_value(&[]);
    assert!(set > 0, "torchvision's masks are empty");
    // Mask by mask, pixel for pixel: RLE is lossless, so one flipped pixel of one mask fails.
    for k in 0..ours.size()[0] {
        let differ = ours
            .get(k)
            .ne_tensor(&theirs.get(k))
            .sum(Kind::Int64)
            .int64_value(&[]);
        assert_eq!(
            differ, 0,
            "served mask {k}: {differ} pixels differ from torchvision's"
        );
    }

    // Other mask forms, and their checks.
    let poly = detect(
        &server,
        "/v1/models/masks/detect?mask_format=polygon",
        &image,
    );
    let first = &poly["results"][0]["detections"][0]["mask"];
    assert!(
        first.is_array() && first[0].as_array().is_some_and(|p| p.len() >= 6),
        "{first}"
    );
    let none = detect(&server, "/v1/models/masks/detect?mask_format=none", &image);
    assert!(none["results"][0]["detections"][0].get("mask").is_none());
    let png = std::fs::read(&image).expect("image");
    for (query, what) in [
        ("mask_format=svg", "format"),
        ("mask_threshold=1.5", "threshold"),
    ] {
        assert_error(
            what,
            post(
                &server,
                &format!("/v1/models/masks/detect?{query}"),
                "image/png",
                png.clone(),
            ),
            422,
            "invalid_parameter",
        );
    }

    // Keypoints: named, equal to torchvision's.
    let kp_answer = detect(&server, "/v1/models/kp/detect", &image);
    let kp_dets = kp_answer["results"][0]["detections"]
        .as_array()
        .expect("detections")
        .clone();
    let kp_refs = instance_reference(
        "keypoint",
        "serve_keypoint",
        &[],
        std::slice::from_ref(&image),
    );
    check_boxes("keypoints", &kp_dets, &kp_refs);
    let theirs: Vec<f32> = kp_refs["0.keypoints"]
        .reshape([-1])
        .try_into()
        .expect("keypoints");
    let scores: Vec<f32> = kp_refs["0.keypoints_scores"]
        .reshape([-1])
        .try_into()
        .expect("scores");
    let ours: Vec<&Value> = kp_dets
        .iter()
        .flat_map(|d| d["keypoints"].as_array().expect("keypoints"))
        .collect();
    assert_eq!(ours.len(), scores.len());
    assert_eq!(ours[0]["name"], "nose");
    assert_eq!(ours[16]["name"], "right_ankle");
    for (i, k) in ours.iter().enumerate() {
        let f = |key: &str| k[key].as_f64().unwrap_or(f64::NAN);
        assert!(
            (f("x") - theirs[3 * i] as f64).abs() < 1e-3,
            "keypoint {i} x"
        );
        assert!(
            (f("y") - theirs[3 * i + 1] as f64).abs() < 1e-3,
            "keypoint {i} y"
        );
        assert!(
            (f("score") - scores[i] as f64).abs() < 1e-4,
            "keypoint {i} score"
        );
    }

    // Rendered: masks and keypoints drawn over what boxes alone draw.
    let render = |path: &str| {
        let r = post(&server, path, "image/png", png.clone());
        assert_eq!(r.status(), 200, "{path}");
        image::load_from_memory(&r.bytes().expect("PNG"))
            .expect("decode")
            .to_rgb8()
    };
    for (name, with, without) in [
        (
            "render-masks.png",
            "/v1/models/masks/detect?render=png&score_threshold=0.3",
            "/v1/models/masks/detect?render=png&score_threshold=0.3&mask_format=none",
        ),
        (
            "render-keypoints.png",
            "/v1/models/kp/detect?render=png&score_threshold=0.3",
            "",
        ),
    ] {
        let drawn = render(with);
        assert_eq!(drawn.dimensions(), (640, 480));
        drawn.save(artifacts().join(name)).expect("save artifact");
        let plain = image::open(&image).expect("image").to_rgb8();
        let base = if without.is_empty() {
            plain
        } else {
            render(without)
        };
        let changed = drawn
            .pixels()
            .zip(base.pixels())
            .filter(|(a, b)| a != b)
            .count();
        assert!(changed > 1000, "{name}: {changed} pixels changed");
    }

    // gRPC: the same masks and keypoints.
    let grpc = server.grpc.clone().expect("grpc");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (g_masks, g_kp) = rt.block_on(async {
        let mut c = DetectorClient::connect(grpc).await.expect("connect");
        let ask = |model: &str| pb::DetectRequest {
            image: png.clone(),
            model: model.into(),
            ..Default::default()
        };
        let m = c
            .detect(ask("masks"))
            .await
            .expect("Detect masks")
            .into_inner();
        let k = c.detect(ask("kp")).await.expect("Detect kp").into_inner();
        let list = c
            .list_models(pb::ListModelsRequest {})
            .await
            .expect("ListModels")
            .into_inner();
        let kp = list.models.iter().find(|m| m.name == "kp").expect("kp");
        assert_eq!(kp.outputs, ["boxes", "keypoints"]);
        assert_eq!((kp.keypoint_names.len(), kp.skeleton.len()), (17, 19));
        let masks = list
            .models
            .iter()
            .find(|m| m.name == "masks")
            .expect("masks");
        assert_eq!(masks.outputs, ["boxes", "masks"]);
        (m, k)
    });
    assert_eq!(g_masks.detections.len(), dets.len());
    for (g, h) in g_masks.detections.iter().zip(&dets) {
        let mask = g.mask.as_ref().expect("gRPC mask");
        assert_eq!((mask.height, mask.width), (480, 640));
        assert_eq!(Some(mask.counts.as_str()), h["mask"]["counts"].as_str());
    }
    assert_eq!(g_kp.detections[0].keypoints.len(), 17);
    assert_eq!(g_kp.detections[0].keypoints[0].name, "nose");
}

/// `detect --format coco` with a mask and a keypoint model: pycocotools loads the results and
/// COCOeval runs on them (segm, keypoints), with the results as their own ground truth.
#[test]
fn cli_coco_results_run_through_cocoeval() {
    let image = images(&["d480x640.png:480x640:RGB"]).remove(0);
    let dir = tempfile::tempdir().expect("tempdir");
    for (arch, iou) in [("mask-v2", "segm"), ("keypoint", "keypoints")] {
        let results = dir.path().join(format!("{arch}.json"));
        let out = Command::new(env!("CARGO_BIN_EXE_detectd"))
            .args(["detect", "--weights", &path_str(&instance_weights(arch))])
            .args(["--format", "coco", "--output", &path_str(&results)])
            .args(["--score-threshold", "0.3", &path_str(&image)])
            .output()
            .expect("detectd detect");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = dir.path().join(format!("{arch}.images.json"));
        let report = tvref_run(&[
            "coco-eval".into(),
            "--images".into(),
            path_str(&listing),
            "--results".into(),
            path_str(&results),
            "--iou".into(),
            iou.into(),
        ]);
        let last: Value = serde_json::from_str(report.lines().last().unwrap_or("")).expect("JSON");
        eprintln!("{arch} {iou}: {last}");
        assert!(last["results"].as_u64().unwrap_or(0) > 0, "{last}");
        let ap = last["stats"][0].as_f64().unwrap_or(0.0);
        assert!(
            ap > 0.9,
            "{arch}: COCOeval {iou} AP of the results against themselves is {ap}"
        );
    }
}
