"""Checks a running detectd container against the native binary (docker/image-test.sh).

  image_check.py detect  --served URL --native URL --image PNG   same detections from both
  image_check.py grpc    --addr HOST:PORT                         grpc.health.v1 says SERVING
  image_check.py stop    --served URL --image PNG --docker CLIENT --container NAME
        one /detect in flight, then `docker stop`: the request must answer 200 after the
        stop was sent, and the container must exit 0

Standard library and grpcio only. Prints one line per check; exits 1 on the first failure.
"""

import argparse
import json
import subprocess
import sys
import threading
import time
import urllib.request

BOX_TOL = 1e-3  # px: the same libtorch on the same CPU, threads may split sums differently
SCORE_TOL = 1e-4


def fail(msg):
    print(f"image-check: FAIL {msg}", file=sys.stderr)
    sys.exit(1)


def post_detect(base, png, timeout=300):
    req = urllib.request.Request(f"{base}/detect", data=png, headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read())


def cmd_detect(a):
    png = open(a.image, "rb").read()
    _, served = post_detect(a.served, png)
    _, native = post_detect(a.native, png)
    s, n = served["results"][0]["detections"], native["results"][0]["detections"]
    if len(s) != len(n) or not n:
        fail(f"/detect: container {len(s)} detections, native binary {len(n)}")
    box = max(abs(p - q) for ds, dn in zip(s, n) for p, q in zip(ds["box"], dn["box"]))
    score = max(abs(ds["score"] - dn["score"]) for ds, dn in zip(s, n))
    labels = sum(ds["label_id"] != dn["label_id"] for ds, dn in zip(s, n))
    if labels or box > BOX_TOL or score > SCORE_TOL:
        fail(f"/detect differs: {labels} labels, max box {box:.3g} px, max score {score:.3g}")
    print(f"image-check: /detect equal to the native binary's: {len(n)} of {len(n)} detections, "
          f"max box difference {box:.2g} px, max score difference {score:.2g}")


def cmd_grpc(a):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(a.addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "detectd.v1.Detector"):
            got = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            if got != health_pb2.HealthCheckResponse.SERVING:
                fail(f"gRPC health {service or '(server)'}: {health_pb2.HealthCheckResponse.ServingStatus.Name(got)}")
    print(f"image-check: gRPC health SERVING (server and detectd.v1.Detector) on {a.addr}")


def cmd_stop(a):
    png = open(a.image, "rb").read()
    # The stop goes out a third into a request, timed here, so that it lands mid-request on a
    # fast machine as on a slow one.
    t = time.monotonic()
    post_detect(a.served, png)
    delay = (time.monotonic() - t) / 3
    result = {}

    def request():
        try:
            result["status"], result["body"] = post_detect(a.served, png)
        except Exception as e:  # an HTTP error or a reset connection: recorded, judged below
            result["error"] = repr(e)
        result["done"] = time.monotonic()

    t = threading.Thread(target=request)
    t.start()
    time.sleep(delay)
    stop_sent = time.monotonic()
    stop = subprocess.run([a.docker, "stop", "-t", "60", a.container], capture_output=True, text=True)
    t.join(120)
    if "error" in result or "status" not in result:
        fail(f"request during docker stop: {result.get('error', 'no answer')}")
    if result["status"] != 200 or "detections" not in result["body"]["results"][0]:
        fail(f"request during docker stop answered {result['status']}")
    if result["done"] <= stop_sent:
        fail("the request finished before docker stop was sent: nothing was proven")
    if stop.returncode != 0:
        fail(f"docker stop: {stop.stderr.strip()}")
    code = subprocess.run([a.docker, "inspect", "-f", "{{.State.ExitCode}}", a.container],
                          capture_output=True, text=True, check=True).stdout.strip()
    if code != "0":
        fail(f"container exited {code} after docker stop")
    print(f"image-check: docker stop during a /detect: answered 200 "
          f"{result['done'] - stop_sent:.1f} s after the stop was sent, container exited 0")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("detect")
    s.add_argument("--served", required=True)
    s.add_argument("--native", required=True)
    s.add_argument("--image", required=True)
    s = sub.add_parser("grpc")
    s.add_argument("--addr", required=True)
    s = sub.add_parser("stop")
    s.add_argument("--served", required=True)
    s.add_argument("--image", required=True)
    s.add_argument("--docker", required=True)
    s.add_argument("--container", required=True)
    a = p.parse_args()
    globals()["cmd_" + a.cmd](a)


if __name__ == "__main__":
    main()
