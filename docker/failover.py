#!/usr/bin/env python3
"""Helpers of docker/failover-test.sh (standard library only):

  failover.py load ...        a fixed number of image requests through the load balancer,
                              several at a time, with signals sent to replicas at given
                              points of progress; counts what the clients saw
  failover.py nginx-log ...   from nginx's access log: which requests were retried on another
                              replica, and after what
  failover.py prometheus ...  asks the Prometheus HTTP API whether every replica was scraped,
                              and runs every query of the Grafana dashboard on the data

load counts what a client sees. A request fails when the load balancer's answer is anything but a
200 carrying one result (any other status, a body that is not the expected JSON, or a
transport error such as a reset connection or a timeout). The client never retries: hiding
the replicas' failures is the load balancer's job, and this measures whether it does.

  failover.py load --url http://127.0.0.1:PORT --requests 300 --concurrency 8 \
      --classify a.png --classify b.png --detect skinny.png --detect-every 20 \
      --signal 0.25:KILL:PID --signal 0.5:TERM:PID --out result.json

Each prints a short report and exits 1 when its check fails.
"""

import argparse
import http.client
import json
import os
import re
import signal
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor


def cmd_load(argv):
    ap = argparse.ArgumentParser(prog="failover.py load")
    ap.add_argument("--url", required=True)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--classify", action="append", default=[], help="PNG for /classify (repeat)")
    ap.add_argument("--detect", action="append", default=[], help="PNG for /detect (repeat)")
    ap.add_argument("--detect-every", type=int, default=20, help="every Nth request is a /detect")
    ap.add_argument("--signal", action="append", default=[],
                    help="FRACTION:SIGNAME:PID: send the signal once that fraction of requests is done")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    url = urllib.parse.urlsplit(a.url)
    bodies = {p: open(p, "rb").read() for p in a.classify + a.detect}
    plan = []
    for i in range(a.requests):
        if a.detect and a.detect_every and i % a.detect_every == a.detect_every // 2:
            plan.append(("/detect", a.detect[i % len(a.detect)]))
        else:
            plan.append(("/classify", a.classify[i % len(a.classify)]))
    signals = sorted(
        (float(f), getattr(signal, "SIG" + s), int(pid))
        for f, s, pid in (spec.split(":") for spec in a.signal)
    )

    lock = threading.Lock()
    done = 0
    in_flight = 0
    outcomes = Counter()
    failures = []
    latencies = []
    sent_signals = []
    local = threading.local()

    def connection():
        if getattr(local, "conn", None) is None:
            local.conn = http.client.HTTPConnection(url.hostname, url.port, timeout=a.timeout)
        return local.conn

    def fire_due_signals():
        # Called with the lock held, after each completion.
        while signals and done >= signals[0][0] * a.requests:
            frac, sig, pid = signals.pop(0)
            try:
                os.kill(pid, sig)
                what = "sent"
            except ProcessLookupError:
                what = "process already gone"
            sent_signals.append({"after": done, "signal": signal.Signals(sig).name, "pid": pid,
                                 "in_flight": in_flight, "t": round(time.monotonic() - t0, 2), "result": what})
            print(f"failover: {signal.Signals(sig).name} -> pid {pid} after {done} requests "
                  f"({in_flight} in flight, t={time.monotonic() - t0:.1f}s)", flush=True)

    def one(i):
        nonlocal done, in_flight
        path, image = plan[i]
        with lock:
            in_flight += 1
        start = time.monotonic()
        outcome = None
        detail = ""
        try:
            conn = connection()
            conn.request("POST", path, body=bodies[image],
                         headers={"Content-Type": "image/png", "X-Request-Id": f"failover-{i}"})
            resp = conn.getresponse()
            body = resp.read()
            if resp.status == 200:
                try:
                    results = json.loads(body)["results"]
                    key = "detections" if path == "/detect" else "predictions"
                    outcome = "ok" if len(results) == 1 and key in results[0] else "bad body"
                except (ValueError, KeyError, TypeError):
                    outcome = "bad body"
            else:
                outcome = f"status {resp.status}"
            if outcome != "ok":
                detail = body[:200].decode("utf-8", "replace")
            if resp.will_close:
                conn.close()
                local.conn = None
        except (OSError, http.client.HTTPException) as e:
            outcome = f"transport {type(e).__name__}"
            detail = str(e)
            try:
                local.conn.close()
            except Exception:
                pass
            local.conn = None
        elapsed = time.monotonic() - start
        with lock:
            in_flight -= 1
            done += 1
            outcomes[outcome] += 1
            latencies.append(elapsed)
            if outcome != "ok":
                failures.append({"request": i, "path": path, "outcome": outcome, "detail": detail})
            fire_due_signals()

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=a.concurrency) as pool:
        list(pool.map(one, range(a.requests)))
    duration = time.monotonic() - t0

    latencies.sort()
    q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))]
    failed = sum(n for o, n in outcomes.items() if o != "ok")
    result = {
        "requests": done,
        "failed": failed,
        "outcomes": dict(outcomes),
        "failures": failures[:20],
        "signals": sent_signals,
        "duration_s": round(duration, 2),
        "latency_s": {"p50": round(q(0.5), 3), "p99": round(q(0.99), 3), "max": round(latencies[-1], 3)},
        "detect_requests": sum(1 for p, _ in plan if p == "/detect"),
    }
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"failover: {done} requests ({result['detect_requests']} /detect) in {duration:.1f}s, "
          f"{a.concurrency} at a time; outcomes {dict(outcomes)}; latency p50 {result['latency_s']['p50']}s "
          f"p99 {result['latency_s']['p99']}s", flush=True)
    for f in failures[:10]:
        print(f"failover: FAILED {f}", flush=True)
    return 0


def cmd_nginx_log(argv):
    """Reads the access log written with nginx/detectd.conf's `detectd` log_format."""
    ap = argparse.ArgumentParser(prog="failover.py nginx-log")
    ap.add_argument("log")
    ap.add_argument("--expect", type=int, required=True, help="model requests the client sent")
    a = ap.parse_args(argv)
    pat = re.compile(r'"POST (/detect|/classify)[^"]*" (\d{3}) .* upstream=(.*) upstream_status=(.*) urt=')
    total, retried, final = 0, Counter(), Counter()
    by_replica = Counter()
    for line in open(a.log):
        m = pat.search(line)
        if not m:
            continue
        total += 1
        final[m.group(2)] += 1
        upstreams = [u.strip() for u in m.group(3).split(",")]
        statuses = [s.strip() for s in m.group(4).split(",")]
        by_replica[upstreams[-1]] += 1
        if len(upstreams) > 1:
            # What the earlier attempts got: 502 = connection refused/reset (nginx's own code
            # for an upstream error), 503 = detectd loading or draining, 504 = upstream timeout.
            for s in statuses[:-1]:
                retried[s] += 1
    n_retried = sum(retried.values())
    print(f"failover: nginx logged {total} model requests ({dict(final)}); answered by "
          f"{dict(by_replica)}; {n_retried} attempts retried on another replica, by what the "
          f"failed attempt got: {dict(retried)} (502 = refused/reset, 503 = draining)")
    ok = True
    if total != a.expect:
        print(f"failover: FAILED nginx logged {total} model requests, the client sent {a.expect}")
        ok = False
    if n_retried == 0:
        # The signals hit nothing: the test proved nothing about failover.
        print("failover: FAILED no request was retried: the replicas' deaths were never seen by the load balancer")
        ok = False
    return 0 if ok else 1


def prom_get(base, path, params):
    with urllib.request.urlopen(f"{base}{path}?{urllib.parse.urlencode(params)}", timeout=30) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{path} {params}: {body}")
    return body["data"]["result"]


def cmd_prometheus(argv):
    ap = argparse.ArgumentParser(prog="failover.py prometheus")
    ap.add_argument("--url", required=True, help="Prometheus base URL")
    ap.add_argument("--alive", action="append", default=[], help="host:port of a replica still running")
    ap.add_argument("--dead", action="append", default=[], help="host:port of a replica that was stopped")
    ap.add_argument("--since", type=float, required=True, help="unix time the replicas started")
    ap.add_argument("--dashboard", required=True)
    a = ap.parse_args(argv)
    problems = []
    everyone = a.alive + a.dead

    # 1. Now: the live replicas are up, the stopped ones are seen as down. Wait a few scrapes.
    deadline = time.time() + 20
    while True:
        up = {r["metric"]["instance"]: r["value"][1] for r in prom_get(a.url, "/api/v1/query", {"query": 'up{job="detectd"}'})}
        want = {**{i: "1" for i in a.alive}, **{i: "0" for i in a.dead}}
        if up == want or time.time() > deadline:
            break
        time.sleep(1)
    if up != want:
        problems.append(f"up{{job=\"detectd\"}} is {up}, want {want}")

    # 2. Over the run: every replica was scraped, and while it served traffic.
    window = f"{int(time.time() - a.since) + 10}s"
    ever_up = {r["metric"]["instance"]: r["value"][1] for r in prom_get(
        a.url, "/api/v1/query", {"query": f'max_over_time(up{{job="detectd"}}[{window}])'})}
    served = {r["metric"]["instance"]: float(r["value"][1]) for r in prom_get(
        a.url, "/api/v1/query",
        {"query": f'max by (instance) (max_over_time(detectd_requests_total{{job="detectd", endpoint="/classify", status="200"}}[{window}]))'})}
    for inst in everyone:
        if ever_up.get(inst) != "1":
            problems.append(f"{inst} was never scraped successfully (max up = {ever_up.get(inst)})")
        if served.get(inst, 0) <= 0:
            problems.append(f"no scrape of {inst} shows a served /classify request")
    print(f"failover: prometheus scraped {sorted(ever_up)}; /classify 200s seen per replica (last scrape "
          f"before it stopped): { {k: int(v) for k, v in sorted(served.items())} }")

    # 3. The Grafana dashboard's queries return data from these series.
    dash = json.load(open(a.dashboard))
    n_queries = 0
    empty = []
    for panel in dash["panels"]:
        for t in panel["targets"]:
            expr = t["expr"].replace("$__rate_interval", "30s").replace("$instance", ".+")
            n_queries += 1
            try:
                res = prom_get(a.url, "/api/v1/query_range",
                               {"query": expr, "start": a.since, "end": time.time(), "step": "2s"})
            except Exception as e:  # a query Prometheus rejects
                problems.append(f"dashboard panel {panel['title']!r}: {e}")
                continue
            # Error responses may rightly be absent; everything else must have data.
            if not res and 'status!~' not in expr:
                empty.append(f"{panel['title']!r} {t['refId']}")
    if empty:
        problems.append(f"dashboard queries without data: {empty}")
    print(f"failover: {n_queries} dashboard queries ran on Prometheus, {n_queries - len(empty)} with data")
    for p in problems:
        print(f"failover: FAILED prometheus: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    commands = {"load": cmd_load, "nginx-log": cmd_nginx_log, "prometheus": cmd_prometheus}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(commands)}}} ...")
    sys.exit(commands[sys.argv[1]](sys.argv[2:]))
