//! Replays the committed fuzz corpora and crash reproducers (fuzz/corpus/<target>/ and
//! fuzz/artifacts/<target>/) through `detectd::fuzzing`, on stable Rust and without the fuzz
//! crate: an input that once made a target panic keeps being checked by `cargo test`.

use std::path::{Path, PathBuf};
use std::time::Instant;

/// Every plain file under `dir` (recursively), sorted; none if the folder is absent.
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            files_under(&path, out);
        } else if path.is_file() {
            out.push(path);
        }
    }
}

fn replay(target: &str, entry: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for kind in ["corpus", "artifacts"] {
        files_under(&root.join(kind).join(target), &mut files);
    }
    files.sort();
    assert!(
        !files.is_empty(),
        "no inputs for fuzz target {target} under {}",
        root.display()
    );
    let start = Instant::now();
    let mut failed = Vec::new();
    for path in &files {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if std::panic::catch_unwind(|| entry(&bytes)).is_err() {
            failed.push(path.display().to_string());
        }
    }
    eprintln!(
        "{target}: {} inputs in {:.2?}",
        files.len(),
        start.elapsed()
    );
    assert!(
        failed.is_empty(),
        "fuzz target {target} panicked on {} of {} inputs:\n  {}",
        failed.len(),
        files.len(),
        failed.join("\n  ")
    );
}

#[test]
fn checkpoint_corpus() {
    replay("checkpoint", detectd::fuzzing::checkpoint);
}

/// The limits that keep hostile checkpoints cheap must not refuse real ones: every seed state
/// dict (written by torch, fuzz/seeds.py) loads.
#[test]
fn seed_checkpoints_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/checkpoint");
    let mut files = Vec::new();
    files_under(&dir, &mut files);
    files.retain(|p| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))
    });
    assert!(
        !files.is_empty(),
        "no seed checkpoints in {}",
        dir.display()
    );
    for path in files {
        let bytes = std::fs::read(&path).unwrap();
        let tensors = detectd::weights::read_torch_bytes(&bytes)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(!tensors.is_empty(), "{}", path.display());
    }
}

#[test]
fn image_corpus() {
    replay("image", detectd::fuzzing::image);
}

#[test]
fn http_body_corpus() {
    replay("http_body", detectd::fuzzing::http_body);
}

#[test]
fn labels_corpus() {
    replay("labels", detectd::fuzzing::labels);
}
