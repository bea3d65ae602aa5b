//! Helpers for tests that compare detectd with torchvision: run `tests/support/tvref.py` in
//! the project's virtualenv, cache what it makes under `target/tvref/`, read its outputs.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

use tch::{Kind, Tensor};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn python() -> PathBuf {
    root().join(".venv/bin/python")
}

/// A folder for generated files, shared by the tests of all files: `target/tvref/STAMP`, where
/// STAMP is a digest of the reference scripts (`tests/support/`) and the torch and torchvision
/// versions installed, so a change to any of them makes every reference afresh. (Folders of
/// other stamps are removed when a new one is first made: a CI machine's disk is the limit.)
pub fn data_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let parent = root().join("target/tvref");
        let dir = parent.join(stamp());
        if !dir.exists() {
            for old in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                let _ = std::fs::remove_dir_all(old.path())
                    .or_else(|_| std::fs::remove_file(old.path()));
            }
        }
        std::fs::create_dir_all(&dir).expect("create target/tvref/STAMP");
        dir
    })
    .clone()
}

/// Digest of what the references depend on besides their arguments.
fn stamp() -> String {
    let mut hash = Sha256::new();
    let support = root().join("tests/support");
    let mut scripts: Vec<PathBuf> = std::fs::read_dir(&support)
        .expect("read tests/support")
        .flatten()
        .map(|e| e.path())
        .collect();
    scripts.sort();
    for script in scripts {
        hash.update(script.file_name().unwrap_or_default().as_encoded_bytes());
        hash.update(std::fs::read(&script).expect("read a reference script"));
    }
    let site = glob::glob(&format!(
        "{}/.venv/lib/python3*/site-packages/torch*-*.dist-info",
        root().display()
    ))
    .expect("glob the virtualenv");
    let mut versions: Vec<String> = site
        .flatten()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    versions.sort();
    assert!(
        versions.iter().any(|v| v.starts_with("torch-"))
            && versions.iter().any(|v| v.starts_with("torchvision-")),
        "torch and torchvision are not in .venv (did scripts/setup run?): {versions:?}"
    );
    hash.update(versions.join(",").as_bytes());
    hex(&hash.finalize()[..6])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs the project's Python with `args` (and `env`), failing the test with its stderr when it
/// fails; returns its stdout.
pub fn run_python<S: AsRef<std::ffi::OsStr>>(
    what: &str,
    args: &[S],
    env: &[(&str, &str)],
) -> String {
    let out = Command::new(python())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("run {what} (did scripts/setup run?): {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `tests/support/tvref.py serve`: one Python process for every reference of a test run, so
/// that torch and torchvision are imported once. Its answers arrive through a reader thread, so
/// that a reference that never finishes fails the test at `REFERENCE_DEADLINE`.
struct Worker {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    answers: mpsc::Receiver<String>,
}

/// Far above the slowest reference (a Mask R-CNN on five images: ~40 s on 2 cores).
const REFERENCE_DEADLINE: Duration = Duration::from_secs(600);

static WORKER: Mutex<Option<Worker>> = Mutex::new(None);

impl Worker {
    fn start() -> Worker {
        let mut child = Command::new(python())
            .arg(root().join("tests/support/tvref.py"))
            .arg("serve")
            .env("TVREF_THREADS", "2")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start tvref.py serve (did scripts/setup run?): {e}"));
        let stdin = child.stdin.take().expect("tvref stdin");
        let stdout = child.stdout.take().expect("tvref stdout");
        let (send, answers) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Worker {
            child,
            stdin,
            answers,
        }
    }

    /// Runs one command; `Err` when the process is unusable (it is then started again).
    fn call(&mut self, args: &[String]) -> Result<Value, String> {
        let line = serde_json::to_string(args).expect("arguments as JSON");
        writeln!(self.stdin, "{line}").map_err(|e| format!("write to tvref.py serve: {e}"))?;
        let answer = self.answers.recv_timeout(REFERENCE_DEADLINE).map_err(|e| {
            let _ = self.child.kill();
            format!("tvref.py serve gave no answer ({e}); its stderr is above")
        })?;
        serde_json::from_str(&answer)
            .map_err(|e| format!("tvref.py serve answered {answer:?}: {e}"))
    }
}

/// Runs tvref.py with `args` in the shared process; returns what the command printed.
pub fn tvref_run(args: &[String]) -> String {
    let mut worker = WORKER.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let called = worker.get_or_insert_with(Worker::start).call(args);
    log_call(args, started.elapsed());
    let answer = match called {
        Ok(answer) => answer,
        Err(broken) => {
            *worker = None;
            panic!("tvref.py {args:?}: {broken}");
        }
    };
    match answer["ok"].as_bool() {
        Some(true) => answer["stdout"].as_str().unwrap_or_default().to_owned(),
        _ => panic!(
            "tvref.py {args:?} failed:\n{}",
            answer["error"].as_str().unwrap_or("(no error text)")
        ),
    }
}

/// Where the suite's time goes: each reference's seconds, appended to `target/tvref/calls.log`
/// (what the suite spends in torchvision, beside what it spends in detectd).
fn log_call(args: &[String], took: Duration) {
    let line = format!("{:.2}\t{}\n", took.as_secs_f64(), args.join(" "));
    let log = root().join("target/tvref/calls.log");
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .and_then(|mut f| f.write_all(line.as_bytes()));
}

/// Runs tvref.py with `args` unless its output exists already: a cache shared by every test,
/// keyed by the arguments (the file is `NAME-DIGEST.EXT` beside `output`, DIGEST that of the
/// arguments) and by the folder's stamp. `{out}` in `args` stands for the file written; it is
/// written under a temporary name and renamed, so a half-written file never counts.
pub fn tvref(output: &Path, args: &[&str]) -> PathBuf {
    let mut digest = Sha256::new();
    for a in args {
        digest.update(a.as_bytes());
        digest.update([0]);
    }
    let stem = output.file_stem().and_then(|s| s.to_str()).unwrap_or("out");
    let ext = output.extension().and_then(|e| e.to_str()).unwrap_or("bin");
    let keyed = output.with_file_name(format!("{stem}-{}.{ext}", hex(&digest.finalize()[..6])));
    let _lock = GENERATE.lock().unwrap_or_else(|e| e.into_inner());
    if !keyed.exists() {
        make(&keyed, args);
    }
    keyed
}

/// Runs tvref.py with `args` whether or not `output` exists (its inputs are not in `args`).
pub fn tvref_fresh(output: &Path, args: &[&str]) -> PathBuf {
    let _lock = GENERATE.lock().unwrap_or_else(|e| e.into_inner());
    make(output, args);
    output.to_owned()
}

fn make(output: &Path, args: &[&str]) {
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
    tvref_run(&args);
    assert!(
        partial.exists(),
        "tvref.py {args:?} wrote no {}",
        partial.display()
    );
    std::fs::rename(&partial, output).expect("rename tvref output");
}

static GENERATE: Mutex<()> = Mutex::new(());

/// Test images, made once: `name:HxW:RGB|L` specs. Each is made in a folder of its own, keyed
/// by its spec, so that two specs with one name are two images.
pub fn images(specs: &[&str]) -> Vec<PathBuf> {
    let paths: Vec<PathBuf> = specs
        .iter()
        .map(|spec| {
            let mut digest = Sha256::new();
            digest.update(spec.as_bytes());
            let name = spec.split(':').next().unwrap_or_default();
            data_dir()
                .join("images")
                .join(hex(&digest.finalize()[..6]))
                .join(name)
        })
        .collect();
    let _lock = GENERATE.lock().unwrap_or_else(|e| e.into_inner());
    for (spec, path) in specs.iter().zip(&paths) {
        if path.exists() {
            continue;
        }
        let dir = path.parent().expect("image folder");
        let partial = dir.with_extension("partial");
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial).expect("create images dir");
        tvref_run(&[
            "images".into(),
            "--out-dir".into(),
            partial.display().to_string(),
            spec.to_string(),
        ]);
        std::fs::rename(&partial, dir).expect("rename image folder");
    }
    paths
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

/// Asserts that `ours` and `theirs` have one shape and are equal element for element: what
/// "exact" means in this project's claims. Prints the largest difference either way.
pub fn assert_equal(what: &str, ours: &Tensor, theirs: &Tensor) {
    let d = max_abs_diff(ours, theirs);
    eprintln!("{what}: max |detectd - torchvision| = {d:e}");
    assert!(
        d == 0.0,
        "{what}: not equal, max |detectd - torchvision| = {d:e}"
    );
}

/// Polls `done` every 20 ms until it holds, failing the test with `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not seen within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A series' value in Prometheus text (`series` up to the space before the value); the test
/// fails when the series is missing or its value is not a number.
pub fn series_value(metrics: &str, series: &str) -> f64 {
    try_series(metrics, series)
        .unwrap_or_else(|| panic!("no series {series} in /metrics:\n{metrics}"))
}

/// As `series_value`, `None` when the series is missing (not yet made).
pub fn try_series(metrics: &str, series: &str) -> Option<f64> {
    let value = metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("series {series}: {value:?}: {e}")),
    )
}

/// The detector's queue depth series, as a test server (one version) names it.
pub const DETECTOR_QUEUE: &str = "detectd_queue_depth{model=\"detector\",version=\"1\"}";
/// The detector's jobs whose pass has started: the queue-time histogram's count.
const DETECTOR_STARTED: &str =
    "detectd_queue_duration_seconds_count{model=\"detector\",version=\"1\"}";

/// Whether all `n` detector requests a test sent are admitted, and at least `waiting` of them
/// still wait for their pass, from one scrape. A request counts in the queue depth from its
/// admission (before its image is decoded) until its pass starts, then in the started count:
/// the depth alone can count a first request not yet started and miss the last one, which a
/// SIGTERM sent then would refuse.
pub fn detector_admitted(server: &Server, n: f64, waiting: f64) -> bool {
    let m = server.metrics();
    let queued = try_series(&m, DETECTOR_QUEUE).unwrap_or(0.0);
    // No pass started yet: the histogram has no series for the model until its first one.
    let started = try_series(&m, DETECTOR_STARTED).unwrap_or(0.0);
    started + queued >= n && queued >= waiting
}

pub fn decode_file(path: &Path) -> Tensor {
    let bytes = std::fs::read(path).expect("read image");
    detectd::imaging::decode(&bytes, u64::MAX)
        .expect("decode image")
        .tensor
}

/// The seeded random v1 detector that the server tests serve.
pub fn detector_weights() -> String {
    path_str(&tvref(
        &data_dir().join("det_v1.pth"),
        &[
            "make-detector",
            "--arch",
            "v1",
            "--seed",
            "7",
            "--weights",
            "{out}",
            "--frozen-eps",
            "0.0",
        ],
    ))
}

/// Seeded Mask R-CNN (`mask-v1`, `mask-v2`) or Keypoint R-CNN (`keypoint`, 2 classes)
/// weights made by torchvision, as the parity and serving tests share them.
pub fn instance_weights(arch: &str) -> PathBuf {
    tvref(
        &data_dir().join(format!("det_{arch}.pth")),
        &[
            "make-detector",
            "--arch",
            arch,
            "--seed",
            "7",
            "--num-classes",
            instance_classes(arch),
            "--weights",
            "{out}",
        ],
    )
}

/// torchvision's outputs for `instance_weights(arch)` on `images`, cached as `ref_{tag}`;
/// `knobs` are tvref.py's constructor arguments (`--min-size 320`...).
pub fn instance_reference(
    arch: &str,
    tag: &str,
    knobs: &[&str],
    images: &[PathBuf],
) -> HashMap<String, Tensor> {
    let out = data_dir().join(format!("ref_{tag}.safetensors"));
    let weights = path_str(&instance_weights(arch));
    let mut args = vec![
        "ref-detector",
        "--arch",
        arch,
        "--num-classes",
        instance_classes(arch),
        "--weights",
        &weights,
        "--out",
        "{out}",
    ];
    args.extend(knobs);
    let paths: Vec<String> = images.iter().map(|p| path_str(p)).collect();
    args.extend(paths.iter().map(String::as_str));
    read_tensors(&tvref(&out, &args))
}

pub fn instance_classes(arch: &str) -> &'static str {
    if arch == "keypoint" {
        "2"
    } else {
        "91"
    }
}

/// The seeded random ResNet-50 that the server tests serve.
pub fn classifier_weights() -> String {
    path_str(&tvref(
        &data_dir().join("cls.pth"),
        &["make-classifier", "--seed", "3", "--weights", "{out}"],
    ))
}

/// A `detectd serve` process on 127.0.0.1 with an ephemeral port; killed when dropped.
pub struct Server {
    pub child: std::process::Child,
    pub base: String,
    /// `http://ADDR` of the gRPC API, when started with `--grpc-addr`.
    pub grpc: Option<String>,
    pub stderr_path: PathBuf,
}

impl Server {
    /// Starts the real binary and waits until it listens and (when `wait_ready`) /readyz is 200.
    pub fn start(args: &[&str], wait_ready: bool) -> Server {
        let stderr_path = std::env::temp_dir().join(format!(
            "detectd-test-{}-{}.log",
            std::process::id(),
            uuid_like()
        ));
        let stderr = std::fs::File::create(&stderr_path).expect("create server log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_detectd"))
            .arg("serve")
            // Exact fp32 unless a test asks for another precision: parity is what most
            // server tests check, and auto's trial would add seconds to every start.
            .env("DETECTD_PRECISION", "fp32")
            // The CPU unless a test names a device: what the tests measure is the CPU's.
            .env("DETECTD_DEVICE", "cpu")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start detectd serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut reader = std::io::BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line).expect("read listen line");
        // The gRPC line, when there is one, comes first.
        let grpc = line
            .trim()
            .strip_prefix("detectd grpc listening on ")
            .map(|a| format!("http://{a}"));
        if grpc.is_some() {
            line.clear();
            reader.read_line(&mut line).expect("read listen line");
        }
        let base = line
            .trim()
            .strip_prefix("detectd listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "unexpected first line {line:?}; log:\n{}",
                    std::fs::read_to_string(&stderr_path).unwrap_or_default()
                )
            });
        let server = Server {
            child,
            base: base.to_owned(),
            grpc,
            stderr_path,
        };
        if wait_ready {
            server.wait_ready();
        }
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn wait_ready(&self) {
        let client = reqwest::blocking::Client::new();
        for _ in 0..600 {
            if let Ok(r) = client.get(self.url("/readyz")).send() {
                if r.status() == 200 {
                    return;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        panic!("server never became ready; log:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn metrics(&self) -> String {
        reqwest::blocking::get(self.url("/metrics"))
            .and_then(|r| r.text())
            .expect("GET /metrics")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stderr_path);
    }
}

/// A server shared by the tests that need nothing of their own from it (a start loads
/// weights; those tests only read): started by the first that asks, through `cell`, and
/// killed when the test binary exits, since a static is never dropped.
pub fn shared(cell: &'static OnceLock<Server>, start: impl FnOnce() -> Server) -> &'static Server {
    cell.get_or_init(|| {
        let server = start();
        kill_at_exit(server.child.id());
        server
    })
}

fn kill_at_exit(pid: u32) {
    static PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());
    static HOOK: std::sync::Once = std::sync::Once::new();
    extern "C" fn kill_all() {
        let pids = PIDS.lock().map(|p| p.clone()).unwrap_or_default();
        for pid in pids {
            // SAFETY: kill(2) on a pid this process started; no memory is involved.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
    PIDS.lock().expect("shared server pids").push(pid);
    // SAFETY: registers a plain function with no arguments, as atexit(3) asks.
    HOOK.call_once(|| assert_eq!(unsafe { libc::atexit(kill_all) }, 0, "atexit"));
}

fn uuid_like() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

/// The sum of a histogram's `_count` and its `le="1"` bucket for one label set, from
/// Prometheus text.
pub fn histogram_count_and_le1(metrics: &str, name: &str, label: &str) -> (f64, f64) {
    let value = |prefix: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value(&format!("{name}_count{{{label}}}")),
        value(&format!("{name}_bucket{{{label},le=\"1\"}}")),
    )
}

/// How `--precision fp32` computes on the CPU: what users run, so what parity is proven for.
pub fn fp32() -> detectd::model::Compute {
    detectd::model::resolve_precision(detectd::model::Precision::Fp32, tch::Device::Cpu).1
}

/// A blocking HTTP client with a generous timeout (a detector pass takes seconds on a CPU).
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(300))
        .build()
        .expect("client")
}

pub fn post(
    server: &Server,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> reqwest::blocking::Response {
    client()
        .post(server.url(path))
        .header("content-type", content_type)
        .body(body)
        .send()
        .expect("POST")
}

pub fn json_of(r: reqwest::blocking::Response) -> (u16, serde_json::Value) {
    let status = r.status().as_u16();
    (status, r.json().expect("JSON body"))
}

/// A grey PNG of `width`×`height` pixels (a few hundred bytes even when large).
pub fn png_of(width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(width, height, image::Rgb([120, 110, 100]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("encode png");
    out.into_inner()
}

/// A server with the seeded classifier, no warm-up, and `extra` flags; ready.
pub fn classifier_server(extra: &[&str]) -> Server {
    let weights = classifier_weights();
    let mut args = vec![
        "--classifier-weights",
        weights.as_str(),
        "--warmup-images",
        "0",
    ];
    args.extend_from_slice(extra);
    Server::start(&args, true)
}

/// A PNG header that declares `width`×`height` (valid CRC) and holds no pixels: a
/// decompression bomb's first bytes.
pub fn png_header_claiming(width: u32, height: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(13u32.to_be_bytes());
    png.extend(&ihdr);
    png.extend(crc32(&ihdr).to_be_bytes());
    png.extend([0, 0, 0, 0]);
    png.extend(b"IDAT");
    png
}

/// An error answer: its status, its code, and a message that is not empty.
pub fn assert_error(what: &str, response: reqwest::blocking::Response, status: u16, code: &str) {
    let (got, body) = json_of(response);
    assert_eq!(got, status, "{what}: {body}");
    assert_eq!(body["code"], code, "{what}: {body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{what}: {body}"
    );
}

/// A server with both seeded models and no warm-up; ready.
pub fn both_models_server() -> Server {
    Server::start(
        &[
            "--detector-weights",
            &detector_weights(),
            "--classifier-weights",
            &classifier_weights(),
            "--warmup-images",
            "0",
        ],
        true,
    )
}
