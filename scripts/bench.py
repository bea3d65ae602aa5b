"""Side-by-side benchmark: torchvision eager fp32 against detectd, same machine, same run.

Runs, on the same seeded weights and synthetic images: torchvision (Python, same thread count),
`detectd bench` in-process for each precision, at the given batch sizes, for the detector at
800x1216 and the classifier at 224; the bf16-vs-fp32 agreement; then `detectd serve` under
concurrent load from wrk, with images/s, p50/p99 latency and peak RSS. Prints a markdown table.
Not a test: numbers depend on the machine.
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target/release/detectd")
TVREF = os.path.join(ROOT, "tests/support/tvref.py")
OUT = os.path.join(ROOT, "target/bench")


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout


def weights():
    """Seeded weights with BatchNorm statistics from data (tvref --calibrate), so activations
    stay in range as in trained networks: rounding in bf16 is then judged less unfairly than on
    raw random weights, which amplify it ~2x per stage."""
    os.makedirs(OUT, exist_ok=True)
    det, cls = os.path.join(OUT, "det_v1_calibrated.pth"), os.path.join(OUT, "cls_calibrated.pth")
    if not os.path.exists(det):
        sh(sys.executable, TVREF, "make-detector", "--arch", "v1", "--seed", "7", "--calibrate", "--weights", det)
    if not os.path.exists(cls):
        sh(sys.executable, TVREF, "make-classifier", "--seed", "3", "--calibrate", "--weights", cls)
    return det, cls


def cpu_field(name):
    info = open("/proc/cpuinfo").read()
    return (re.search(rf"^{name}\s*:\s*(.*)$", info, re.M) or [None, "?"])[1]


def cpu_has_bf16():
    """bf16 in hardware (AVX512-BF16 or AMX): elsewhere a bf16 setting is emulated or ignored."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_field("flags").split()))


def machine(threads):
    """The sentence every table starts with: date, CPU, the flags that matter, threads, versions."""
    flags = set(cpu_field("flags").split())
    wanted = [f for f in ("avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
              if f in flags]
    return (f"Measured {time.strftime('%Y-%m-%d')} on {cpu_field('model name')} (family {cpu_field('cpu family')}, "
            f"model {cpu_field('model')}; flags: {' '.join(wanted) or 'no AVX-512'}), {os.cpu_count()} cores, "
            f"{threads} threads, torch {torch.__version__}, torchvision {torchvision.__version__}.")


def time_calls(fn, iters):
    fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def torchvision_seconds(kind, path, batch, size, iters, threads):
    from tvref import build_detector  # noqa: E402 (tests/support on sys.path)
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, *size), generator=g, dtype=torch.uint8) for _ in range(batch)]
    if kind == "detector":
        model = build_detector("v1").eval()
        model.load_state_dict(torch.load(path))
        fn = lambda: model([i.float() / 255 for i in images])  # noqa: E731
    else:
        from torchvision.transforms._presets import ImageClassification
        model = torchvision.models.resnet50().eval()
        model.load_state_dict(torch.load(path))
        preset = ImageClassification(crop_size=224, resize_size=232)
        fn = lambda: model(torch.stack([preset(i) for i in images]))  # noqa: E731
    with torch.inference_mode():
        return time_calls(fn, iters)


# detectd's own malloc settings (src/alloc.rs), for torchvision run the same way.
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "2147483647", "MALLOC_TRIM_THRESHOLD_": "2147483647",
                "MALLOC_TOP_PAD_": str(64 << 20), "MALLOC_ARENA_MAX": "1"}


def torchvision_tuned_seconds(kind, path, batch, size, iters, threads):
    """torchvision in a fresh process with detectd's glibc settings: the like-for-like figure."""
    out = sh(sys.executable, __file__, "--torchvision-only", f"{kind},{path},{batch},{size[0]},{size[1]},{iters}",
             "--threads", str(threads), env={**os.environ, **TUNED_MALLOC})
    return float(out)


def detectd_run(kind, path, batch, size, iters, threads, precision):
    """`detectd bench`'s JSON: seconds per call, what ran (auto's choice and trial) and, for
    explicit precisions, each conv/linear of the pass timed alone (--ops)."""
    ops = [] if precision == "auto" else ["--ops"]
    out = sh(BIN, "bench", "--model", kind, "--weights", path, "--batch", str(batch), "--size", f"{size[0]}x{size[1]}",
             "--iters", str(iters), "--threads", str(threads), "--precision", precision, "--device", "cpu", *ops)
    return json.loads(out)


def write_images(n, size, seed):
    rng = np.random.default_rng(seed)
    paths = []
    d = os.path.join(OUT, f"img{size[0]}x{size[1]}")
    os.makedirs(d, exist_ok=True)
    for i in range(n):
        p = os.path.join(d, f"{i}.png")
        if not os.path.exists(p):
            yy, xx = np.mgrid[0:size[0], 0:size[1]]
            img = np.stack([128 + 100 * np.sin(yy * rng.uniform(0.01, 0.05) + c) * np.cos(xx * rng.uniform(0.01, 0.05)) for c in range(3)], -1)
            img += rng.normal(0, 10, img.shape)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p)
        paths.append(p)
    return paths


def agreement(det, cls, precision, threads):
    """`detectd compare` of `precision` against fp32: (matched, total) confident detections on
    four images, (same top-1, images) for the classifier on twenty."""
    def compare(weights, imgs):
        out = sh(BIN, "compare", "--json", "--weights", weights, "--precision", precision, "--device", "cpu",
                 "--threads", str(threads), *imgs)
        return json.loads(out)["agreement"]
    d = compare(det, write_images(4, (480, 640), 1))
    c = compare(cls, write_images(20, (300, 400), 2))
    return d["matched"], d["total"], c["top1"], c["images"]


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        m = re.search(r"VmHWM:\s+(\d+) kB", f.read())
    return int(m.group(1)) / 1024 if m else float("nan")


def load_test(det, cls, precision, threads, duration, connections):
    if not shutil.which("wrk"):
        subprocess.run(["bash", "-c", "apt-get update -qq && apt-get install -y -qq wrk"], check=True, capture_output=True)
    proc = subprocess.Popen([BIN, "serve", "--listen", "127.0.0.1:0", "--detector-weights", det, "--classifier-weights", cls,
                             "--precision", precision, "--threads", str(threads), "--max-batch-size", "8",
                             "--max-queue", "256", "--request-timeout-ms", "600000", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    base = proc.stdout.readline().strip().rsplit(" ", 1)[-1]
    while True:
        try:
            import urllib.request
            if urllib.request.urlopen(base + "/readyz").status == 200:
                break
        except Exception:
            time.sleep(0.5)
    results = {}
    # The classifier first: when wrk stops, the requests it leaves queued still run, and the
    # detector's backlog (seconds per image) would otherwise eat into the classifier's window.
    for name, path, img in [("classifier", "/classify", write_images(1, (224, 224), 4)[0]),
                            ("detector", "/detect", write_images(1, (800, 1216), 3)[0])]:
        lua = os.path.join(OUT, f"{name}.lua")
        with open(lua, "w") as f:
            f.write(f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "image/png"\n'
                    f'local fh = io.open("{img}", "rb")\nwrk.body = fh:read("*a")\nfh:close()\n')
        # One wrk thread: on a 2-core machine the load generator's CPU is taken from the server.
        out = sh("wrk", "-t", "1", "-c", str(connections), "-d", f"{duration[name]}s", "--timeout", "600s",
                 "--latency", "-s", lua, base + path)
        reqs = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        pct = dict(re.findall(r"\s(50|99)%\s+([\d.]+\w+)", out))
        results[name] = (reqs, pct.get("50", "?"), pct.get("99", "?"), out)
    rss = peak_rss_mb(proc.pid)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    return results, rss


INSTANCE_ARCHS = [("v1", "91", "Faster R-CNN v1 (boxes)"), ("mask-v1", "91", "Mask R-CNN v1"),
                  ("mask-v2", "91", "Mask R-CNN v2"), ("keypoint", "2", "Keypoint R-CNN")]


def instance_table(threads, iters, precisions):
    """Masks and keypoints against boxes alone, one 800x1216 image: seconds for torchvision and
    detectd (boxes only and with masks for Mask R-CNN), detections, and detectd's peak RSS.
    Seeded weights as the tests make them (not calibrated: they find 100 detections on noise,
    which is what masks and keypoints cost most on)."""
    from tvref import build_detector  # noqa: E402 (tests/support on sys.path)
    torch.set_num_threads(threads)
    size = (800, 1216)
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, *size), generator=g, dtype=torch.uint8)
    rows = []
    for arch, classes, label in INSTANCE_ARCHS:
        path = os.path.join(OUT, f"det_{arch}.pth")
        if not os.path.exists(path):
            sh(sys.executable, TVREF, "make-detector", "--arch", arch, "--seed", "7", "--num-classes", classes,
               "--weights", path)
        model = build_detector(arch, int(classes)).eval()
        model.load_state_dict(torch.load(path))
        with torch.inference_mode():
            tv = time_calls(lambda: model([image.float() / 255]), iters)
        del model
        for pr in precisions:
            for boxes_only in ([False, True] if arch.startswith("mask") else [False]):
                extra = ["--boxes-only"] if boxes_only else []
                out = json.loads(sh(BIN, "bench", "--model", "detector", "--weights", path, "--size", f"{size[0]}x{size[1]}",
                                    "--iters", str(iters), "--threads", str(threads), "--precision", pr, "--device", "cpu",
                                    *extra))
                rows.append((label + (", masks off" if boxes_only else ""), pr, tv, out))
                print(f"# {label} {pr}{' boxes only' if boxes_only else ''}: torchvision {tv:.3f}s, "
                      f"detectd {out['seconds_per_call']:.3f}s, {out['detections']} detections, "
                      f"peak RSS {out['peak_rss_mb']} MB", file=sys.stderr)
    print("| model, one 800×1216 image | precision | torchvision eager fp32 | detectd | detections | detectd peak RSS |")
    print("|---|---|---|---|---|---|")
    for label, pr, tv, out in rows:
        sec = out["seconds_per_call"]
        print(f"| {label} | {pr} | {tv:.3f} s | {sec:.3f} s ({tv / sec:.2f}×) | {out['detections']} | {out['peak_rss_mb']} MB |")


# --- peers: what a user would run instead of detectd on a CPU (issue #23) ---

PEER_SIZE = (800, 1216)


class Boxes(torch.nn.Module):
    """torchvision's detector on one image, answering plain tensors (boxes, labels, scores):
    the form converters take (a list of dicts cannot be traced)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        d = self.model([x])[0]
        return d["boxes"], d["labels"], d["scores"]


def png_tensors(paths):
    """PNG files as torchvision's input: float CHW in 0..1."""
    return [torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()).permute(2, 0, 1).float() / 255
            for p in paths]


def matched(ref, ours, min_score=0.3, min_iou=0.9):
    """torchvision's detections scoring >= min_score that `ours` reproduces (same label, IoU >=
    min_iou, each used once), as detectd compare counts them: (matched, total)."""
    from torchvision.ops import box_iou
    keep = ref[2] >= min_score
    rb, rl = ref[0][keep], ref[1][keep]
    ob, ol = torch.as_tensor(ours[0]).float(), torch.as_tensor(ours[1]).long()
    if len(rb) == 0 or len(ob) == 0:
        return 0, len(rb)
    iou = box_iou(rb, ob)
    used, hits = set(), 0
    for i in range(len(rb)):
        for j in torch.argsort(iou[i], descending=True).tolist():
            if iou[i, j] < min_iou:
                break
            if j not in used and ol[j] == rl[i]:
                used.add(j)
                hits += 1
                break
    return hits, len(rb)


def peers_table(det, threads, iters, precisions):
    """One 800x1216 image, batch 1: torchvision eager fp32, OpenVINO (f32, bf16 where the CPU
    has bf16, int8 by NNCF's post-training quantization on 10 calibration images), ONNX Runtime
    fp32 and detectd at each precision; seconds per image, the ratio to torchvision, and each
    one's agreement with torchvision fp32 on 4 images (detections scoring >= 0.3 reproduced:
    same label, IoU >= 0.9) with the best score it gives on the first."""
    import nncf
    import onnxruntime as ort
    import openvino as ov
    from tvref import build_detector  # noqa: E402 (tests/support on sys.path)
    torch.set_num_threads(threads)
    model = build_detector("v1").eval()
    model.load_state_dict(torch.load(det))
    wrapped = Boxes(model).eval()
    paths = write_images(4, PEER_SIZE, 11)
    inputs = png_tensors(paths)
    calibration = png_tensors(write_images(10, PEER_SIZE, 12))
    with torch.inference_mode():
        refs = [wrapped(x) for x in inputs]
        tv = time_calls(lambda: wrapped(inputs[0]), iters)
    rows = [("torchvision eager fp32 (the reference)", tv, None, float(refs[0][2][0]))]

    def judge(name, make):
        """Times and judges the peer `make()` builds (conversion and calibration not timed)."""
        try:
            judged(name, make())
        except Exception as e:  # a peer that fails is a row that says so, not a lost table
            rows.append((f"{name}: failed ({type(e).__name__}: {str(e)[:120]})", float("nan"), None, 0.0))
            print(f"# {name} failed: {e}", file=sys.stderr)

    def judged(name, run):
        outs = [run(x) for x in inputs]
        hits = [matched(r, o) for r, o in zip(refs, outs)]
        agree = (sum(h for h, _ in hits), sum(t for _, t in hits))
        seconds = time_calls(lambda: run(inputs[0]), iters)
        best = float(np.max(outs[0][2])) if len(outs[0][2]) else 0.0
        rows.append((name, seconds, agree, best))
        print(f"# {name}: {seconds:.3f}s, agreement {agree[0]}/{agree[1]}, best score {best:.3f}", file=sys.stderr)

    core = ov.Core()
    started = time.perf_counter()
    converted = ov.convert_model(wrapped, example_input=(inputs[0],))
    print(f"# OpenVINO convert_model: {time.perf_counter() - started:.0f}s", file=sys.stderr)
    # Saved and read back, as a user's served model is: NNCF 3.4 fails on the model as
    # convert_model returns it ("Could not find a node aten::unsqueeze/Unsqueeze").
    ov_path = os.path.join(OUT, "det_v1_calibrated.xml")
    ov.save_model(converted, ov_path, compress_to_fp16=False)
    converted = core.read_model(ov_path)

    def openvino(m, hint):
        compiled = core.compile_model(m, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": hint})
        return lambda x: [v for v in compiled([x.numpy()]).values()]

    judge("OpenVINO, f32 hint", lambda: openvino(converted, "f32"))
    if cpu_has_bf16():
        judge("OpenVINO, bf16 hint", lambda: openvino(converted, "bf16"))
    def int8():
        started = time.perf_counter()
        dataset = nncf.Dataset(calibration, lambda x: [x.numpy()])
        quantized = nncf.quantize(converted, dataset, subset_size=len(calibration))
        print(f"# NNCF quantize: {time.perf_counter() - started:.0f}s", file=sys.stderr)
        return openvino(quantized, "f32")

    judge("OpenVINO int8 (NNCF, 10 calibration images)", int8)

    def onnxruntime():
        onnx_path = os.path.join(OUT, "det_v1_calibrated.onnx")
        torch.onnx.export(wrapped, (inputs[0],), onnx_path, opset_version=17, dynamo=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x.numpy()})

    judge("ONNX Runtime fp32", onnxruntime)

    for pr in precisions:
        out = json.loads(sh(BIN, "bench", "--model", "detector", "--weights", det, "--size", f"{PEER_SIZE[0]}x{PEER_SIZE[1]}",
                            "--iters", str(iters), "--threads", str(threads), "--precision", pr, "--device", "cpu"))
        lines = sh(BIN, "detect", "--weights", det, "--precision", pr, "--device", "cpu", "--threads", str(threads),
                   "--score-threshold", "0.05", *paths).splitlines()
        answers = [json.loads(line)["detections"] for line in lines]
        outs = [([d["box"] for d in a], [d["label_id"] for d in a], [d["score"] for d in a]) for a in answers]
        hits = [matched(r, o) for r, o in zip(refs, outs)]
        agree = (sum(h for h, _ in hits), sum(t for _, t in hits))
        best = max(outs[0][2], default=0.0)
        label = f"detectd {pr}" + (f" (chose {out['ran']})" if pr == "auto" else "")
        rows.append((label, out["seconds_per_call"], agree, best))
        print(f"# {label}: {out['seconds_per_call']:.3f}s, agreement {agree[0]}/{agree[1]}", file=sys.stderr)

    print(f"{machine(threads)}\n")
    print("| one 800×1216 image, seeded Faster R-CNN v1 | s/img | × torchvision eager fp32 | "
          "torchvision's detections ≥ 0.3 reproduced (4 images) | best score, first image |")
    print("|---|---|---|---|---|")
    for label, seconds, agree, best in rows:
        if seconds != seconds:  # failed
            print(f"| {label} | | | | |")
        else:
            reproduced = f"{agree[0]}/{agree[1]}" if agree else "—"
            print(f"| {label} | {seconds:.3f} | {tv / seconds:.2f} | {reproduced} | {best:.3f} |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--precisions", default="fp32,fp32-fast,bf16,auto")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="fewer iterations and a shorter load test")
    p.add_argument("--torchvision-only", help=argparse.SUPPRESS)
    p.add_argument("--instances", action="store_true",
                   help="only the Mask/Keypoint R-CNN table: their heads' cost against boxes alone")
    p.add_argument("--peers", action="store_true",
                   help="only the peers table: torchvision, OpenVINO (f32, bf16, NNCF int8), ONNX Runtime, detectd")
    a = p.parse_args()
    sys.path.insert(0, os.path.join(ROOT, "tests/support"))
    if a.peers:
        det, _ = weights()
        peers_table(det, a.threads, 2 if a.quick else a.iters, a.precisions.split(","))
        return
    if a.instances:
        os.makedirs(OUT, exist_ok=True)
        instance_table(a.threads, 2 if a.quick else a.iters, [x for x in a.precisions.split(",") if x != "auto"])
        return
    if a.torchvision_only:
        kind, path, batch, h, w, iters = a.torchvision_only.split(",")
        print(torchvision_seconds(kind, path, int(batch), (int(h), int(w)), int(iters), a.threads))
        return
    det, cls = weights()
    iters = 2 if a.quick else a.iters
    precisions = a.precisions.split(",")
    configs = [("detector", det, b, (800, 1216)) for b in (1, 4)] + [("classifier", cls, b, (224, 224)) for b in (1, 8)]
    rows = []
    for kind, path, batch, size in configs:
        tv = torchvision_seconds(kind, path, batch, size, iters, a.threads)
        tuned = torchvision_tuned_seconds(kind, path, batch, size, iters, a.threads)
        runs = {pr: detectd_run(kind, path, batch, size, iters, a.threads, pr) for pr in precisions}
        ours = {pr: r["seconds_per_call"] for pr, r in runs.items()}
        rows.append((kind, batch, size, tv, tuned, ours, runs))
        print(f"# {kind} batch {batch}: torchvision {tv:.3f}s (malloc as detectd {tuned:.3f}s), "
              + ", ".join(f"{k} {v:.3f}s" for k, v in ours.items()), file=sys.stderr)
    explicit = [pr for pr in precisions if pr != "auto"]
    best = min(explicit, key=lambda pr: rows[1][5][pr])
    fast = [pr for pr in explicit if pr != "fp32"]
    agree = {pr: agreement(det, cls, pr, a.threads) for pr in fast}
    # The detector's window spans many batches (~3 s per image here), or completions counted
    # in it say more about where the window cut a batch than about throughput.
    duration = {"detector": 90 if a.quick else 240, "classifier": 10 if a.quick else 20}
    load, rss = load_test(det, cls, best, a.threads, duration, connections=8)

    print(f"{machine(a.threads)}\n")
    print("| workload | torchvision eager fp32 | " + " | ".join(f"detectd {pr}" for pr in precisions)
          + " | torchvision, malloc as detectd |")
    print("|---|---|" + "---|" * (len(precisions) + 1))
    def cell(pr, tv, seconds, run):
        chose = f", chose {run['ran']}" if pr == "auto" else ""
        return f"{seconds:.3f} s ({tv / seconds:.2f}×{chose})"
    for kind, batch, size, tv, tuned, ours, runs in rows:
        cells = [cell(pr, tv, ours[pr], runs[pr]) for pr in precisions] + [f"{tuned:.3f} s ({tv / tuned:.2f}×)"]
        print(f"| {kind} {size[0]}×{size[1]}, batch {batch} | {tv:.3f} s | " + " | ".join(cells) + " |")
    if "auto" in precisions:
        print()
        for kind, batch, size, tv, tuned, ours, runs in rows:
            fastest = min(explicit, key=lambda pr: ours[pr])
            trial = runs["auto"]["trial"] or {}
            agreed = ", ".join(f"{m['precision']} {m['agreement']:.2f}" for m in trial.get("measured", []))
            print(f"- auto, {kind} batch {batch}: chose {runs['auto']['ran']} ({ours['auto']:.3f} s, "
                  f"{(ours['auto'] / ours[fastest] - 1) * 100:+.0f}% against the fastest, {fastest} {ours[fastest]:.3f} s); "
                  f"trial {trial.get('trial_seconds', 0):.1f} s, agreement with fp32 on its images: {agreed} "
                  f"(bar {trial.get('min_agreement', 0):.2f}).")
    print("\nThe limit: each convolution and linear call of one pass timed alone on random operands of the same "
          "shapes, kind and layout (`detectd bench --ops`), summed; the share is that sum over the whole pass.\n")
    print("| workload | precision | GFLOP per call | conv+linear alone | GFLOP/s | share of the pass | pass |\n|---|---|---|---|---|---|---|")
    for kind, batch, size, tv, tuned, ours, runs in rows:
        for pr in explicit:
            ops = runs[pr].get("ops")
            if ops:
                print(f"| {kind} batch {batch} | {pr} | {ops['gflop']:.1f} | {ops['seconds']:.3f} s | {ops['gflop_per_second']:.0f} | "
                      f"{ops['share_of_pass'] * 100:.0f}% | {ours[pr]:.3f} s ({tv / ours[pr]:.2f}× torchvision; limit {tv / ops['seconds']:.1f}×) |")
    print("\nRatios are against the first column, torchvision as it runs by default. The last column is "
          "torchvision with detectd's glibc malloc settings (" + " ".join(f"{k}={v}" for k, v in TUNED_MALLOC.items())
          + "), the like-for-like reference for detectd fp32.")
    print()
    for pr, (m, t, s, n) in agree.items():
        print(f"- {pr} vs fp32: {m}/{t} detections scoring ≥ 0.3 matched (same label, IoU ≥ 0.9), "
              f"classifier top-1 equal on {s}/{n} images.")
    in_proc = {"detector": 4 / rows[1][5][best], "classifier": 8 / rows[3][5][best]}
    print(f"\nServer under load (wrk, 8 connections, detectd {best}, max batch 8; in-process reference: detector batch 4, classifier batch 8), peak RSS {rss:.0f} MB with both models:\n")
    print("| endpoint | images/s | vs in-process | p50 | p99 |\n|---|---|---|---|---|")
    for name, (reqs, p50, p99, _) in load.items():
        print(f"| /{'detect' if name == 'detector' else 'classify'} | {reqs:.2f} | {reqs / in_proc[name] * 100:.0f}% | {p50} | {p99} |")


if __name__ == "__main__":
    main()
