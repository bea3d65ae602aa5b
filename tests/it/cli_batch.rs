//! The CLI over many images: folders walked and globs expanded in sorted order, COCO results
//! that pycocotools loads, annotated copies under --render-dir, --output and --batch-size,
//! and a bad input that does not stop the run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::*;
use serde_json::Value;

fn detectd(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_detectd"))
        .args(args)
        .output()
        .expect("run detectd")
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// A fresh folder holding `files` (destination name, source image).
fn tree(name: &str, files: &[(&str, &Path)]) -> PathBuf {
    let dir = data_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for (dest, src) in files {
        let dest = dir.join(dest);
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
        std::fs::copy(src, dest).expect("copy image");
    }
    dir
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("read JSON")).expect("JSON")
}

#[test]
fn coco_results_load_in_pycocotools_and_match_the_json_lines() {
    let imgs = images(&["k40x300.png:40x300:RGB", "k50x300.png:50x300:RGB"]);
    let dir = tree(
        "cli-coco",
        &[
            ("a/x.png", &imgs[0]),
            ("b/x.png", &imgs[1]),
            ("b/notes.txt", &imgs[0]),
        ],
    );
    let out_dir = dir.join("out");
    let results = out_dir.join("res.json");
    let render_dir = out_dir.join("render");
    std::fs::create_dir_all(&out_dir).expect("out dir");
    let mut args = strings(&[
        "detect",
        "--weights",
        &detector_weights(),
        "--device",
        "cpu",
    ]);
    args.extend(strings(&[
        "--score-threshold",
        "0",
        &path_str(&dir.join("a")),
    ]));
    args.push(path_str(&dir.join("b/*.png")));
    let mut coco = args.clone();
    coco.extend(strings(&[
        "--format",
        "coco",
        "--batch-size",
        "1",
        "--output",
    ]));
    coco.push(path_str(&results));
    coco.push("--render-dir".into());
    coco.push(path_str(&render_dir));
    let out = detectd(&coco);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty(), "COCO goes to --output only");

    let listing = read_json(&out_dir.join("res.images.json"));
    let files: Vec<&str> = listing["images"]
        .as_array()
        .expect("images")
        .iter()
        .map(|i| i["file_name"].as_str().expect("file_name"))
        .collect();
    let want = [
        path_str(&dir.join("a/x.png")),
        path_str(&dir.join("b/x.png")),
    ];
    assert_eq!(files, want);
    assert_eq!(listing["images"][1]["id"], 2);
    assert_eq!(
        (
            listing["images"][1]["width"].as_u64(),
            listing["images"][1]["height"].as_u64()
        ),
        (Some(300), Some(50))
    );

    // The same detections as JSON lines, whatever the batch size.
    let mut jsonl = args.clone();
    jsonl.extend(strings(&["--batch-size", "2"]));
    let out = detectd(&jsonl);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let coco_results = read_json(&results);
    let coco_results = coco_results.as_array().expect("array");
    let mut expected = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        for d in line["detections"].as_array().expect("detections") {
            expected.push((i as u64 + 1, d.clone()));
        }
    }
    assert!(!expected.is_empty());
    assert_eq!(coco_results.len(), expected.len());
    for (r, (image_id, d)) in coco_results.iter().zip(&expected) {
        assert_eq!(r["image_id"].as_u64(), Some(*image_id));
        assert_eq!(r["category_id"], d["label_id"]);
        let b: Vec<f64> = (0..4)
            .map(|k| d["box"][k].as_f64().unwrap_or(f64::NAN))
            .collect();
        let wh = [b[0], b[1], b[2] - b[0], b[3] - b[1]];
        for k in 0..4 {
            assert!(
                (r["bbox"][k].as_f64().unwrap_or(f64::NAN) - wh[k]).abs() < 1e-3,
                "{r} vs {d}"
            );
        }
    }

    let script = "import sys\nfrom pycocotools.coco import COCO\n\
                  gt = COCO(sys.argv[1])\ndt = gt.loadRes(sys.argv[2])\n\
                  print(len(gt.getImgIds()), len(dt.getAnnIds()), len(gt.getCatIds()))";
    let images_json = out_dir.join("res.images.json");
    let args = [
        std::ffi::OsStr::new("-c"),
        script.as_ref(),
        images_json.as_os_str(),
        results.as_os_str(),
    ];
    let counts = run_python("pycocotools", &args, &[]);
    assert_eq!(
        counts.lines().last(),
        Some(format!("2 {} 80", expected.len()).as_str()),
        "{counts}"
    );

    // Annotated copies keep their relative paths (the two x.png do not collide) and sizes.
    for (src, (h, w)) in [("a/x.png", (40, 300)), ("b/x.png", (50, 300))] {
        let copy = render_dir.join(inputs_relative(&dir.join(src)));
        let drawn = image::open(&copy).unwrap_or_else(|e| panic!("{}: {e}", copy.display()));
        assert_eq!((drawn.width(), drawn.height()), (w, h));
        let plain = image::open(dir.join(src)).expect("input");
        assert_ne!(drawn.to_rgb8(), plain.to_rgb8(), "boxes drawn on {src}");
    }
}

/// The path as given without its root, as --render-dir places copies.
fn inputs_relative(path: &Path) -> PathBuf {
    path.components()
        .filter_map(|c| match c {
            std::path::Component::Normal(p) => Some(p),
            _ => None,
        })
        .collect()
}

#[test]
fn folders_globs_and_bad_inputs_in_order_with_output_file() {
    let imgs = images(&["cgray.png:240x320:L", "c100x80.png:100x80:RGB"]);
    let broken = data_dir().join("broken.jpg");
    std::fs::write(&broken, b"\xff\xd8\xff\xe0 truncated").expect("write broken");
    let dir = tree(
        "cli-classify",
        &[
            ("z/2.PNG", &imgs[0]),
            ("z/sub/1.png", &imgs[1]),
            ("z/skip.txt", &imgs[1]),
            ("g/a.png", &imgs[1]),
            ("g/b.jpg", &broken),
        ],
    );
    let weights = tvref(
        &data_dir().join("cls.pth"),
        &["make-classifier", "--seed", "3", "--weights", "{out}"],
    );
    let output = dir.join("out.jsonl");
    let mut args = strings(&[
        "classify",
        "--weights",
        &path_str(&weights),
        "--device",
        "cpu",
    ]);
    args.extend(strings(&["--top-k", "2", "--batch-size", "3", "--output"]));
    args.push(path_str(&output));
    args.push(path_str(&dir.join("z")));
    args.push(path_str(&dir.join("g/*")));
    args.push(path_str(&dir.join("nothing-*.png")));
    let out = detectd(&args);
    assert!(!out.status.success(), "a bad input fails the exit code");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("b.jpg") && stderr.contains("nothing-*.png"),
        "{stderr}"
    );
    let text = std::fs::read_to_string(&output).expect("--output file");
    let names: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("JSON line")["image"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    let want = ["z/2.PNG", "z/sub/1.png", "g/a.png"].map(|f| path_str(&dir.join(f)));
    assert_eq!(names, want);

    let mut coco = strings(&[
        "classify",
        "--weights",
        &path_str(&weights),
        "--format",
        "coco",
    ]);
    coco.push(path_str(&imgs[0]));
    let out = detectd(&coco);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("classify writes jsonl only"));
}
