"""Bounded soak test of a real `detectd serve` on loopback (127.0.0.1 only).

Starts the server on seeded random torchvision weights (made here, cached under target/soak/),
checks each hostile request once on its own (a preflight: what answers it, and whether it
kills or bloats the server), then sends a weighted mix of valid and hostile requests from C
concurrent clients for the duration, printing one line a minute. At the end it waits for the
server's descriptors to return to their starting count, stops the server and prints a markdown
summary. Exit 0 when every criterion holds, 1 when one fails, 2 on a usage or setup error,
130 when interrupted.

Usage (through scripts/soak): soak.py [--minutes N] [--clients C] [--binary PATH]
    [--report FILE] [--seed S] [--stall-cap-s S] [--rss-cap-mb MB] [--exclude KIND,...]
    [--list-kinds] [-- SERVER FLAGS...]

Criteria (all must hold):
- no failure: a valid request answered other than 200/429/503 (/readyz: 200/503), or not
  answered (connection error, timeout, a reply that is not HTTP); a hostile request answered
  5xx other than 503/504/408, or with bytes that are not HTTP (a valid request answered 504,
  the server's own deadline, is bounded and counted apart, not a failure); an error answer whose non-empty
  body is not JSON {"error": ..., "code": ...};
- RSS: the settled RSS at the end is less than 5% above the settled RSS at the end of the
  warm-up (the first 5 minutes, or the first 25% of a shorter run). Settled: new requests
  paused, those in flight answered, then 3 s of quiet, in which the server's workers hand freed
  heap pages back (after 1 s idle, see src/alloc.rs). Under load RSS swings by the size of a
  detector pass (~600 MB) with what happens to be in flight, so the medians under load are
  reported beside it but are not the criterion;
- descriptors: within ~70 s after the traffic stops, the server's open descriptors are back to
  their count before any traffic (+2), with 3 stalled connections of each kind (silent, half a
  request line, a slow body) opened at the stop and held by the client: the server's own
  timeouts must close them;
- the server is alive at the end (and the RSS guard never had to kill it);
- bursts, after the traffic: 32 clients each sending one 45-megapixel PNG to /detect at once
  are all answered 200 or refused at admission (503 overloaded), with the server's peak RSS at
  most BURST_BOUND_MB above its RSS before; then both models saturated at once (half the
  clients on /detect, half on /classify, for SATURATION_S) are all answered, and each model
  answers some; no valid request of any phase is answered 504 (past its deadline after being
  admitted), and RSS settled after the bursts is within the growth limit of the end's.
Findings that are not criteria (hostile requests answered otherwise than planned, stalled
connections the server never closes) are listed after the criteria.
"""

import argparse
import asyncio
import base64
import collections
import ctypes
import io
import json
import math
import os
import random
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "target", "soak")
TVREF = os.path.join(ROOT, "tests", "support", "tvref.py")
HOST = "127.0.0.1"  # the only address this script ever connects to

VALID_TIMEOUT_S = 130.0  # above the server's default --request-timeout-ms (60 s) plus a detect
HOSTILE_TIMEOUT_S = 30.0  # a one-shot hostile request should be answered well within this
PREFLIGHT_TIMEOUT_S = 90.0
END_DRAIN_S = 30.0  # how long requests in flight at the end may take to finish
FD_WAIT_S = 70.0  # how long the server has to close what is left, after the traffic stops
FD_SLACK = 2
END_PROBES = 3  # stalled connections of each kind opened at the end and left to the server
RSS_GROWTH_LIMIT = 0.05
READY_TIMEOUT_S = 300.0
BURST_CLIENTS = 32
BURST_BOUND_MB = 2200.0  # the README's bound for the default --max-decoding-pixels (64 M)
SATURATION_S = 45.0

# The server flags this script sets itself; --listen/--grpc-addr cannot be overridden (loopback
# only), the others can be given after `--` instead of the defaults here.
FIXED_FLAGS = ("--listen", "--grpc-addr")


def log(msg=""):
    print(msg, flush=True)


def die(msg, code=2):
    print(f"soak: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


# ----------------------------------------------------------------------------------------------
# Payloads


def smooth_image(w, h, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 90 * np.sin(yy * rng.uniform(0.01, 0.06) + c) * np.cos(xx * rng.uniform(0.01, 0.06))
                    for c in range(3)], -1)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(w=60000, h=60000):
    """A PNG header declaring w×h RGB (10.8 GB of pixels at 60000²) and the start of its data."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64, 9))
            + png_chunk(b"IEND", b""))


def multipart(files, boundary):
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{i}.png"\r\n'
             f"Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n" for i, (data, ctype) in enumerate(files)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def request(method, path, headers=(), body=b"", close=False, content_length=None):
    """Raw HTTP/1.1 request bytes. content_length declares a length other than the body's."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", "User-Agent: detectd-soak"]
    lines += [f"{k}: {v}" for k, v in headers]
    if method == "POST" or body or content_length is not None:
        lines.append(f"Content-Length: {len(body) if content_length is None else content_length}")
    lines.append("Connection: close" if close else "Connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Kind:
    name: str
    weight: float  # share of the clients' picks, in percent
    mode: str  # valid | hostile | cancel | stall
    desc: str  # the request, in words
    expect: tuple  # outcome prefixes that are as planned
    payloads: list  # raw requests (valid: keep-alive ones)
    closing: list = field(default_factory=list)  # valid only: the same with Connection: close
    latency: bool = False  # counts in the /classify p50/p99
    preflight: bool = True
    valid_ok: tuple = (200, 429, 503)

    @property
    def valid(self):
        return self.mode == "valid"


def build_kinds(max_body):
    pngs = [encode(smooth_image(320, 240, s), "PNG") for s in range(3)]
    jpegs = [encode(smooth_image(320, 240, 10 + s), "JPEG", quality=85) for s in range(3)]
    tiny = encode(smooth_image(1, 1, 20), "PNG")
    tall = encode(Image.new("RGB", (1, 20000), (120, 80, 40)), "PNG")  # 1 wide, 20000 high
    wide = encode(Image.new("RGB", (20000, 1), (40, 80, 120)), "PNG")
    bomb = png_bomb()
    truncated = [j[: len(j) * 6 // 10] for j in jpegs]
    rng = np.random.default_rng(99)
    garbage = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (37, 1500, 20000)]
    form, form_type = multipart([(tiny, "image/png")] * 40, "soakBoundary40")
    form1, form1_type = multipart([(pngs[0], "image/png")], "soakBoundary1")
    many = json.dumps({"images": [base64.b64encode(tiny).decode()] * 100}).encode()

    def post(path, ctype, body, **kw):
        return request("POST", path, [("Content-Type", ctype)], body, **kw)

    def valid(name, weight, desc, reqs, **kw):
        """reqs: fn(close) -> list of raw requests."""
        return Kind(name, weight, "valid", desc, ("200", "429", "503"), reqs(False), reqs(True), **kw)

    def one_shot(name, weight, desc, expect, reqs, mode="hostile", **kw):
        return Kind(name, weight, mode, desc, expect, reqs, **kw)

    kinds = [
        valid("classify_png", 36, "POST /classify, 320×240 PNG", lambda cl: [post("/classify", "image/png", p, close=cl) for p in pngs], latency=True),
        valid("classify_jpeg", 26, "POST /classify, 320×240 JPEG", lambda cl: [post("/classify", "image/jpeg", j, close=cl) for j in jpegs], latency=True),
        valid("classify_json", 3, "POST /classify, JSON with one base64 PNG and top_k 3",
              lambda cl: [post("/classify", "application/json", json.dumps({"image": base64.b64encode(pngs[1]).decode(), "top_k": 3}).encode(), close=cl)], latency=True),
        valid("classify_multipart", 3, "POST /classify, multipart form with one PNG", lambda cl: [post("/classify", form1_type, form1, close=cl)], latency=True),
        valid("detect_jpeg", 2, "POST /detect, 320×240 JPEG", lambda cl: [post("/detect", "image/jpeg", jpegs[0], close=cl)]),
        valid("healthz", 2, "GET /healthz", lambda cl: [request("GET", "/healthz", close=cl)]),
        valid("readyz", 2, "GET /readyz", lambda cl: [request("GET", "/readyz", close=cl)]),
        valid("metrics", 1.5, "GET /metrics", lambda cl: [request("GET", "/metrics", close=cl)]),
        valid("models", 1.5, "GET /v1/models", lambda cl: [request("GET", "/v1/models", close=cl)]),
        # Hostile, one request on a fresh connection each.
        one_shot("garbage_body", 2, "POST /classify, random bytes as image/jpeg (37 B, 1.5 kB, 20 kB)", ("400 invalid_image",),
                 [post("/classify", "image/jpeg", g, close=True) for g in garbage]),
        one_shot("garbage_json", 1, "POST /classify, application/json that is not JSON", ("400 bad_request",),
                 [post("/classify", "application/json", b'{"images": ["iVBOR', close=True)]),
        one_shot("unsupported_type", 0.5, "POST /classify, text/plain body", ("415 unsupported_media_type",),
                 [post("/classify", "text/plain", b"hello", close=True)]),
        one_shot("garbage_http", 0.5, "random bytes instead of a request line, then CRLF CRLF", ("400",),
                 [b"\x16\x03\x01\x02\x00" + garbage[0] + b"\r\n\r\n"]),
        one_shot("not_found", 0.5, "GET /nope", ("404 not_found",), [request("GET", "/nope", close=True)]),
        one_shot("truncated_jpeg", 2, "POST /classify, the first 60% of a JPEG", ("400 invalid_image",),
                 [post("/classify", "image/jpeg", t, close=True) for t in truncated]),
        one_shot("png_bomb_classify", 1, f"POST /classify, PNG header declaring 60000×60000 ({len(bomb)} B)", ("413 image_too_large",),
                 [post("/classify", "image/png", bomb, close=True)]),
        one_shot("png_bomb_detect", 1, f"POST /detect, PNG header declaring 60000×60000 ({len(bomb)} B)", ("413 image_too_large",),
                 [post("/detect", "image/png", bomb, close=True)]),
        one_shot("tall_png_classify", 0.5, f"POST /classify, 1×20000 (w×h) PNG ({len(tall)} B)", ("422",),
                 [post("/classify", "image/png", tall, close=True)]),
        one_shot("wide_png_classify", 0.5, f"POST /classify, 20000×1 (w×h) PNG ({len(wide)} B)", ("422",),
                 [post("/classify", "image/png", wide, close=True)]),
        one_shot("tall_png_detect", 0.5, f"POST /detect, 1×20000 (w×h) PNG ({len(tall)} B)", ("422",),
                 [post("/detect", "image/png", tall, close=True)]),
        one_shot("wide_png_detect", 0.5, f"POST /detect, 20000×1 (w×h) PNG ({len(wide)} B)", ("422",),
                 [post("/detect", "image/png", wide, close=True)]),
        one_shot("json_100_images", 0.7, f"POST /classify, JSON with 100 base64 1×1 PNGs ({len(many)} B)", ("413 too_many_images",),
                 [post("/classify", "application/json", many, close=True)]),
        one_shot("multipart_40_images", 0.7, f"POST /classify, multipart form with 40 1×1 PNGs ({len(form)} B)", ("413 too_many_images",),
                 [post("/classify", form_type, form, close=True)]),
        one_shot("over_max_body", 1.5, f"POST /classify, Content-Length {max_body + 1} (over --max-body-bytes), 16 bytes sent",
                 ("413 body_too_large",), [post("/classify", "image/png", pngs[0][:16], close=True, content_length=max_body + 1)]),
        one_shot("bad_score_threshold", 1.5, "POST /detect?score_threshold=2, a valid JPEG", ("422 invalid_parameter",),
                 [post("/detect?score_threshold=2", "image/jpeg", jpegs[1], close=True)]),
        one_shot("bad_top_k", 1.5, "POST /classify?top_k=0 and ?top_k=abc, a valid JPEG", ("422 invalid_parameter",),
                 [post("/classify?top_k=0", "image/jpeg", jpegs[1], close=True), post("/classify?top_k=abc", "image/jpeg", jpegs[2], close=True)]),
        # Cancelled: a full request, then the socket closed (FIN or RST) within 0-300 ms.
        one_shot("cancel_classify", 1, "POST /classify, closed by the client 0-300 ms after sending", ("cancelled",),
                 [post("/classify", "image/png", pngs[2])], mode="cancel", preflight=False),
        one_shot("cancel_detect", 0.3, "POST /detect, closed by the client 0-300 ms after sending", ("cancelled",),
                 [post("/detect", "image/jpeg", jpegs[2])], mode="cancel", preflight=False),
        # Stalled connections, held in the background until the server closes them (or the cap).
        one_shot("slow_body", 1.2, "POST /classify declaring a 1 MB body, 10 bytes sent, then nothing", ("408",),
                 [post("/classify", "image/png", pngs[0][:10], content_length=1 << 20)], mode="stall", preflight=False),
        one_shot("idle_connection", 1, "a connection that never sends a byte", ("closed", "408"),
                 [b""], mode="stall", preflight=False),
        one_shot("half_request_line", 1, "half a request line ('POST /classi'), then nothing", ("closed", "408", "400"),
                 [b"POST /classi"], mode="stall", preflight=False),
    ]
    names = [k.name for k in kinds]
    assert len(names) == len(set(names))
    return kinds


# ----------------------------------------------------------------------------------------------
# HTTP client


class NotHttp(Exception):
    pass


@dataclass
class Resp:
    status: int
    headers: dict
    body: bytes


async def read_chunked(reader):
    out = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass
            return bytes(out)
        out += await reader.readexactly(size)
        await reader.readexactly(2)


async def read_response(reader):
    """One HTTP/1.x response. Raises IncompleteReadError (partial=b'' when nothing came back),
    NotHttp for bytes that are not an HTTP response, or a ConnectionError."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            if e.partial and not b"HTTP/1.".startswith(e.partial[:7]):
                raise NotHttp(e.partial[:60]) from None
            raise
        except asyncio.LimitOverrunError:
            raise NotHttp(b"(a response head over 1 MiB)") from None
        if not head.startswith(b"HTTP/1."):
            raise NotHttp(head[:60])
        lines = head[:-4].split(b"\r\n")
        try:
            status = int(lines[0].split(b" ")[1])
        except (IndexError, ValueError):
            raise NotHttp(lines[0][:60]) from None
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1")
        if 100 <= status < 200:
            continue
        if status in (204, 304):
            body = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = await read_chunked(reader)
        elif "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        else:
            body = await reader.read()
        return Resp(status, headers, body)


def error_code(resp, kind):
    """(code, malformed) of an error answer: the JSON code, or a tag for other bodies."""
    if resp.status < 400:
        return None, False
    if not resp.body:
        return "(no body)", False
    try:
        obj = json.loads(resp.body)
    except ValueError:
        return "(not JSON)", True
    if isinstance(obj, dict) and isinstance(obj.get("error"), str) and isinstance(obj.get("code"), str):
        return obj["code"], False
    if kind.name == "readyz" and isinstance(obj, dict) and isinstance(obj.get("status"), str):
        return obj["status"], False
    return "(JSON without error/code)", True


def excerpt(b, n=160):
    s = b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b)
    s = "".join(ch if ch.isprintable() else "·" for ch in s.replace("\n", " ").replace("\r", ""))
    return s if len(s) <= n else s[:n] + "…"


# ----------------------------------------------------------------------------------------------
# Process measurements


def proc_status(pid, field_name):
    try:
        with open(f"/proc/{pid}/status") as f:
            m = re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) / 1024 if m else None
    except OSError:
        return None


TCP_STATES = {"01": "est", "02": "syn_sent", "03": "syn_recv", "04": "fin_wait1", "05": "fin_wait2",
              "06": "time_wait", "07": "close", "08": "close_wait", "09": "last_ack", "0A": "listen",
              "0B": "closing"}


def fd_info(pid):
    """(open descriptors, Counter of the server's TCP sockets by state, other sockets)."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None, collections.Counter(), 0
    inodes = []
    for n in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{n}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.append(target[8:-1])
    states = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if len(parts) > 9:
                        states[parts[9]] = TCP_STATES.get(parts[3], parts[3])
        except OSError:
            pass
    tcp = collections.Counter(states[i] for i in inodes if i in states)
    return len(names), tcp, sum(1 for i in inodes if i not in states)


def describe_tcp(tcp, other):
    parts = [f"{k} {v}" for k, v in sorted(tcp.items())]
    return f"tcp {sum(tcp.values())}" + (f": {', '.join(parts)}" if parts else "") + (f"; other sockets {other}" if other else "")


def cpu_model():
    try:
        m = re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read())
        name = m.group(1).strip() if m else "unknown CPU"
    except OSError:
        name = "unknown CPU"
    return f"{name}, {os.cpu_count()} cores"


def mem_available_mb():
    try:
        m = re.search(r"MemAvailable:\s+(\d+) kB", open("/proc/meminfo").read())
        return int(m.group(1)) / 1024
    except (OSError, AttributeError):
        return 8192.0


# ----------------------------------------------------------------------------------------------
# The server


_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _child_setup():
    # Dies with this script, even on SIGKILL (the server is in its own session, so the terminal's
    # Ctrl-C reaches only this script, which stops the server itself).
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Server:
    def __init__(self, binary, flags, log_path):
        self.binary, self.flags, self.log_path = binary, flags, log_path
        self.proc = None
        self.port = None
        self.kill_reason = None  # set when the RSS guard killed it
        self.lines = []
        self.starts = 0

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def start(self):
        self.starts += 1
        self.kill_reason = None
        self.port = None
        self.lines = []
        logf = open(self.log_path, "ab")
        logf.write(f"\n===== soak: start {self.starts}: {' '.join([self.binary, *self.flags])}\n".encode())
        logf.flush()
        self.proc = subprocess.Popen([self.binary, *self.flags], stdout=subprocess.PIPE, stderr=logf, stdin=subprocess.DEVNULL,
                                     cwd=ROOT, start_new_session=True, preexec_fn=_child_setup)
        logf.close()
        try:  # the kernel's OOM killer should pick the server, not a build sharing the machine
            with open(f"/proc/{self.proc.pid}/oom_score_adj", "w") as f:
                f.write("1000")
        except OSError:
            pass
        proc = self.proc

        def pump():
            for raw in proc.stdout:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

        threading.Thread(target=pump, daemon=True).start()

    async def wait_listening(self, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in self.lines:
                m = re.match(r"detectd listening on http://([\d.]+):(\d+)\s*$", line)
                if m:
                    if m.group(1) != HOST:
                        self.stop()
                        die(f"the server listens on {m.group(1)}, not {HOST}; stopped it")
                    self.port = int(m.group(2))
                    return True
            if not self.alive():
                return False
            await asyncio.sleep(0.1)
        return False

    def stop(self, timeout=20.0):
        """SIGTERM, then SIGKILL after timeout. Returns (exit code, seconds, killed)."""
        if self.proc is None:
            return None, 0.0, False
        if self.proc.poll() is not None:
            return self.proc.returncode, 0.0, False
        t0 = time.monotonic()
        try:
            self.proc.send_signal(signal.SIGTERM)
            code = self.proc.wait(timeout=timeout)
            return code, time.monotonic() - t0, False
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(), time.monotonic() - t0, True

    def log_tail(self, n=15, start_marker=True):
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - 200_000))
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return []
        if start_marker:
            for i in range(len(lines) - 1, -1, -1):
                if lines[i].startswith("===== soak: start"):
                    lines = lines[i + 1:]
                    break
        return lines[-n:]


    def log_problems(self, keep=6):
        """Counts of ERROR/WARN/panic lines in the whole log, and the first few of them."""
        levels, examples = collections.Counter(), []
        try:
            with open(self.log_path, "rb") as f:
                for raw in f:
                    line = raw.decode("utf-8", "replace").rstrip()
                    for tag, key in (("panicked", "panics"), (" ERROR ", "ERROR"), (" WARN ", "WARN")):
                        if tag in line:
                            levels[key] += 1
                            if len(examples) < keep:
                                examples.append(line)
                            break
        except OSError:
            pass
        return levels, examples


class RssGuard(threading.Thread):
    """Polls the server's RSS 20 times a second: keeps the max, and kills the server over the cap
    (a request that makes it allocate tens of GB would otherwise take the machine with it)."""

    def __init__(self, server, cap_mb):
        super().__init__(daemon=True)
        self.server, self.cap_mb = server, cap_mb
        self.max_mb = 0.0
        self.track = False  # max is kept only while this is set (during traffic)

    def run(self):
        while True:
            pid = self.server.pid
            if pid and self.server.alive():
                rss = proc_status(pid, "VmRSS")
                if rss is not None:
                    if self.track:
                        self.max_mb = max(self.max_mb, rss)
                    if rss > self.cap_mb and self.server.kill_reason is None:
                        self.server.kill_reason = f"RSS {rss:.0f} MB went over the guard's cap of {self.cap_mb:.0f} MB"
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except OSError:
                            pass
            time.sleep(0.05)


# ----------------------------------------------------------------------------------------------
# Statistics


def pct(xs, q):
    if not xs:
        return None
    s = sorted(xs)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def fmt_s(x):
    if x is None:
        return "-"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def fmt_counts(c):
    def order(k):
        return (0, int(k)) if k.isdigit() else (1, k)
    return " ".join(f"{k}:{c[k]}" for k in sorted(c, key=order)) or "-"


class Stats:
    def __init__(self):
        self.total = collections.Counter()  # status (or connection tag) -> n
        self.minute = collections.Counter()
        self.by_code = collections.Counter()  # (status, code) -> n
        self.by_kind = collections.defaultdict(collections.Counter)  # kind -> outcome -> n
        self.lat = []  # (t, seconds) of /classify 200s
        self.lat_minute = []
        self.failures = collections.Counter()
        self.failure_example = {}
        self.stall = collections.defaultdict(list)  # kind -> [(how, seconds)]
        self.retry_after = collections.Counter()  # (status, has Retry-After) -> n, for 429 and 503
        self.sent = collections.Counter()  # valid / hostile

    def record(self, kind, status, code=None, t=None, latency=None, failure=None, detail=""):
        outcome = status + (f" {code}" if code else "")
        self.total[status] += 1
        self.minute[status] += 1
        self.by_code[(status, code or "")] += 1
        self.by_kind[kind.name][outcome] += 1
        self.sent["valid" if kind.valid else "hostile"] += 1
        if latency is not None and kind.latency and status == "200":
            self.lat.append((t, latency))
            self.lat_minute.append(latency)
        if failure:
            self.failures[failure] += 1
            self.failure_example.setdefault(failure, f"{kind.desc}: {detail}" if detail else kind.desc)


# ----------------------------------------------------------------------------------------------
# The soak


class Conn:
    def __init__(self):
        self.rw = None

    def drop(self, abort=False):
        if self.rw:
            w = self.rw[1]
            try:
                w.transport.abort() if abort else w.close()
            except Exception:  # noqa: BLE001 (a socket already gone)
                pass
            self.rw = None


class Soak:
    def __init__(self, args, server, kinds, guard):
        self.args, self.server, self.guard = args, server, guard
        self.kinds = kinds
        self.stats = Stats()
        self.stop = asyncio.Event()
        self.interrupted = False
        self.t0 = None  # traffic start (monotonic)
        self.samples = []  # (t, rss MB, fds, tcp Counter, other sockets)
        self.minute_lines = []
        self.preflight = []  # (kind, outcome, seconds, rss, note)
        self.excluded = {}  # kind -> why
        self.stall_tasks = set()
        self.stall_limit = max(2, args.clients // 2)
        self.server_death = None  # what happened, when the server died during traffic
        self.fd_start = None
        self.rss_start = None
        self.fd_end = self.fd_end_tcp = self.fd_after_close = None
        self.fd_wait = 0.0
        self.end_probes = []
        self.gate = None  # open: clients send; cleared while RSS settles
        self.in_flight = 0
        self.settled = {}  # "warm-up" / "end" -> (t, RSS MB)

    def now(self):
        return time.monotonic() - self.t0 if self.t0 else 0.0

    async def connect(self):
        return await asyncio.open_connection(HOST, self.server.port, limit=1 << 20)

    # -- answers

    def judge(self, kind, resp, latency, detail_prefix=""):
        code, malformed = error_code(resp, kind)
        status = str(resp.status)
        failure = None
        if kind.valid and resp.status == 504:
            # Admission refuses (503 overloaded) what its expected wait says cannot be answered
            # in time: a 504 is an admitted request that missed its deadline.
            failure = "valid request answered 504 after admission"
        elif kind.valid and resp.status not in kind.valid_ok:
            failure = f"valid request answered {status}{' ' + code if code else ''}"
        elif not kind.valid and resp.status >= 500 and resp.status not in (503, 504, 408):
            failure = f"hostile request answered {status}{' ' + code if code else ''}"
        elif malformed:
            failure = f"error answer {status} whose body is not JSON {{error, code}}"
        if resp.status in (429, 503):
            self.stats.retry_after[(status, "retry-after" in resp.headers)] += 1
        self.stats.record(kind, status, code, self.now(), latency, failure,
                          detail_prefix + (excerpt(resp.body) if resp.status >= 400 else f"{status}"))
        return status, code

    def conn_outcome(self, kind, tag, detail, failure_for_valid=True, failure_any=False):
        failure = None
        if (kind.valid and failure_for_valid) or failure_any:
            failure = f"{'valid' if kind.valid else 'hostile'} request: {tag}"
        self.stats.record(kind, tag, None, self.now(), None, failure, detail)
        return tag, None

    # -- the request modes

    async def do_valid(self, conn, kind, rng):
        close = rng.random() < 0.1  # a tenth on a fresh connection that closes: accept/close churn
        payload = rng.choice(kind.closing if close else kind.payloads)
        t0 = time.monotonic()
        try:
            for attempt in (0, 1):
                reused = conn.rw is not None
                try:
                    async with asyncio.timeout(VALID_TIMEOUT_S):
                        if conn.rw is None:
                            conn.rw = await self.connect()
                        r, w = conn.rw
                        w.write(payload)
                        await w.drain()
                        resp = await read_response(r)
                except asyncio.IncompleteReadError as e:
                    conn.drop()
                    if reused and not e.partial and attempt == 0:
                        continue  # a kept-alive connection the server had closed: once more, fresh
                    return self.conn_outcome(kind, "closed, no answer" if not e.partial else "truncated answer",
                                             f"{len(e.partial)} bytes before EOF")
                except NotHttp as e:
                    conn.drop()
                    return self.conn_outcome(kind, "not HTTP", excerpt(e.args[0]), failure_any=True)
                except TimeoutError:
                    conn.drop()
                    return self.conn_outcome(kind, "no answer in time", f"none in {VALID_TIMEOUT_S:.0f} s")
                except (ConnectionError, OSError) as e:
                    conn.drop()
                    if reused and attempt == 0 and not isinstance(e, ConnectionRefusedError):
                        continue
                    return self.conn_outcome(kind, "connection error", f"{type(e).__name__}: {e}")
                if close or resp.headers.get("connection", "").lower() == "close":
                    conn.drop()
                return self.judge(kind, resp, time.monotonic() - t0)
        except asyncio.CancelledError:
            conn.drop(abort=True)
            self.stats.record(kind, "abandoned at end")
            raise

    async def do_hostile(self, kind, rng, timeout=HOSTILE_TIMEOUT_S):
        payload = rng.choice(kind.payloads)
        t0 = time.monotonic()
        conn = Conn()
        try:
            async with asyncio.timeout(timeout):
                conn.rw = await self.connect()
                r, w = conn.rw
                try:
                    w.write(payload)
                    await w.drain()
                except ConnectionError:
                    pass  # refused mid-body: the answer may still be there to read
                resp = await read_response(r)
            return self.judge(kind, resp, time.monotonic() - t0)
        except asyncio.IncompleteReadError as e:
            return self.conn_outcome(kind, "closed, no answer" if not e.partial else "truncated answer",
                                     f"{len(e.partial)} bytes before EOF", failure_for_valid=False)
        except NotHttp as e:
            return self.conn_outcome(kind, "not HTTP", excerpt(e.args[0]), failure_any=True)
        except TimeoutError:
            return self.conn_outcome(kind, "no answer in time", f"none in {timeout:.0f} s", failure_for_valid=False)
        except ConnectionRefusedError as e:
            return self.conn_outcome(kind, "connection refused", str(e), failure_any=True)
        except (ConnectionError, OSError) as e:
            return self.conn_outcome(kind, "reset", f"{type(e).__name__}: {e}", failure_for_valid=False)
        except asyncio.CancelledError:
            self.stats.record(kind, "abandoned at end")
            raise
        finally:
            conn.drop()

    async def do_cancel(self, kind, rng):
        conn = Conn()
        try:
            async with asyncio.timeout(HOSTILE_TIMEOUT_S):
                conn.rw = await self.connect()
                conn.rw[1].write(rng.choice(kind.payloads))
                await conn.rw[1].drain()
                await asyncio.sleep(rng.uniform(0.0, 0.3))
            self.stats.record(kind, "cancelled")
        except ConnectionRefusedError as e:
            self.conn_outcome(kind, "connection refused", str(e), failure_any=True)
        except (ConnectionError, OSError, TimeoutError) as e:
            self.stats.record(kind, "cancelled", detail=str(e))
        finally:
            conn.drop(abort=rng.random() < 0.5)  # half with FIN, half with RST

    async def do_stall(self, kind, rng):
        """Holds the connection until the server answers or closes it, or the cap."""
        conn = Conn()
        t0 = time.monotonic()
        cap = self.args.stall_cap_s
        try:
            conn.rw = await asyncio.wait_for(self.connect(), HOSTILE_TIMEOUT_S)
            r, w = conn.rw
            payload = rng.choice(kind.payloads)
            if payload:
                w.write(payload)
                await w.drain()
            try:
                async with asyncio.timeout(cap):
                    resp = await read_response(r)
            except TimeoutError:
                self.stats.stall[kind.name].append(("open at cap", time.monotonic() - t0))
                return self.stats.record(kind, "still open at cap")
            except asyncio.IncompleteReadError as e:
                how = "closed, no answer" if not e.partial else "truncated answer"
                self.stats.stall[kind.name].append((how, time.monotonic() - t0))
                return self.stats.record(kind, how)
            except NotHttp as e:
                self.stats.stall[kind.name].append(("not HTTP", time.monotonic() - t0))
                return self.conn_outcome(kind, "not HTTP", excerpt(e.args[0]), failure_any=True)
            except (ConnectionError, OSError):
                self.stats.stall[kind.name].append(("reset", time.monotonic() - t0))
                return self.stats.record(kind, "reset")
            status, code = self.judge(kind, resp, None)
            self.stats.stall[kind.name].append((f"answered {status}{' ' + code if code else ''}", time.monotonic() - t0))
        except ConnectionRefusedError as e:
            self.conn_outcome(kind, "connection refused", str(e), failure_any=True)
        except (ConnectionError, OSError, TimeoutError) as e:
            self.stats.record(kind, "connect error", detail=str(e))
        except asyncio.CancelledError:
            self.stats.stall[kind.name].append(("open at end of run", time.monotonic() - t0))
            self.stats.record(kind, "open at end of run")
            raise
        finally:
            conn.drop()

    # -- clients

    async def client(self, i):
        rng = random.Random(self.args.seed * 1000 + i)
        kinds = [k for k in self.kinds if k.name not in self.excluded and k.weight > 0]
        cum, acc = [], 0.0
        for k in kinds:
            acc += k.weight
            cum.append(acc)
        fallback = next((k for k in kinds if k.name == "classify_jpeg"), None) or next(k for k in kinds if k.valid)
        conn = Conn()
        try:
            while not self.stop.is_set():
                await self.gate.wait()
                if self.stop.is_set():
                    break
                kind = rng.choices(kinds, cum_weights=cum)[0]
                if kind.mode == "stall":
                    if len(self.stall_tasks) < self.stall_limit:
                        task = asyncio.create_task(self.do_stall(kind, rng))
                        self.stall_tasks.add(task)
                        task.add_done_callback(self.stall_tasks.discard)
                        continue
                    kind = fallback
                self.in_flight += 1
                try:
                    if kind.valid:
                        await self.do_valid(conn, kind, rng)
                    elif kind.mode == "cancel":
                        await self.do_cancel(kind, rng)
                    else:
                        await self.do_hostile(kind, rng)
                finally:
                    self.in_flight -= 1
        finally:
            conn.drop()

    async def settle(self, label):
        """Pauses new requests, waits for those in flight, then for 3 s of quiet; records RSS."""
        self.gate.clear()
        until = time.monotonic() + VALID_TIMEOUT_S
        while self.in_flight > 0 and time.monotonic() < until and not self.stop.is_set():
            await asyncio.sleep(0.2)
        await asyncio.sleep(3.0)
        rss = proc_status(self.server.pid, "VmRSS") if self.server.alive() else None
        if rss is not None:
            self.settled[label] = (self.now(), rss)
            log(f"settled RSS ({label}: requests paused and answered, 3 s quiet): {rss:.0f} MB")
        self.gate.set()

    async def settle_after(self, seconds):
        await asyncio.sleep(max(0.0, self.t0 + seconds - time.monotonic()))
        await self.settle("warm-up")

    # -- measurements

    def sample(self):
        pid = self.server.pid
        rss = proc_status(pid, "VmRSS")
        fds, tcp, other = fd_info(pid)
        return rss, fds, tcp, other

    async def sampler(self):
        while True:
            if not self.server.alive():
                if self.server_death is None:
                    code = self.server.proc.returncode
                    why = self.server.kill_reason or (f"killed by signal {-code}" if code < 0 else f"exited with code {code}")
                    self.server_death = f"the server died {self.now() / 60:.1f} min into the traffic: {why}"
                    log(f"!! {self.server_death}")
                    for line in self.server.log_tail(8):
                        log(f"   log: {excerpt(line, 300)}")
                self.stop.set()
                return
            rss, fds, tcp, other = self.sample()
            if rss is not None and fds is not None:
                self.samples.append((self.now(), rss, fds, tcp, other))
            await asyncio.sleep(1.0)

    def minute_line(self, label):
        st = self.stats
        s = self.samples[-1] if self.samples else None
        lat = st.lat_minute
        recent = [x[1] for x in self.samples if x[0] > self.now() - 60]
        mem = (f"RSS {s[1]:.0f} MB (minute {min(recent):.0f}-{max(recent):.0f}) | fds {s[2]} ({describe_tcp(s[3], s[4])})"
               if s else "RSS - | fds -")
        line = (f"[{label}] minute: {fmt_counts(st.minute)} | total: {fmt_counts(st.total)} | "
                f"/classify p50 {fmt_s(pct(lat, 0.5))} p99 {fmt_s(pct(lat, 0.99))} (n={len(lat)}) | {mem} | "
                f"stalled open {len(self.stall_tasks)} | failures {sum(st.failures.values())}")
        st.minute.clear()
        st.lat_minute = []
        self.minute_lines.append(line)
        log(line)

    async def reporter(self):
        k = 1
        while True:
            await asyncio.sleep(max(0.0, self.t0 + 60 * k - time.monotonic()))
            self.minute_line(f"{k:4.1f} min")
            k += 1

    # -- phases

    async def start_server(self):
        t = time.monotonic()
        self.server.start()
        log(f"server: starting {os.path.relpath(self.server.binary, ROOT)} (pid {self.server.pid}), log {os.path.relpath(self.server.log_path, ROOT)}")
        if not await self.server.wait_listening(READY_TIMEOUT_S):
            tail = "\n".join("   " + line for line in self.server.log_tail(20))
            die(f"the server did not start listening (exit {self.server.proc.poll()}):\n{tail}", 1)
        grpc = next((line.rsplit(" ", 1)[-1] for line in self.server.lines if "grpc listening" in line), None)
        log(f"server: http on {HOST}:{self.server.port}" + (f", grpc on {grpc}" if grpc else ""))
        end = time.monotonic() + READY_TIMEOUT_S
        k = Kind("readyz", 0, "valid", "GET /readyz", (), [request("GET", "/readyz", close=True)])
        while time.monotonic() < end:
            if not self.server.alive():
                tail = "\n".join("   " + line for line in self.server.log_tail(20))
                die(f"the server exited before /readyz turned 200:\n{tail}", 1)
            try:
                r, w = await asyncio.wait_for(self.connect(), 5)
                try:
                    w.write(k.payloads[0])
                    await w.drain()
                    resp = await asyncio.wait_for(read_response(r), 5)
                finally:
                    w.close()
                if resp.status == 200:
                    log(f"server: ready in {time.monotonic() - t:.1f} s")
                    return
            except (OSError, asyncio.IncompleteReadError, NotHttp, TimeoutError):
                pass
            await asyncio.sleep(0.5)
        die(f"/readyz did not turn 200 within {READY_TIMEOUT_S:.0f} s", 1)

    async def baseline(self):
        await asyncio.sleep(1.5)  # let the server close the readiness-check connections
        fds, rss = [], []
        for _ in range(4):
            r, f, _, _ = self.sample()
            fds.append(f)
            rss.append(r)
            await asyncio.sleep(0.3)
        self.fd_start, self.rss_start = min(fds), rss[-1]
        _, _, tcp, other = self.sample()
        log(f"baseline: RSS {self.rss_start:.0f} MB, {self.fd_start} open descriptors ({describe_tcp(tcp, other)})")

    async def run_preflight(self):
        log("preflight: each hostile request once, alone (guard kills the server over "
            f"{self.guard.cap_mb:.0f} MB RSS):")
        rng = random.Random(self.args.seed)
        # Valid requests first (both models work), then the hostile ones, cheapest first.
        order = [k for k in self.kinds if k.valid and k.name in ("classify_jpeg", "detect_jpeg")]
        order += [k for k in self.kinds if not k.valid and k.preflight and k.name not in self.excluded]
        for kind in order:
            before = len(self.stats.failures)
            t = time.monotonic()
            status, code = await (self.do_valid(Conn(), kind, rng) if kind.valid
                                  else self.do_hostile(kind, rng, timeout=PREFLIGHT_TIMEOUT_S))
            dt = time.monotonic() - t
            await asyncio.sleep(0.2)
            outcome = status + (f" {code}" if code else "")
            note = ""
            if not self.server.alive():
                code_ = self.server.proc.wait()
                why = self.server.kill_reason or (f"killed by signal {-code_}" if code_ < 0 else f"exited with code {code_}")
                note = f"SERVER DIED: {why}"
                self.stats.failures[f"preflight: {kind.name} killed the server"] += 1
                self.stats.failure_example[f"preflight: {kind.name} killed the server"] = f"{kind.desc}: {why}"
                self.excluded[kind.name] = f"killed the server in the preflight ({why})"
            elif len(self.stats.failures) > before:
                note = "failure"
            expected = any(outcome.startswith(e) for e in kind.expect)
            rss = proc_status(self.server.pid, "VmRSS") if self.server.alive() else None
            self.preflight.append((kind, outcome, dt, rss, note, expected))
            log(f"  {kind.name:22s} -> {outcome:34s} {fmt_s(dt):>9s}  RSS {f'{rss:.0f} MB' if rss else '-':>8s}"
                f"  {'(as planned)' if expected else '(planned: ' + ' or '.join(kind.expect) + ')'}"
                + (f"  !! {note}" if note else ""))
            if note.startswith("SERVER DIED"):
                for line in self.server.log_tail(6):
                    log(f"     log: {excerpt(line, 300)}")
                log("  restarting the server; this request is left out of the soak")
                await self.start_server()
                await self.baseline()
        # Preflight answers are not part of the soak's counts (its failures are).
        failures, examples = self.stats.failures, self.stats.failure_example
        self.stats = Stats()
        self.stats.failures, self.stats.failure_example = failures, examples

    async def traffic(self, seconds, warm_s):
        self.t0 = time.monotonic()
        self.gate = asyncio.Event()
        self.gate.set()
        settler = asyncio.create_task(self.settle_after(warm_s))
        self.guard.track = True
        sampler = asyncio.create_task(self.sampler())
        reporter = asyncio.create_task(self.reporter())
        clients = [asyncio.create_task(self.client(i)) for i in range(self.args.clients)]
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except TimeoutError:
            pass
        self.stop.set()
        self.t_end = self.now()
        log(f"traffic: stopped at {self.t_end / 60:.2f} min; waiting up to {END_DRAIN_S:.0f} s for requests in flight")
        done, pending = await asyncio.wait(clients, timeout=2.0 if self.interrupted else END_DRAIN_S)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for t in done:
            if t.exception():
                raise t.exception()
        if pending:
            log(f"traffic: {len(pending)} requests abandoned after {END_DRAIN_S:.0f} s")
        settler.cancel()
        await asyncio.gather(settler, return_exceptions=True)
        self.gate.set()
        if not self.interrupted:
            await self.settle("end")
        self.minute_line(f"{self.now() / 60:4.1f} min, end")
        reporter.cancel()
        self.guard.track = False
        return sampler

    async def bursts(self):
        """After the traffic: a burst of large images, then both models saturated at once."""
        big = encode(Image.new("RGB", (7500, 6000), (120, 110, 100)), "PNG")
        post = request("POST", "/detect", [("Content-Type", "image/png")], big, close=True)
        burst = Kind("burst_45mp", 0, "valid", f"POST /detect, 7500×6000 PNG ({len(big)} B), {BURST_CLIENTS} at once",
                     ("200", "503 overloaded"), [post], [post])
        self.kinds.append(burst)
        await asyncio.sleep(3.0)
        pid = self.server.pid
        before = proc_status(pid, "VmRSS")
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        t = time.monotonic()
        rng = random.Random(self.args.seed)
        answers = await asyncio.gather(*(self.do_valid(Conn(), burst, rng) for _ in range(BURST_CLIENTS)))
        peak = proc_status(pid, "VmHWM")
        self.burst = (before, peak, collections.Counter(f"{s} {c}" if c else s for s, c in answers), time.monotonic() - t)
        log(f"burst: {BURST_CLIENTS} × 45 MP to /detect in {self.burst[3]:.0f} s: {dict(self.burst[2])}; "
            f"RSS {before:.0f} MB before, peak {peak:.0f} MB (+{peak - before:.0f}, bound +{BURST_BOUND_MB:.0f})")
        detect, classify = (next(k for k in self.kinds if k.name == n) for n in ("detect_jpeg", "classify_jpeg"))
        until = time.monotonic() + SATURATION_S
        answered = collections.Counter()

        async def loop(kind, i):
            conn, r = Conn(), random.Random(self.args.seed + i)
            try:
                while time.monotonic() < until and self.server.alive():
                    status, _ = await self.do_valid(conn, kind, r)
                    answered[(kind.name, status)] += 1
            finally:
                conn.drop()
        half = max(1, self.args.clients // 2)
        await asyncio.gather(*(loop(detect if i < half else classify, i) for i in range(2 * half)))
        self.saturation = answered
        log("saturation: both models for " + f"{SATURATION_S:.0f} s: "
            + ", ".join(f"{k} {s} ×{n}" for (k, s), n in sorted(answered.items())))
        await self.settle("after the bursts")

    async def end_probe(self, kind, i):
        """A stalled connection opened as the traffic stops and held, with no client cap, until
        the server acts or the descriptor wait ends."""
        t0 = time.monotonic()
        conn = Conn()
        how = "connect error"
        try:
            conn.rw = await asyncio.wait_for(self.connect(), 10)
            payload = kind.payloads[0]
            if payload:
                conn.rw[1].write(payload)
                await conn.rw[1].drain()
            resp = await read_response(conn.rw[0])
            code, _ = error_code(resp, kind)
            how = f"answered {resp.status}{' ' + code if code else ''}"
        except asyncio.IncompleteReadError as e:
            how = "closed, no answer" if not e.partial else "truncated answer"
        except NotHttp:
            how = "not HTTP"
        except asyncio.CancelledError:
            how = f"still open after {FD_WAIT_S:.0f} s"
            raise
        except (ConnectionError, OSError):
            how = "reset"
        finally:
            self.end_probes.append((kind, how, time.monotonic() - t0))
            conn.drop()

    async def wait_descriptors(self, sampler):
        """After the traffic: opens END_PROBES of each stalled-connection kind and holds them;
        the stalled connections of the traffic stay as they are (under their cap). Waits, up to
        FD_WAIT_S, for the server's timeouts to close everything and its descriptor count to come
        back to the start; then closes what is left itself and counts again."""
        t = time.monotonic()
        self.fd_end = self.fd_end_tcp = None
        self.end_probes = []
        probes = set()
        if self.server.alive() and not self.interrupted:
            for kind in (k for k in self.kinds if k.mode == "stall" and k.name not in self.excluded):
                probes |= {asyncio.create_task(self.end_probe(kind, i)) for i in range(END_PROBES)}
            await asyncio.sleep(1.0)
            log(f"descriptors: traffic over; {len(probes)} stalled connections opened and held "
                f"({END_PROBES} of each kind); waiting up to {FD_WAIT_S:.0f} s for the server to close them")
        while self.server.alive() and not self.interrupted:
            _, fds, tcp, other = self.sample()
            self.fd_end, self.fd_end_tcp = fds, describe_tcp(tcp, other)
            if fds is not None and fds <= self.fd_start + FD_SLACK and not self.stall_tasks and all(p.done() for p in probes):
                break
            if time.monotonic() - t > FD_WAIT_S:
                break
            await asyncio.sleep(1.0)
        self.fd_wait = time.monotonic() - t
        left = len(self.stall_tasks) + sum(1 for p in probes if not p.done())
        for task in list(self.stall_tasks) + list(probes):
            task.cancel()
        await asyncio.gather(*self.stall_tasks, *probes, return_exceptions=True)
        self.fd_after_close = None
        if left and self.server.alive():
            await asyncio.sleep(2.0)
            _, fds, tcp, other = self.sample()
            self.fd_after_close = (fds, describe_tcp(tcp, other), left)
        sampler.cancel()
        if self.fd_end is None:
            log("descriptors: not measured (" + ("interrupted" if self.interrupted else "the server is gone") + ")")
            return
        log(f"descriptors: {self.fd_end} after {self.fd_wait:.0f} s ({self.fd_end_tcp}); start {self.fd_start}"
            + (f"; {left} stalled connections still open then; once the client closed them: {self.fd_after_close[0]}"
               if self.fd_after_close else ""))


# ----------------------------------------------------------------------------------------------
# Summary


def median(xs):
    s = sorted(xs)
    return s[len(s) // 2] if s else None


def summarize(soak, args, shutdown, warm_s, duration_s):
    st = soak.stats
    out = []
    t_end = getattr(soak, "t_end", soak.now())
    win = min(30.0, max(5.0, warm_s / 2))
    samples = soak.samples
    reached = t_end > warm_s + win
    warm_rss = median([s[1] for s in samples if warm_s - win <= s[0] <= warm_s]) if reached else None
    end_rss = median([s[1] for s in samples if t_end - win <= s[0] <= t_end])
    warm_pt = next((s[1] for s in samples if s[0] >= warm_s), None)
    end_pt = next((s[1] for s in reversed(samples) if s[0] <= t_end), None)
    max_rss = max(soak.guard.max_mb, max((s[1] for s in samples), default=0.0))
    lat = [x for t, x in st.lat if t >= warm_s] or [x for _, x in st.lat]
    fd_max = max((s[2] for s in samples), default=None)

    criteria = []
    full_run = t_end >= duration_s - 2 and not soak.interrupted
    nfail = sum(st.failures.values())
    criteria.append((nfail == 0, f"no failures ({nfail} counted)"))
    under_load = (f"; under load, medians of {win:.0f} s: {warm_rss:.0f} MB at {warm_s / 60:.1f} min → {end_rss:.0f} MB "
                  f"at the end ({(end_rss / warm_rss - 1) * 100:+.1f}%)" if warm_rss and end_rss else "")
    if "warm-up" in soak.settled and "end" in soak.settled:
        (tw, sw), (te, se) = soak.settled["warm-up"], soak.settled["end"]
        growth = se / sw - 1
        criteria.append((growth < RSS_GROWTH_LIMIT,
                         f"settled RSS growth after warm-up {growth * 100:+.1f}% ({sw:.0f} MB at {tw / 60:.1f} min → "
                         f"{se:.0f} MB at the end), limit +{RSS_GROWTH_LIMIT * 100:.0f}%{under_load}"
                         + ("; a short run: RSS may still be levelling off after a warm-up this short" if warm_s < 120 else "")))
    else:
        criteria.append((False, "RSS growth: not measurable (the traffic stopped before the end of the warm-up)"))
    fd_ok = soak.fd_end is not None and soak.fd_end <= soak.fd_start + FD_SLACK
    if soak.fd_end is None:
        criteria.append((False, "descriptors back to start: not measured (interrupted, or the server is gone)"))
    else:
        held = collections.Counter(k.name for k, how, _ in soak.end_probes if how.startswith("still open"))
        text = (f"descriptors back to start: {soak.fd_start} at start, {soak.fd_end} {soak.fd_wait:.0f} s after the traffic "
                f"stopped (allowed {soak.fd_start + FD_SLACK}; {len(soak.end_probes)} stalled connections opened at the stop")
        text += (f", of which the server never closed {', '.join(f'{k} ×{n}' for k, n in held.items())}" if held else ", all closed by the server")
        if soak.fd_after_close:
            text += f"; {soak.fd_after_close[0]} once the client closed its {soak.fd_after_close[2]} left"
        criteria.append((fd_ok, text + ")"))
    burst = getattr(soak, "burst", None)
    if burst:
        before, peak, statuses, secs = burst
        fine = all(k in ("200", "503 overloaded") for k in statuses)
        criteria.append((fine and peak - before <= BURST_BOUND_MB,
                         f"burst of {BURST_CLIENTS} × 45 MP: {', '.join(f'{k} ×{n}' for k, n in statuses.most_common())} "
                         f"in {secs:.0f} s; peak RSS +{peak - before:.0f} MB above {before:.0f} MB (bound +{BURST_BOUND_MB:.0f})"))
        sat = soak.saturation
        per = {m: sat[(m, "200")] for m in ("detect_jpeg", "classify_jpeg")}
        bad = {k: n for k, n in sat.items() if k[1] not in ("200", "503")}
        criteria.append((all(per.values()) and not bad,
                         f"both models saturated for {SATURATION_S:.0f} s: /detect {per['detect_jpeg']} answered, "
                         f"/classify {per['classify_jpeg']}" + (f"; other answers {bad}" if bad else "")))
        if "end" in soak.settled and "after the bursts" in soak.settled:
            se, sb = soak.settled["end"][1], soak.settled["after the bursts"][1]
            criteria.append((sb / se - 1 < RSS_GROWTH_LIMIT,
                             f"settled RSS after the bursts {sb:.0f} MB, at the end of the traffic {se:.0f} MB "
                             f"({(sb / se - 1) * 100:+.1f}%, limit +{RSS_GROWTH_LIMIT * 100:.0f}%)"))
    elif not soak.interrupted:
        criteria.append((False, "bursts: not run (the server was gone)"))
    alive = soak.server_death is None and shutdown is not None and shutdown[3]
    criteria.append((alive, "server alive at the end" if alive else f"server alive at the end: no — {soak.server_death or 'dead before the end'}"))
    if not full_run:
        criteria.append((False, f"ran the full duration: stopped at {t_end / 60:.1f} of {duration_s / 60:.1f} min"
                         + (" (interrupted)" if soak.interrupted else "")))
    ok = all(c for c, _ in criteria)

    out.append(f"## detectd soak: {'PASS' if ok else 'FAIL'}\n")
    for c, text in criteria:
        out.append(f"- {'✓' if c else '✗'} {text}")
    if soak.excluded:
        for k, why in soak.excluded.items():
            out.append(f"- left out of the soak: `{k}`: {why}")
    out.append("")
    out.append(f"Soak of `detectd serve` on {cpu_model()}: {t_end / 60:.1f} min of traffic from {args.clients} clients "
               f"on 127.0.0.1, warm-up {warm_s / 60:.1f} min, seed {args.seed}"
               + (f", server flags `{' '.join(args.server_flags)}`" if args.server_flags else "") + ".\n")
    sec = lambda x: fmt_s(x)  # noqa: E731
    out.append("| measure | value |\n|---|---|")
    out.append(f"| result | {'PASS' if ok else 'FAIL'} |")
    out.append(f"| duration, clients | {t_end / 60:.1f} min, {args.clients} |")
    out.append(f"| CPU | {cpu_model()} |")
    out.append(f"| requests | {sum(st.sent.values())} ({st.sent['valid']} valid, {st.sent['hostile']} hostile) |")
    out.append(f"| /classify p50 / p99 (200s{' after warm-up' if any(t >= warm_s for t, _ in st.lat) else ''}) | "
               f"{sec(pct(lat, 0.5))} / {sec(pct(lat, 0.99))} (n={len(lat)}) |")
    mb = lambda x: f"{x:.0f}" if x else "-"  # noqa: E731
    out.append(f"| RSS start / after warm-up / end / max, under load | {mb(soak.rss_start)} / {mb(warm_rss)} / {mb(end_rss)} / {mb(max_rss)} MB "
               f"(instant: {mb(warm_pt)} / {mb(end_pt)}) |")
    settled = [soak.settled.get(k, (None, None))[1] for k in ("warm-up", "end")]
    out.append(f"| RSS settled after warm-up / at the end | {mb(settled[0])} / {mb(settled[1])} MB |")
    out.append(f"| fds start / end / max | {soak.fd_start} / {soak.fd_end} / {fd_max} |")
    out.append(f"| failures | {nfail} |")
    if shutdown:
        code, secs, killed, _ = shutdown
        out.append(f"| shutdown (SIGTERM) | {'killed after ' + f'{secs:.0f} s' if killed else f'exit {code} in {secs:.1f} s'} |")
    out.append("")

    out.append("Answers by status and code:\n")
    out.append("| status | code | count |\n|---|---|---|")
    def order(k):
        s, c = k
        return (0, int(s), c) if s.isdigit() else (1, s, c)
    for (s, c) in sorted(st.by_code, key=order):
        out.append(f"| {s} | {c or ''} | {st.by_code[(s, c)]} |")
    if st.retry_after:
        out.append("\nRetry-After: " + ", ".join(f"{s} {'with' if has else 'without'} it ×{n}"
                                                for (s, has), n in sorted(st.retry_after.items())) + ".")
    out.append("")

    out.append("By request:\n")
    out.append("| request | kind | sent | answers | as planned |\n|---|---|---|---|---|")
    for k in soak.kinds:
        c = st.by_kind.get(k.name)
        if not c and k.name not in soak.excluded:
            continue
        n = sum(c.values()) if c else 0
        answers = ", ".join(f"{o} ×{v}" for o, v in c.most_common()) if c else "(left out)"
        planned = sum(v for o, v in c.items() if any(o.startswith(e) for e in k.expect + ("abandoned at end", "open at end of run"))) if c else 0
        mark = "✓" if c and planned == n else (f"{planned}/{n}; planned {' or '.join(k.expect)}" if c else "-")
        out.append(f"| {k.desc} | {k.mode} | {n} | {answers} | {mark} |")
    out.append("")

    if st.stall:
        out.append("Stalled connections (held until the server acted, client cap "
                   f"{args.stall_cap_s:.0f} s):\n")
        out.append("| connection | n | what happened | seconds (min / median / max) |\n|---|---|---|---|")
        for k in soak.kinds:
            rows = st.stall.get(k.name)
            if not rows:
                continue
            by = collections.defaultdict(list)
            for how, s in rows:
                by[how].append(s)
            for how, ss in sorted(by.items()):
                out.append(f"| {k.desc} | {len(ss)} | {how} | {min(ss):.1f} / {median(ss):.1f} / {max(ss):.1f} |")
        by = collections.defaultdict(list)
        for k, how, secs in getattr(soak, "end_probes", []):
            by[(k.desc, how)].append(secs)
        for (desc, how), ss in by.items():
            out.append(f"| at the stop, no client cap: {desc} | {len(ss)} | {how} | {min(ss):.1f} / {median(ss):.1f} / {max(ss):.1f} |")
        out.append("")

    if soak.preflight:
        out.append("Preflight (each request alone, before the soak):\n")
        out.append("| request | answer | time | RSS after | as planned |\n|---|---|---|---|---|")
        for kind, outcome, dt, rss, note, expected in soak.preflight:
            out.append(f"| {kind.desc} | {outcome}{' — ' + note if note else ''} | {fmt_s(dt)} | {mb(rss)} MB | "
                       f"{'✓' if expected else 'planned ' + ' or '.join(kind.expect)} |")
        out.append("")

    if st.failures:
        out.append("Failures (count, first example):\n")
        for f, n in st.failures.most_common():
            out.append(f"- {f}: {n} — {st.failure_example.get(f, '')}")
        out.append("")

    findings = []
    for k in soak.kinds:
        c = st.by_kind.get(k.name)
        if not c or k.valid:
            continue
        off = {o: v for o, v in c.items() if not any(o.startswith(e) for e in k.expect + ("abandoned at end", "open at end of run"))}
        if off:
            findings.append(f"`{k.name}` ({k.desc}): {', '.join(f'{o} ×{v}' for o, v in off.items())}; planned {' or '.join(k.expect)}")
    missing = {s_: n for (s_, has), n in st.retry_after.items() if not has}
    if missing:
        findings.append("answers without Retry-After: " + ", ".join(f"{s_} ×{n}" for s_, n in sorted(missing.items())))
    if soak.fd_after_close:
        fds, tcp, left = soak.fd_after_close
        findings.append(f"{left} stalled connections were still open {soak.fd_wait:.0f} s after the traffic stopped; "
                        f"after the client closed them the server had {fds} descriptors ({tcp})")
    held = collections.Counter(k.name for k, how, _ in getattr(soak, "end_probes", []) if how.startswith("still open"))
    if held:
        findings.append("stalled connections the server never closed in the end wait: "
                        + ", ".join(f"`{k}` ×{n}" for k, n in held.items()))
    if findings:
        out.append("Findings (not criteria):\n")
        out += [f"- {f}" for f in findings]
        out.append("")

    levels, examples = soak.server.log_problems()
    if levels:
        out.append(f"Server log ({os.path.relpath(soak.server.log_path, ROOT)}): "
                   + ", ".join(f"{v} {k}" for k, v in levels.items()) + "; first ones:\n")
        out += [f"    {excerpt(line, 300)}" for line in examples]
        out.append("")

    out.append("Per minute:\n")
    out += ["    " + line for line in soak.minute_lines]
    return ok, "\n".join(out)


# ----------------------------------------------------------------------------------------------
# Main


def ensure_weights():
    os.makedirs(OUT, exist_ok=True)
    det, cls = os.path.join(OUT, "det_v1_seed7.pth"), os.path.join(OUT, "cls_seed3.pth")
    py = os.path.join(ROOT, ".venv", "bin", "python")
    py = py if os.path.exists(py) else sys.executable
    for path, args in ((cls, ["make-classifier", "--seed", "3"]),
                       (det, ["make-detector", "--arch", "v1", "--seed", "7", "--frozen-eps", "0.0"])):
        if os.path.exists(path):
            continue
        log(f"weights: making {os.path.relpath(path, ROOT)} (seeded random, no download)")
        tmp = path + ".tmp"
        r = subprocess.run([py, TVREF, *args, "--weights", tmp], capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            die(f"tvref.py {args[0]} failed:\n{r.stderr[-3000:]}")
        os.replace(tmp, path)
    return det, cls


def split_server_flags(argv):
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def flag_value(flags, name):
    for i, f in enumerate(flags):
        if f == name and i + 1 < len(flags):
            return flags[i + 1]
        if f.startswith(name + "="):
            return f.split("=", 1)[1]
    return None


def main():
    own, server_flags = split_server_flags(sys.argv[1:])
    p = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.split("\n\n")[0],
                                epilog="Flags after `--` go to `detectd serve` (not --listen/--grpc-addr: loopback only).")
    p.add_argument("--minutes", type=float, default=20.0, help="traffic duration (default 20)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "detectd"))
    p.add_argument("--report", help="also write the markdown summary to this file")
    p.add_argument("--seed", type=int, default=None, help="traffic seed (default: from the clock)")
    p.add_argument("--stall-cap-s", type=float, default=45.0,
                   help="how long a stalled connection is held waiting for the server to act (default 45)")
    p.add_argument("--rss-cap-mb", type=float, default=None,
                   help="kill the server above this RSS (default: min(4096, 40%% of MemAvailable); the server peaks near 2 GB)")
    p.add_argument("--exclude", default="", help="request kinds to leave out, comma-separated (see --list-kinds)")
    p.add_argument("--no-preflight", action="store_true", help="skip sending each hostile request once alone first")
    p.add_argument("--list-kinds", action="store_true", help="list the request kinds and their weights, then exit")
    args = p.parse_args(own)
    args.server_flags = server_flags
    if args.seed is None:
        args.seed = int(time.time()) % 100000
    if args.minutes <= 0 or args.clients < 1:
        die("--minutes must be > 0 and --clients >= 1")
    for f in server_flags:
        if f.split("=", 1)[0] in FIXED_FLAGS:
            die(f"{f.split('=', 1)[0]} is set by the soak (127.0.0.1 only); leave it out")
    max_body = int(flag_value(server_flags, "--max-body-bytes") or os.environ.get("DETECTD_MAX_BODY_BYTES") or 32 * 1024 * 1024)
    kinds = build_kinds(max_body)
    if args.list_kinds:
        for k in kinds:
            print(f"{k.name:22s} {k.mode:8s} {k.weight:5.1f}%  {k.desc}  (planned: {' or '.join(k.expect)})")
        return 0
    unknown = [e for e in args.exclude.split(",") if e and e not in {k.name for k in kinds}]
    if unknown:
        die(f"unknown kinds in --exclude: {', '.join(unknown)} (see --list-kinds)")
    binary = os.path.abspath(args.binary)
    if not os.access(binary, os.X_OK):
        die(f"no executable at {binary}: build first: cargo build --release")

    det, cls = ensure_weights()
    flags = ["serve", "--listen", f"{HOST}:0", "--grpc-addr", f"{HOST}:0"]
    for name, value in (("--detector-weights", det), ("--classifier-weights", cls), ("--warmup-images", "1")):
        if flag_value(server_flags, name) is None:
            flags += [name, value]
    flags += server_flags
    server = Server(binary, flags, os.path.join(OUT, "server.log"))
    if os.path.exists(server.log_path):
        os.replace(server.log_path, server.log_path + ".prev")
    cap = args.rss_cap_mb or min(4096.0, 0.4 * mem_available_mb())
    guard = RssGuard(server, cap)
    duration = args.minutes * 60
    # The heap settles over the first few dozen detector passes (their RoI counts differ):
    # measured settled RSS 474 -> 521 -> 538 -> 545 -> 542 -> 544 -> 547 MB every 250 mixed
    # requests (10 detects each), so the warm-up covers that before growth is judged.
    warm = min(300.0, 0.25 * duration)
    soak = None
    try:
        soak = Soak(args, server, kinds, guard)
        for e in filter(None, args.exclude.split(",")):
            soak.excluded[e] = "--exclude"
        ok, text = asyncio.run(run(soak, args, duration, warm))
    finally:
        if server.alive():
            server.stop(timeout=10)
    print()
    print(text, flush=True)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text + "\n")
        log(f"\nreport written to {args.report}")
    if soak.interrupted:
        return 130
    return 0 if ok else 1


async def run(soak, args, duration, warm):
    loop = asyncio.get_running_loop()
    signals = {"n": 0}

    def on_signal():
        signals["n"] += 1
        soak.interrupted = True
        soak.stop.set()
        if signals["n"] > 1:
            soak.server.proc and soak.server.proc.kill()
            os._exit(130)
        log("!! interrupted: stopping (again to quit at once)")

    for s in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(s, on_signal)
    soak.guard.start()
    log(f"soak: {args.minutes:g} min, {args.clients} clients, seed {args.seed}, warm-up {warm / 60:.1f} min, "
        f"RSS guard {soak.guard.cap_mb:.0f} MB")
    await soak.start_server()
    await soak.baseline()
    if not args.no_preflight and not soak.interrupted:
        await soak.run_preflight()
    if soak.interrupted:
        die("interrupted before the traffic", 130)
    log(f"traffic: {args.minutes:g} min from {args.clients} clients (stalled connections held in the background, "
        f"at most {soak.stall_limit} at a time)")
    sampler = await soak.traffic(duration, warm)
    if soak.server.alive() and not soak.interrupted:
        await soak.bursts()
    await soak.wait_descriptors(sampler)
    shutdown = None
    if soak.server.alive():
        code, secs, killed = soak.server.stop()
        shutdown = (code, secs, killed, True)
        log(f"server: {'killed after' if killed else f'exited {code} in'} {secs:.1f} s after SIGTERM")
    return summarize(soak, args, shutdown, warm, duration)


if __name__ == "__main__":
    sys.exit(main())
