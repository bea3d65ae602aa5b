//! `detectd weights fetch URL` against a local HTTP server: a verified download lands in the
//! cache; a wrong hash or a cut transfer fails and leaves nothing in the folder, not even a
//! temporary file.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

use crate::common;

/// Serves `body` to every request, declaring `declared` bytes, then closes the connection.
fn serve(body: Vec<u8>, declared: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(&stream);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let mut out = &stream;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {declared}\r\nConnection: close\r\n\r\n"
            );
            let _ = out.write_all(head.as_bytes());
            let _ = out.write_all(&body);
            let _ = out.flush();
        }
    });
    format!("http://{addr}")
}

fn payload() -> Vec<u8> {
    (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect()
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn empty_dir(name: &str) -> PathBuf {
    let dir = common::root()
        .join("target/fetch-tests")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create dir");
    dir
}

fn fetch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_detectd"))
        .args(["weights", "fetch"])
        .args(args)
        .output()
        .expect("run detectd")
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_download_with_the_right_hash_lands_verified() {
    let body = payload();
    let base = serve(body.clone(), body.len());
    let dir = empty_dir("right");
    let hash = sha256(&body);
    let url = format!("{base}/models/model.pth?x=1");
    let out = fetch(&[
        &url,
        "--sha256",
        &hash,
        "--cache-dir",
        &common::path_str(&dir),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let path = dir.join("model.pth");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        common::path_str(&path)
    );
    assert_eq!(std::fs::read(&path).expect("read"), body);
    assert_eq!(listing(&dir), vec!["model.pth"]);

    // torch.hub's hash prefix in the file name verifies it too, and --output places it.
    let named = format!("{base}/resnet-{}.pth", &hash[..8]);
    let target = dir.join("sub/chosen.pth");
    let out = fetch(&[&named, "--output", &common::path_str(&target)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("unverified"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&target).expect("read"), body);
}

#[test]
fn a_download_without_a_hash_warns_and_names_its_hash() {
    let body = payload();
    let base = serve(body.clone(), body.len());
    let dir = empty_dir("nohash");
    let out = fetch(&[
        &format!("{base}/plain.pth"),
        "--cache-dir",
        &common::path_str(&dir),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("unverified") && err.contains(&sha256(&body)),
        "{err}"
    );
    assert_eq!(listing(&dir), vec!["plain.pth"]);
}

#[test]
fn a_wrong_hash_fails_and_leaves_nothing() {
    let body = payload();
    let base = serve(body.clone(), body.len());
    let dir = empty_dir("wrong");
    let wrong = "0".repeat(64);
    let out = fetch(&[
        &format!("{base}/model.pth"),
        "--sha256",
        &wrong,
        "--cache-dir",
        &common::path_str(&dir),
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("does not match") && err.contains(&sha256(&body)),
        "{err}"
    );
    assert!(listing(&dir).is_empty(), "{:?}", listing(&dir));
}

#[test]
fn a_cut_transfer_fails_and_leaves_nothing() {
    let body = payload();
    let base = serve(body.clone(), body.len() + 5000);
    let dir = empty_dir("cut");
    let out = fetch(&[
        &format!("{base}/model.pth"),
        "--sha256",
        &sha256(&body),
        "--cache-dir",
        &common::path_str(&dir),
    ]);
    assert!(!out.status.success(), "a short body must fail");
    assert!(stderr(&out).contains("cannot fetch"), "{}", stderr(&out));
    assert!(listing(&dir).is_empty(), "{:?}", listing(&dir));
}

/// A server that sends its headers and a few bytes, then stalls (holding the connection).
fn serve_stalling() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(&stream);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let mut out = &stream;
            let _ = out.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n0123456789");
            let _ = out.flush();
            held.push(stream);
        }
    });
    format!("http://{addr}")
}

#[test]
fn a_stalled_download_times_out_and_leaves_nothing() {
    let base = serve_stalling();
    let dir = empty_dir("stall");
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_detectd"))
        .args(["weights", "fetch", &format!("{base}/model.pth")])
        .args(["--cache-dir", &common::path_str(&dir)])
        .env("DETECTD_DOWNLOAD_TIMEOUT_S", "2")
        .output()
        .expect("run detectd");
    let took = started.elapsed();
    assert!(!out.status.success(), "a stalled download must fail");
    assert!(took.as_secs() < 20, "took {took:?}");
    assert!(stderr(&out).contains("cannot fetch"), "{}", stderr(&out));
    assert!(listing(&dir).is_empty(), "{:?}", listing(&dir));
}

#[test]
fn a_partial_file_left_by_a_killed_fetch_is_removed_by_the_next() {
    let body = payload();
    let base = serve(body.clone(), body.len());
    let dir = empty_dir("stale");
    // What a fetch killed mid-download leaves: an unlocked partial file.
    std::fs::write(dir.join(".model.pth.Ab12Cd.partial"), b"half").expect("write partial");
    let out = fetch(&[
        &format!("{base}/model.pth"),
        "--sha256",
        &sha256(&body),
        "--cache-dir",
        &common::path_str(&dir),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(listing(&dir), vec!["model.pth".to_string()]);
}

#[test]
fn names_and_aliases_are_listed_and_bad_targets_refused() {
    let dir = empty_dir("list");
    let out = Command::new(env!("CARGO_BIN_EXE_detectd"))
        .args(["weights", "list", "--cache-dir", &common::path_str(&dir)])
        .output()
        .expect("run detectd");
    let text = String::from_utf8_lossy(&out.stdout);
    for name in [
        "fasterrcnn-v1, v1",
        "fasterrcnn-v2, v2",
        "resnet50-v1",
        "resnet50-v2",
    ] {
        assert!(text.contains(name), "{text}");
    }
    let out = fetch(&["no-such-name"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("weights list"), "{}", stderr(&out));
    let out = fetch(&["http://127.0.0.1:9/x.pth", "--sha256", "xyz"]);
    assert!(stderr(&out).contains("hex digits"), "{}", stderr(&out));
}
