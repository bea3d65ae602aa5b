//! Helpers for tests that compare detectd with torchvision: run `tests/support/tvref.py` in
//! the project's virtualenv, cache what it makes under `target/tvref/`, read its outputs.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use tch::{Kind, Tensor};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn python() -> PathBuf {
    root().join(".venv/bin/python")
}

/// A folder for generated files, shared by the tests of all files.
pub fn data_dir() -> PathBuf {
    let d = root().join("target/tvref");
    std::fs::create_dir_all(&d).expect("create target/tvref");
    d
}

static GENERATE: Mutex<()> = Mutex::new(());

/// Runs tvref.py with `args` unless `output` exists already (a cache shared across tests;
/// outputs are written under a temporary name and renamed, so a half-written file never counts).
pub fn tvref(output: &Path, args: &[&str]) -> PathBuf {
    let _lock = GENERATE.lock().unwrap_or_else(|e| e.into_inner());
    if output.exists() {
        return output.to_owned();
    }
    let partial = output.with_extension(format!(
        "partial.{}",
        output.extension().and_then(|e| e.to_str()).unwrap_or("bin")
    ));
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            if *a == "{out}" {
                partial.display().to_string()
            } else {
                a.to_string()
            }
        })
        .collect();
    let out = Command::new(python())
        .arg(root().join("tests/support/tvref.py"))
        .args(&args)
        .env("TVREF_THREADS", "2")
        .output()
        .expect("run tvref.py (did scripts/setup run?)");
    assert!(
        out.status.success(),
        "tvref.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if partial.exists() {
        std::fs::rename(&partial, output).expect("rename tvref output");
    }
    output.to_owned()
}

/// Test images, made once: `name:HxW:RGB|L` specs.
pub fn images(specs: &[&str]) -> Vec<PathBuf> {
    let dir = data_dir().join("images");
    std::fs::create_dir_all(&dir).expect("create images dir");
    let missing: Vec<&str> = specs
        .iter()
        .copied()
        .filter(|s| !dir.join(s.split(':').next().unwrap_or_default()).exists())
        .collect();
    if !missing.is_empty() {
        let _lock = GENERATE.lock().unwrap_or_else(|e| e.into_inner());
        let mut args = vec!["images", "--out-dir"];
        let d = dir.display().to_string();
        args.push(&d);
        args.extend(missing.iter());
        let out = Command::new(python())
            .arg(root().join("tests/support/tvref.py"))
            .args(&args)
            .output()
            .expect("run tvref.py images");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    specs
        .iter()
        .map(|s| dir.join(s.split(':').next().unwrap_or_default()))
        .collect()
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}

pub fn read_tensors(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .expect("read safetensors")
        .into_iter()
        .collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    if a.numel() == 0 {
        return 0.0;
    }
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

pub fn assert_close(what: &str, ours: &Tensor, theirs: &Tensor, tol: f64) {
    let d = max_abs_diff(ours, theirs);
    assert!(
        d <= tol,
        "{what}: max |detectd - torchvision| = {d:e} > {tol:e}"
    );
}

pub fn decode_file(path: &Path) -> Tensor {
    let bytes = std::fs::read(path).expect("read image");
    detectd::imaging::decode(&bytes, u64::MAX)
        .expect("decode image")
        .tensor
}
