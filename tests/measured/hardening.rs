//! Limits an exposed server needs, tried as a hostile client would on the real binary: each
//! refusal has its status and JSON error, the server answers a normal request right after, and
//! memory stays under the bound the test states (peak RSS read from /proc, reset per test).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use base64::Engine as _;
use reqwest::blocking::{multipart, Client};
use serde_json::json;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A field of /proc/PID/status, in kB.
fn status_kb(server: &Server, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id()))
        .expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc status"))
}

/// Resets the server's peak RSS (VmHWM) to its current RSS; returns that RSS in MB.
fn reset_peak(server: &Server) -> u64 {
    let _ = std::fs::write(format!("/proc/{}/clear_refs", server.child.id()), "5");
    status_kb(server, "VmRSS") / 1024
}

fn peak_mb(server: &Server) -> u64 {
    status_kb(server, "VmHWM") / 1024
}

/// The server's peak RSS since `reset_peak` stayed within `bound` MB of `before`.
fn assert_peak_within(server: &Server, before: u64, bound: u64, what: &str) {
    let peak = peak_mb(server);
    eprintln!("{what}: RSS {before} MB before, peak {peak} MB (bound +{bound} MB)");
    assert!(
        peak <= before + bound,
        "{what}: peak {peak} MB, {before} MB before, bound +{bound} MB"
    );
}

/// The CPU, for tests that measure time: they run alone (`alone`), the others beside each
/// other (`beside`). cargo runs a file's tests two at a time here, and a burst, a queue's
/// pace or two models' shares measured while another test loads the cores would be off.
static CPU: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn beside() -> std::sync::RwLockReadGuard<'static, ()> {
    CPU.read().unwrap_or_else(|e| e.into_inner())
}

fn alone() -> std::sync::RwLockWriteGuard<'static, ()> {
    CPU.write().unwrap_or_else(|e| e.into_inner())
}

fn assert_serves(server: &Server, path: &str) {
    let r = post(server, path, "image/png", png_of(64, 48));
    assert_eq!(r.status(), 200, "{path} after the refusals: {:?}", r.text());
}

#[test]
fn degenerate_images_get_422_without_the_blow_up() {
    let _cpu = beside();
    let server = both_models_server();
    let before = reset_peak(&server);
    // 1x20000 would become 232x4.64 M before the crop (13 GB of f32 in torchvision's order);
    // 2000x1 has no detector size (0x1333).
    for (path, w, h) in [
        ("/classify", 20_000, 1),
        ("/classify", 1, 20_000),
        ("/detect", 2000, 1),
        ("/detect", 1, 2000),
    ] {
        let what = format!("{w}x{h} to {path}");
        assert_error(
            &what,
            post(&server, path, "image/png", png_of(w, h)),
            422,
            "unusable_image",
        );
    }
    let peak = peak_mb(&server);
    eprintln!("RSS {before} MB before, peak {peak} MB during the degenerate images");
    assert!(peak < before + 200, "peak {peak} MB, {before} MB before");
    assert_serves(&server, "/classify");
    assert_serves(&server, "/detect");
}

#[test]
fn too_many_images_are_refused_before_any_is_decoded() {
    let _cpu = beside();
    let server = classifier_server(&["--max-images-per-request", "4", "--max-queue", "3"]);
    // Decompression-bomb headers: had any been looked at, the answer would be image_too_large.
    let bomb = png_header_claiming(60_000, 60_000);
    let before = reset_peak(&server);
    let json_body = |n: usize| {
        let images: Vec<String> = (0..n).map(|_| b64(&bomb)).collect();
        serde_json::to_vec(&json!({ "images": images })).expect("json")
    };
    assert_error(
        "5 images as JSON",
        post(&server, "/classify", "application/json", json_body(5)),
        413,
        "too_many_images",
    );
    let mut form = multipart::Form::new();
    for i in 0..5 {
        let part = multipart::Part::bytes(bomb.clone())
            .file_name(format!("{i}.png"))
            .mime_str("image/png")
            .expect("mime");
        form = form.part("image", part);
    }
    let r = client()
        .post(server.url("/classify"))
        .multipart(form)
        .send()
        .expect("POST multipart");
    assert_error("5 images as multipart", r, 413, "too_many_images");
    // Within --max-images-per-request but more than the whole queue holds.
    assert_error(
        "4 images, queue of 3",
        post(&server, "/classify", "application/json", json_body(4)),
        413,
        "too_many_images",
    );
    assert_error(
        "one bomb",
        post(&server, "/classify", "application/json", json_body(1)),
        413,
        "image_too_large",
    );
    assert_peak_within(&server, before, 100, "too many images");
    assert_serves(&server, "/classify");
}

/// A series' value from Prometheus text; the test fails when it is missing.
fn metric(server: &Server, series: &str) -> f64 {
    series_value(&server.metrics(), series.trim_end())
}

#[test]
fn a_job_stops_between_images_once_its_client_has_gone() {
    let _cpu = beside();
    let server = Server::start(
        &[
            "--detector-weights",
            &detector_weights(),
            "--warmup-images",
            "0",
            "--request-timeout-ms",
            "3000",
        ],
        true,
    );
    // Sixteen images, each a forward pass of its own on the CPU (a second or more each):
    // the client gets 504 after 3 s, and the worker drops the rest of the job at the next
    // image instead of running all sixteen while other clients wait.
    let images: Vec<String> = (0..16).map(|_| b64(&png_of(64, 48))).collect();
    let body = serde_json::to_vec(&json!({ "images": images })).expect("json");
    let before = reset_peak(&server);
    let sent = Instant::now();
    assert_error(
        "16 images past the deadline",
        post(&server, "/detect", "application/json", body),
        504,
        "timeout",
    );
    let finished = "detectd_inference_duration_seconds_count{model=\"detector\",version=\"1\"}";
    wait_until("the job's end", Duration::from_secs(120), || {
        try_series(&server.metrics(), finished).is_some_and(|n| n >= 1.0)
    });
    let ended = sent.elapsed().as_secs_f64();
    let ran = metric(
        &server,
        "detectd_images_total{model=\"detector\",version=\"1\"}",
    );
    // On any CPU: the job ends within one image of the 3 s deadline (an image's time is at
    // most the job's time over the images it ran), and so not all sixteen ran.
    let per_image = ended / ran;
    eprintln!("{ran} of 16 images ran; the job ended after {ended:.2} s");
    assert!(
        ran < 16.0 && ended <= 3.0 + 1.5 * per_image + 0.5,
        "{ran} of 16 images ran, the job ended after {ended:.2} s ({per_image:.2} s per image)"
    );
    // Sixteen images resized to 800x1066 in f32 are ~160 MB; one forward pass ~600 MB.
    assert_peak_within(&server, before, 1200, "a job of 16 images");
    // A strip the detector takes at 10x1333 (a fast pass) is answered right after.
    let r = post(&server, "/detect", "image/png", png_of(1333, 10));
    assert_eq!(r.status(), 200, "{:?}", r.text());
}

#[test]
fn decoding_waits_for_room_instead_of_multiplying_memory() {
    let _cpu = beside();
    // With its warm-up (the default, as served): the model's first pass allocates what every
    // later pass reuses (oneDNN's primitives, the heap the tuned allocator keeps), a one-time
    // cost of 400-600 MB on this path that is not the decoding this test bounds.
    let weights = classifier_weights();
    let server = Server::start(
        &[
            "--classifier-weights",
            weights.as_str(),
            "--max-decoding-pixels",
            "20000000",
        ],
        true,
    );
    // Eight 16-megapixel PNGs (a few tens of KB each on the wire) at once; each costs ~400 MB
    // to decode and prepare, so eight at once would take ~3 GB.
    let big = png_of(4000, 4000);
    let before = reset_peak(&server);
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (url, body) = (server.url("/classify"), big.clone());
            std::thread::spawn(move || {
                client()
                    .post(url)
                    .header("content-type", "image/png")
                    .body(body)
                    .send()
                    .expect("POST")
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let statuses: Vec<u16> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_peak_within(&server, before, 1000, "8 x 16 MP at once");
    assert_serves(&server, "/classify");
}

/// Reads until the server closes the connection (or `limit` passes); returns what came.
fn read_to_close(mut stream: TcpStream, limit: Duration) -> (String, bool) {
    stream.set_read_timeout(Some(limit)).expect("timeout");
    let mut got = Vec::new();
    let closed = loop {
        let mut buf = [0u8; 4096];
        match stream.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

fn connect(server: &Server) -> TcpStream {
    let addr = server.base.trim_start_matches("http://");
    TcpStream::connect(addr).expect("connect")
}

fn open_connections(server: &Server) -> f64 {
    server
        .metrics()
        .lines()
        .find_map(|l| l.strip_prefix("detectd_open_connections "))
        .and_then(|v| v.trim().parse().ok())
        .expect("detectd_open_connections")
}

#[test]
fn stalled_headers_idle_sockets_and_slow_bodies_are_closed() {
    let _cpu = beside();
    let server = classifier_server(&["--header-read-timeout-s", "2", "--body-read-timeout-s", "2"]);
    let before = reset_peak(&server);
    let mut stalled = Vec::new();
    for _ in 0..30 {
        let mut s = connect(&server);
        s.write_all(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Ty")
            .expect("write");
        stalled.push(s);
    }
    let idle: Vec<TcpStream> = (0..10).map(|_| connect(&server)).collect();
    let mut slow = Vec::new();
    for _ in 0..10 {
        let mut s = connect(&server);
        s.write_all(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000000\r\n\r\n0123456789",
        )
        .expect("write");
        slow.push(s);
    }
    // Normal clients are served meanwhile.
    assert_serves(&server, "/classify");
    let started = Instant::now();
    for s in stalled.into_iter().chain(idle) {
        let (_, closed) = read_to_close(s, Duration::from_secs(10));
        assert!(closed, "a stalled connection is still open");
    }
    for s in slow {
        let (got, closed) = read_to_close(s, Duration::from_secs(10));
        assert!(got.starts_with("HTTP/1.1 408"), "slow sender got {got:?}");
        assert!(got.contains("body_timeout"), "{got:?}");
        assert!(closed, "the slow sender's connection is still open");
    }
    eprintln!("all 50 closed within {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(open_connections(&server) <= 2.0);
    assert_peak_within(&server, before, 150, "50 stalled connections");
    assert_serves(&server, "/classify");
}

#[test]
fn at_the_connection_cap_new_clients_wait_for_a_free_place() {
    let _cpu = beside();
    let server = classifier_server(&["--max-connections", "3"]);
    // Give the readiness poll's connection time to close.
    std::thread::sleep(Duration::from_millis(300));
    let before = reset_peak(&server);
    let mut held: Vec<TcpStream> = (0..3).map(|_| connect(&server)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let quick = Client::builder()
        .timeout(Duration::from_millis(1500))
        .build()
        .expect("client");
    assert!(
        quick.get(server.url("/healthz")).send().is_err(),
        "a fourth connection was served at a cap of 3"
    );
    held.pop();
    let r = quick.get(server.url("/healthz")).send().expect("GET");
    assert_eq!(r.status(), 200);
    assert_peak_within(&server, before, 50, "connections at the cap");
}

#[test]
fn bodies_past_the_in_flight_budget_get_503_with_retry_after() {
    let _cpu = beside();
    let server = classifier_server(&[
        "--max-inflight-bytes",
        "1000000",
        "--body-read-timeout-s",
        "30",
    ]);
    // A slow sender holds 900 kB of the 1 MB budget.
    let before = reset_peak(&server);
    let mut slow = connect(&server);
    slow.write_all(
        b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 900000\r\n\r\n0123",
    )
    .expect("write");
    std::thread::sleep(Duration::from_millis(500));
    let r = post(&server, "/classify", "image/png", vec![0u8; 200_000]);
    assert!(r.headers().get("retry-after").is_some(), "no Retry-After");
    assert_error("over the in-flight budget", r, 503, "busy");
    assert_peak_within(&server, before, 100, "bodies over the in-flight budget");
    drop(slow);
    std::thread::sleep(Duration::from_millis(500));
    assert_serves(&server, "/classify");
}

fn detectd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_detectd"))
        .args(args)
        .output()
        .expect("run detectd")
}

#[test]
fn the_cli_names_an_unusable_image_and_goes_on() {
    let _cpu = beside();
    let dir = data_dir().join(format!("hardening-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("a_strip.png"), png_of(2000, 1)).expect("write");
    std::fs::write(dir.join("b_ok.png"), png_of(64, 48)).expect("write");
    let weights = detector_weights();
    let out = detectd(&["detect", "--weights", &weights, &path_str(&dir)]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("a_strip.png"), "{stderr}");
    assert!(stderr.contains("one side would be empty"), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    assert!(lines[0].contains("b_ok.png"), "{stdout}");
    // Out-of-range values are usage errors (exit 2, naming the flag), not panics.
    let classifier = classifier_weights();
    let image = path_str(&dir.join("b_ok.png"));
    for (flag, args) in [
        (
            "--top-k",
            vec!["classify", "--weights", &classifier, "--top-k", "0", &image],
        ),
        (
            "--score-threshold",
            vec![
                "detect",
                "--weights",
                &weights,
                "--score-threshold",
                "2",
                &image,
            ],
        ),
        (
            "--iters",
            vec![
                "bench",
                "--model",
                "classifier",
                "--weights",
                &classifier,
                "--iters",
                "0",
            ],
        ),
        (
            "--size",
            vec![
                "bench",
                "--model",
                "classifier",
                "--weights",
                &classifier,
                "--size",
                "0x5",
            ],
        ),
        ("--max-queue", vec!["serve", "--max-queue", "0"]),
    ] {
        let out = detectd(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(2) && stderr.contains(flag),
            "{args:?}: exit {:?}, the error should name {flag}: {stderr}",
            out.status.code()
        );
    }
    // A labels file whose ids disagree with the model's classes is an error, not a shift.
    let labels = dir.join("labels.txt");
    std::fs::write(&labels, "1\tperson\n95\tunicorn\n").expect("write");
    let out = detectd(&[
        "detect",
        "--weights",
        &weights,
        "--labels",
        &path_str(&labels),
        &image,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("line 2") && stderr.contains("id 95"),
        "{stderr}"
    );
}

/// Waits until the server's freed heap has gone back to the OS (the workers trim after a
/// quiet second) and its RSS is steady; returns it in MB.
fn settled_rss(server: &Server) -> u64 {
    let mut last = status_kb(server, "VmRSS") / 1024;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(1500));
        let now = status_kb(server, "VmRSS") / 1024;
        if now.abs_diff(last) < 20 {
            return now;
        }
        last = now;
    }
    last
}

/// Sends `body` to `path` from `clients` threads at once; the statuses and codes, and each
/// answer's seconds.
fn burst(server: &Server, path: &str, body: &[u8], clients: usize) -> Vec<(u16, String, f64)> {
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let (url, body) = (server.url(path), body.to_vec());
            std::thread::spawn(move || {
                let started = Instant::now();
                let r = client()
                    .post(url)
                    .header("content-type", "image/png")
                    .body(body)
                    .send()
                    .expect("POST");
                let status = r.status().as_u16();
                let code = if status == 200 {
                    String::new()
                } else {
                    json_of(r).1["code"].as_str().unwrap_or_default().to_owned()
                };
                (status, code, started.elapsed().as_secs_f64())
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("client thread"))
        .collect()
}

/// What a burst may add to the idle server's RSS with the default decoding budget (64 M
/// pixels): the budget's ~21 bytes per pixel (one 45-megapixel image decoded and prepared at a
/// time: its RGB8, [3, H, W] and f32 copies, 1.3 GB), a forward pass's activations (~0.7 GB),
/// and the prepared inputs queued (10 MB each). Measured: +1.2 to +1.85 GB.
const BURST_BOUND_MB: u64 = 2200;

#[test]
fn bursts_of_large_images_cost_the_decoding_budget_not_the_number_of_clients() {
    let _cpu = alone();
    // Default flags: the decoding budget, queue and timeout as served.
    let server = Server::start(&["--detector-weights", &detector_weights()], true);
    // 7500x6000 = 45 megapixels, under every default limit, a few hundred bytes on the wire.
    let big = png_of(7500, 6000);
    for clients in [32, 8] {
        let idle = settled_rss(&server);
        let before = reset_peak(&server);
        let started = Instant::now();
        let answers = burst(&server, "/detect", &big, clients);
        let peak = peak_mb(&server);
        let ok = answers.iter().filter(|a| a.0 == 200).count();
        let shed: Vec<f64> = answers.iter().filter(|a| a.0 == 503).map(|a| a.2).collect();
        eprintln!(
            "{clients} clients x 45 MP: {ok} answered, {} refused at admission (within {:.2} s), \
             {:.0} s in all; RSS idle {idle} MB, peak {peak} MB (+{} MB)",
            shed.len(),
            shed.iter().copied().fold(0.0, f64::max),
            started.elapsed().as_secs_f64(),
            peak.saturating_sub(before)
        );
        for (status, code, _) in &answers {
            assert!(
                *status == 200 || (*status == 503 && code == "overloaded"),
                "{clients} clients: answered {status} {code}: {answers:?}"
            );
        }
        assert!(
            ok >= clients.min(8),
            "{clients} clients: only {ok} answered"
        );
        // Refused at admission: before decoding, not after a wait.
        assert!(shed.iter().all(|&s| s < 2.0), "slow refusals: {shed:?}");
        assert_peak_within(&server, before, BURST_BOUND_MB, "a burst of 45 MP PNGs");
    }
    assert_serves(&server, "/detect");
}

const EXPECTED_WAIT: &str = "detectd_expected_wait_seconds{model=\"detector\",version=\"1\"} ";

/// Once two images wait behind a running one on `server`'s detector (one pass: `one` s), a
/// request whose deadline (`timeout_ms`) is 2.5 passes is refused at once with 503 overloaded.
fn overload(server: &Server, one: f64, timeout_ms: u64) {
    let depth = "detectd_queue_depth{model=\"detector\",version=\"1\"} ";
    let until = Instant::now() + Duration::from_secs(30);
    while metric(server, depth) < 2.0 {
        assert!(Instant::now() < until, "the queue never held two images");
        std::thread::sleep(Duration::from_millis(20));
    }
    let queued_wait = metric(server, EXPECTED_WAIT);
    assert!(
        queued_wait >= 2.0 * one,
        "expected wait {queued_wait} s, one pass {one} s"
    );
    // It would be answered after about four passes. Its image is 45 megapixels, which takes
    // seconds to decode: the refusal comes before that.
    let started = Instant::now();
    let r = client()
        .post(server.url("/detect"))
        .header("content-type", "image/png")
        .header("x-request-timeout-ms", timeout_ms.to_string())
        .body(png_of(7500, 6000))
        .send()
        .expect("POST");
    let refused_in = started.elapsed();
    let retry_after: u64 = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .expect("a numeric Retry-After");
    eprintln!(
        "one pass {one:.2} s, expected wait with the queue {queued_wait:.2} s; refused in \
         {refused_in:?}, Retry-After {retry_after} s"
    );
    assert_error("past its deadline", r, 503, "overloaded");
    assert!(refused_in < Duration::from_millis(500), "{refused_in:?}");
    assert!(retry_after >= 1 && (retry_after as f64) <= 4.0 * one + 1.0);
}

#[test]
fn an_overloaded_model_refuses_at_admission_with_retry_after() {
    let _cpu = alone();
    let server = Server::start(&["--detector-weights", &detector_weights()], true);
    // The warm-up measured one image's pass: what a request waits on an idle server.
    let one = metric(&server, EXPECTED_WAIT);
    assert!(one > 0.0, "no pace after the warm-up: {one}");
    // A client whose deadline is 2.5 passes.
    let timeout_ms = (2500.0 * one) as u64;
    // Three one-image requests: one runs, two wait.
    let small = png_of(640, 480);
    std::thread::scope(|scope| {
        let fill = scope.spawn(|| burst(&server, "/detect", &small, 3));
        overload(&server, one, timeout_ms);
        // The work ahead of the refused request is answered, not timed out.
        let answers = fill.join().expect("clients");
        assert!(answers.iter().all(|a| a.0 == 200), "{answers:?}");
    });
    // The same deadline on an idle server is met.
    let r = client()
        .post(server.url("/detect"))
        .header("content-type", "image/png")
        .header("x-request-timeout-ms", timeout_ms.to_string())
        .body(small)
        .send()
        .expect("POST");
    assert_eq!(r.status(), 200);
    assert_error(
        "a timeout header that is not a number",
        client()
            .post(server.url("/detect"))
            .header("content-type", "image/png")
            .header("x-request-timeout-ms", "soon")
            .body(png_of(64, 48))
            .send()
            .expect("POST"),
        422,
        "invalid_parameter",
    );
}

/// Images per second each model answered with `clients` closed-loop clients per model, over a
/// window of `seconds` (a model with no clients is left idle).
///
/// Counted from answer to answer, not over the window: the images answered after a model's
/// first answer in the window, over the time from it to its last. A count over the whole window
/// is off by up to a whole run at each end, and a detector run is seconds long: with a few runs
/// per window, that alone moved a model's share by 20% (a CI run failed on it).
fn saturate(server: &Server, clients: &[(&str, usize)], seconds: u64) -> Vec<f64> {
    let image = png_of(640, 480);
    let until = Instant::now() + Duration::from_secs(seconds);
    let threads: Vec<Vec<_>> = clients
        .iter()
        .map(|&(model, n)| {
            let url = server.url(&format!("/v1/models/{model}/{}", task_path(model)));
            (0..n)
                .map(|_| {
                    let (url, image) = (url.clone(), image.clone());
                    std::thread::spawn(move || closed_loop(&url, &image, until))
                })
                .collect()
        })
        .collect();
    threads
        .into_iter()
        .zip(clients)
        .map(|(threads, (model, _))| {
            let mut answered: Vec<Instant> = threads
                .into_iter()
                .flat_map(|t| t.join().expect("client"))
                .collect();
            answered.sort();
            answer_rate(&answered)
                .unwrap_or_else(|| panic!("{model}: fewer than two runs answered in {seconds} s"))
        })
        .collect()
}

/// One client posting `image` to `url` again as soon as it is answered; when each answer came,
/// until `until`.
fn closed_loop(url: &str, image: &[u8], until: Instant) -> Vec<Instant> {
    let mut answered = Vec::new();
    loop {
        let r = client()
            .post(url)
            .header("content-type", "image/png")
            .body(image.to_vec())
            .send()
            .expect("POST");
        assert_eq!(r.status(), 200, "{url}");
        let at = Instant::now();
        if at >= until {
            return answered;
        }
        answered.push(at);
    }
}

/// Images per second from the first answer to the last: the images of the first run (the ones
/// answered within `BATCH` of the first answer) opened the interval and are not counted in it.
fn answer_rate(answered: &[Instant]) -> Option<f64> {
    const BATCH: Duration = Duration::from_millis(50);
    let (first, last) = (*answered.first()?, *answered.last()?);
    let after = answered.iter().filter(|&&at| at > first + BATCH).count();
    let span = last.duration_since(first).as_secs_f64();
    (after > 0 && span > 0.0).then(|| after as f64 / span)
}

fn task_path(model: &str) -> &'static str {
    if model == "cls" {
        "classify"
    } else {
        "detect"
    }
}

#[test]
fn two_saturated_models_share_the_cpu_by_their_weights() {
    let _cpu = alone();
    // A small detector input and one image per run: many runs per window, each short beside
    // the window, so a share is measured from many turns (the classifier's runs are short).
    let det = format!(
        "det={},task=detect,weight=1,min_size=320,max_size=480,max_batch_size=1",
        detector_weights()
    );
    let cls = format!("cls={},task=classify,weight=1", classifier_weights());
    let server = Server::start(&["--model", &det, "--model", &cls], true);
    let window = 10;
    let det_alone = saturate(&server, &[("det", 2)], window)[0];
    let cls_alone = saturate(&server, &[("cls", 4)], window)[0];
    let both = saturate(&server, &[("det", 2), ("cls", 4)], window);
    let (d, c) = (both[0] / det_alone, both[1] / cls_alone);
    eprintln!(
        "images/s alone: detector {det_alone:.2}, classifier {cls_alone:.2}; both saturated: \
         detector {:.2} ({:.0}% of alone), classifier {:.2} ({:.0}%); sum of shares {:.2}",
        both[0],
        100.0 * d,
        both[1],
        100.0 * c,
        d + c
    );
    // Equal weights: half the CPU time each, so about half of what each does alone; the
    // turns cost little, so the shares add up to about one. Each share is held above 35%,
    // not nearer the half it is: this VM's CPU comes and goes (one run measured the alone
    // rates at 0.95 and 5.22 images/s, against 1.23 and 11.5 in the next, and the detector
    // at 38% of it), and a starved model gets far less.
    assert!(
        d >= 0.35,
        "the detector got {:.0}% of its rate alone",
        100.0 * d
    );
    assert!(
        c >= 0.35,
        "the classifier got {:.0}% of its rate alone",
        100.0 * c
    );
    assert!(d + c >= 0.9, "shares add up to {:.2}", d + c);
}
