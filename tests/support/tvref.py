"""Reference outputs from torchvision, made at test time.

Makes seeded random checkpoints (perturbed so that detections survive the 0.05 score threshold),
test images, and torchvision's outputs for them; the Rust tests compare detectd against these.
Nothing here is typed in by hand: every expected number comes from torchvision.

Usage: python tvref.py COMMAND --out DIR [options]; see main().
"""

import argparse
import contextlib
import copy
import io
import json
import os
import re
import sys
import traceback
import zlib

import numpy as np
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torchvision.models.detection import (
    FasterRCNN, KeypointRCNN, MaskRCNN, fasterrcnn_resnet50_fpn, fasterrcnn_resnet50_fpn_v2,
    keypointrcnn_resnet50_fpn, maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2)
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import misc as misc_ops

torch.set_grad_enabled(False)


def perturb_(model, seed):
    """Randomize normalization statistics and sharpen class logits so random weights detect."""
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, misc_ops.FrozenBatchNorm2d)):
            c = m.running_mean.shape[0]
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    if hasattr(model, "roi_heads"):
        pred = model.roi_heads.box_predictor
        pred.cls_score.weight.data.mul_(1.5)
        pred.cls_score.bias.data.copy_(torch.randn(pred.cls_score.bias.shape, generator=g))
        pred.bbox_pred.weight.data.mul_(5.0)
        model.rpn.head.cls_logits.weight.data.mul_(3.0)
    if hasattr(model, "fc"):
        calibrate_fc_(model, g)


def calibrate_fc_(model, g, per_feature=True):
    """Random BN statistics make pooled features nearly image-independent, so a random fc
    predicts one class for everything. Centre and scale the fc on the features of a few noise
    images, so that predictions differ between images and top-1 probabilities are moderate."""
    fc = model.fc
    model.fc = torch.nn.Identity()
    coarse = torch.rand(8, 3, 6, 6, generator=g)
    images = torch.nn.functional.interpolate(coarse, size=(224, 224), mode="bilinear")
    feats = model((images - 0.45) / 0.225)
    model.fc = fc
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    w = torch.randn(fc.weight.shape, generator=g) / (sd if per_feature else 1.0)
    w *= 3.0 / ((feats - mu) @ w.T).std()
    fc.weight.data.copy_(w)
    fc.bias.data.copy_(-(w @ mu))


def centre_masks_(model, g):
    """Random mask logits are mostly negative, so pasted masks would be nearly empty. Shift
    each class's logit bias by the median of its logits on a smooth noise image, so that about
    half of each mask is above 0.5 and the mask boundaries cross the boxes."""
    seen = {}
    pred = model.roi_heads.mask_predictor
    hook = pred.register_forward_hook(lambda mod, inp, out: seen.__setitem__("logits", out))
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(240, 320), mode="bilinear")
    model(list(image))
    hook.remove()
    logits = seen["logits"]
    pred.mask_fcn_logits.bias.data.sub_(logits.transpose(0, 1).reshape(logits.shape[1], -1).median(1).values)


def calibrate_bn_(model, g, size):
    """Sets BatchNorm statistics to those of a few smooth random images, as training would:
    activations then stay normalized through the depth, as in a trained network, instead of
    drifting as random statistics make them. Used where conditioning matters (precision tests)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    coarse = torch.rand(2, 3, 8, 8, generator=g)
    images = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear")
    if hasattr(model, "roi_heads"):
        model(list(images))
    else:
        model((images - 0.45) / 0.225)
    for m in bns:
        m.eval()
    # Residual branches small, as trained ResNets have them (cf. zero-init-residual): a random
    # ResNet whose branches are full-size amplifies any rounding ~2x per stage.
    from torchvision.models.resnet import Bottleneck
    for m in model.modules():
        if isinstance(m, Bottleneck):
            m.bn3.weight.data.mul_(0.3)
            m.bn3.bias.data.mul_(0.3)


# FasterRCNN constructor arguments that `ref-detector` passes through (detectd's per-model keys).
KNOBS = {
    "min_size": int, "max_size": int, "box_score_thresh": float, "box_nms_thresh": float,
    "box_detections_per_img": int, "rpn_pre_nms_top_n_test": int, "rpn_post_nms_top_n_test": int,
    "rpn_nms_thresh": float,
}


# --arch: torchvision's builder (weights=None) and the class its frozen v1 build uses.
ARCHS = {
    "v1": (fasterrcnn_resnet50_fpn, FasterRCNN, {}),
    "v2": (fasterrcnn_resnet50_fpn_v2, None, {}),
    "mask-v1": (maskrcnn_resnet50_fpn, MaskRCNN, {}),
    "mask-v2": (maskrcnn_resnet50_fpn_v2, None, {}),
    "keypoint": (keypointrcnn_resnet50_fpn, KeypointRCNN, {"num_keypoints": 17}),
}


def build_detector(arch, num_classes=91, frozen_eps=None, **knobs):
    """v1 'frozen' mirrors the official COCO_V1 builds: FrozenBatchNorm2d, eps overwritten.
    `knobs` go to torchvision's constructor as they are."""
    builder, cls, extra = ARCHS[arch]
    knobs = {**extra, **knobs}
    if frozen_eps is None or cls is None:
        return builder(weights=None, weights_backbone=None, num_classes=num_classes, **knobs)
    body = torchvision.models.resnet50(norm_layer=misc_ops.FrozenBatchNorm2d)
    model = cls(_resnet_fpn_extractor(body, 3), num_classes=num_classes, **knobs)
    for m in model.modules():
        if isinstance(m, misc_ops.FrozenBatchNorm2d):
            m.eps = frozen_eps
    return model


def save_state_dict(sd, path, fmt):
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    elif fmt == "pth-legacy":
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    else:
        torch.save(sd, path)


def legacy_names(sd):
    """The key names of checkpoints saved before torchvision 0.13 (FPN and RPN head _version 1,
    MaskRCNNHeads' mask_fcn{i})."""
    out = {}
    for k, v in sd.items():
        for fam in ("backbone.fpn.inner_blocks.", "backbone.fpn.layer_blocks."):
            if k.startswith(fam):
                i, rest = k[len(fam):].split(".", 1)
                k = f"{fam}{i}.{rest[2:]}" if rest.startswith("0.") else k
        k = k.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        # MaskRCNNHeads before its _version 2 (v1 only: no norm layers).
        m = re.match(r"roi_heads\.mask_head\.(\d)\.0\.(weight|bias)$", k)
        if m:
            k = f"roi_heads.mask_head.mask_fcn{int(m.group(1)) + 1}.{m.group(2)}"
        out[k] = v
    return out


def cmd_make_detector(a):
    torch.manual_seed(a.seed)
    model = build_detector(a.arch, a.num_classes, a.frozen_eps).eval()
    perturb_(model, a.seed)
    if a.calibrate:
        calibrate_bn_(model, torch.Generator().manual_seed(a.seed + 2), (480, 640))
        # Normalized features are smaller than random-statistics ones: sharpen the classes so
        # that confident (>= 0.3) detections exist.
        model.roi_heads.box_predictor.cls_score.weight.data.mul_(7.0 if a.arch == "v1" else 20.0)
    if getattr(model.roi_heads, "mask_predictor", None) is not None:
        centre_masks_(model, torch.Generator().manual_seed(a.seed + 3))
    sd = model.state_dict()
    if a.legacy_names:
        sd = legacy_names(sd)
    save_state_dict(sd, a.weights, a.format)


def cmd_make_classifier(a):
    torch.manual_seed(a.seed)
    model = torchvision.models.resnet50(weights=None).eval()
    perturb_(model, a.seed)
    if a.calibrate:
        g = torch.Generator().manual_seed(a.seed + 2)
        calibrate_bn_(model, g, (224, 224))
        calibrate_fc_(model, g, per_feature=False)
    save_state_dict(model.state_dict(), a.weights, a.format)


def load_rgb_u8(path):
    """Decoded exactly as detectd decodes PNG: to RGB8 (grayscale replicated)."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).contiguous()


def cmd_ref_detector(a):
    knobs = {k: getattr(a, k) for k in KNOBS if getattr(a, k) is not None}
    model = build_detector(a.arch, a.num_classes, a.frozen_eps, **knobs).eval()
    model.load_state_dict(torch.load(a.weights))
    tensors = {}
    for i, path in enumerate(a.images):
        img = load_rgb_u8(path).float() / 255
        # A fresh copy per image: MultiScaleRoIAlign caches its scales at the first call, and
        # detectd computes them per image, as torchvision does for an image processed first.
        m = copy.deepcopy(model)
        seen = {}
        if a.trace:
            m.rpn.register_forward_hook(
                lambda mod, inp, out: seen.__setitem__("proposals", out[0][0]))
            m.roi_heads.box_roi_pool.register_forward_hook(
                lambda mod, inp, out: seen.__setitem__("roi_features", out))
        for head in ("mask_predictor", "keypoint_predictor"):
            module = getattr(m.roi_heads, head, None)
            if module is not None:
                module.register_forward_hook(
                    lambda mod, inp, out, head=head: seen.__setitem__(head, out))
        det = m([img])[0]
        if "masks" in det:
            tensors[f"{i}.mask_logits"] = seen["mask_predictor"].contiguous()
            # What users keep: pasted probabilities above the threshold, one byte per pixel.
            tensors[f"{i}.masks"] = (det["masks"][:, 0] > a.mask_threshold).to(torch.uint8).contiguous()
        if "keypoints" in det:
            tensors[f"{i}.keypoint_logits"] = seen["keypoint_predictor"].contiguous()
            tensors[f"{i}.keypoints"] = det["keypoints"].contiguous()
            tensors[f"{i}.keypoints_scores"] = det["keypoints_scores"].contiguous()
        if a.trace:
            tensors[f"{i}.proposals"] = seen["proposals"].contiguous()
            tensors[f"{i}.roi_features"] = seen["roi_features"].contiguous()
        tensors[f"{i}.boxes"] = det["boxes"].contiguous()
        tensors[f"{i}.scores"] = det["scores"].contiguous()
        tensors[f"{i}.labels"] = det["labels"].contiguous()
    save_file(tensors, a.out)


def cmd_ref_classifier(a):
    from torchvision.transforms._presets import ImageClassification
    model = torchvision.models.resnet50(weights=None).eval()
    model.load_state_dict(torch.load(a.weights))
    resize = 256 if a.preset == "v1" else 232
    preset = ImageClassification(crop_size=224, resize_size=resize)
    tensors = {}
    for i, path in enumerate(a.images):
        x = preset(load_rgb_u8(path))
        tensors[f"{i}.input"] = x.contiguous()
        tensors[f"{i}.probs"] = model(x[None]).softmax(-1)[0].contiguous()
    save_file(tensors, a.out)


def cmd_images(a):
    """Smooth random scenes with edges, so that features vary across the image."""
    for spec in a.specs:
        # Seeded by the spec itself, so an image is the same whichever others are made with it.
        rng = np.random.default_rng([a.seed, zlib.crc32(spec.encode())])
        name, size, mode = spec.split(":")
        h, w = (int(v) for v in size.split("x"))
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.zeros((h, w, 3), np.float64)
        for c in range(3):
            fy, fx = rng.uniform(0.005, 0.05, 2)
            img[..., c] = 128 + 80 * np.sin(yy * fy + rng.uniform(0, 6)) * np.cos(xx * fx)
        for _ in range(6):
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            y1, x1 = min(h, y0 + rng.integers(h // 8 + 1, h // 2 + 2)), min(w, x0 + rng.integers(w // 8 + 1, w // 2 + 2))
            img[y0:y1, x0:x1] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 12, img.shape)
        img = np.clip(img, 0, 255).astype(np.uint8)
        pil = Image.fromarray(img)
        if mode == "L":
            pil = pil.convert("L")
        pil.save(os.path.join(a.out_dir, name))


def cmd_ops(a):
    """Random NMS and RoIAlign cases with ties, border boxes and degenerate boxes."""
    from torchvision.ops import nms, roi_align, batched_nms
    g = torch.Generator().manual_seed(a.seed)
    t = {}
    for i in range(a.cases):
        n = [0, 1, 7, 300, 1200][i % 5]
        xy = torch.rand(n, 2, generator=g) * 100
        wh = torch.rand(n, 2, generator=g) * 40
        if n:
            wh[: max(1, n // 10)] = 0  # degenerate boxes
            xy[n // 10: n // 5] = 0  # on the border
        boxes = torch.cat([xy, xy + wh], 1)
        scores = (torch.rand(n, generator=g) * 10).round() / 10  # many ties
        idxs = torch.randint(0, 4, (n,), generator=g)
        thr = [0.3, 0.5, 0.7][i % 3]
        t[f"nms.{i}.boxes"], t[f"nms.{i}.scores"], t[f"nms.{i}.idxs"] = boxes, scores, idxs
        t[f"nms.{i}.thr"] = torch.tensor([thr], dtype=torch.float64)
        t[f"nms.{i}.keep"] = nms(boxes, scores, thr)
        t[f"nms.{i}.batched_keep"] = batched_nms(boxes, scores, idxs, thr)
    for i in range(a.cases):
        c, h, w = 3, 13 + i, 17 + 2 * i
        feat = torch.randn(2, c, h, w, generator=g)
        scale = [1.0, 0.5, 0.25, 0.125][i % 4]
        k = 40
        xy = torch.rand(k, 2, generator=g) * torch.tensor([w, h]) / scale * 1.2 - 4
        wh = torch.rand(k, 2, generator=g) * 30 / scale
        wh[:4] = 0
        wh[4:8] *= -0.1  # malformed: x2 < x1
        xy[8:12] = torch.tensor([w, h]) / scale - 0.3  # past the bottom-right edge
        b = torch.randint(0, 2, (k, 1), generator=g).float()
        rois = torch.cat([b, xy, xy + wh], 1)
        t[f"roi.{i}.feat"], t[f"roi.{i}.rois"] = feat, rois
        t[f"roi.{i}.scale"] = torch.tensor([scale], dtype=torch.float64)
        t[f"roi.{i}.out"] = roi_align(feat, rois, (7, 7), scale, 2, False)
    save_file({k: v.contiguous() for k, v in t.items()}, a.out)


def cmd_decode_rle(a):
    """Decodes every mask of a /detect answer with pycocotools, as a COCO user would."""
    from pycocotools import mask as mask_utils
    answer = json.load(open(a.answer))
    tensors = {}
    for i, result in enumerate(answer["results"]):
        masks = [mask_utils.decode({"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()})
                 for d in result["detections"]]
        tensors[f"{i}.masks"] = torch.from_numpy(np.stack(masks)).contiguous()
        tensors[f"{i}.areas"] = torch.tensor([float(mask_utils.area(
            {"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()})) for d in result["detections"]])
    save_file(tensors, a.out)


def cmd_coco_eval(a):
    """Loads detectd's COCO results with pycocotools and runs COCOeval on them, with the
    results themselves as ground truth (a real evaluation needs COCO's annotations; this proves
    the files are what COCOeval reads). Prints the stats as JSON."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    listing = json.load(open(a.images))
    results = json.load(open(a.results))
    if a.iou == "keypoints":
        # COCOeval scores at most 20 keypoint detections per image (its maxDets): keep the best
        # 20 as ground truth and results alike, or recall against itself could not reach 1.
        kept, seen = [], {}
        for r in sorted(results, key=lambda r: -r["score"]):
            seen[r["image_id"]] = seen.get(r["image_id"], 0) + 1
            if seen[r["image_id"]] <= 20:
                kept.append(r)
        results = kept
    annotations = []
    for n, r in enumerate(results, 1):
        ann = {"id": n, "image_id": r["image_id"], "category_id": r["category_id"], "bbox": r["bbox"],
               "iscrowd": 0, "area": r["bbox"][2] * r["bbox"][3]}
        if a.iou == "segm":
            ann["segmentation"] = r["segmentation"]
            seg = r["segmentation"]
            ann["area"] = float(mask_utils.area({"size": seg["size"], "counts": seg["counts"].encode()}))
        if a.iou == "keypoints":
            kps = list(r["keypoints"])
            kps[2::3] = [2] * (len(kps) // 3)
            ann["keypoints"], ann["num_keypoints"] = kps, len(kps) // 3
        annotations.append(ann)
    gt = COCO()
    gt.dataset = {**listing, "annotations": annotations}
    gt.createIndex()
    dt = gt.loadRes(results)
    ev = COCOeval(gt, dt, iouType=a.iou)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    print(json.dumps({"stats": [float(x) for x in ev.stats], "results": len(results)}))


def parser():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("make-detector")
    s.add_argument("--arch", choices=list(ARCHS), required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--num-classes", type=int, default=91)
    s.add_argument("--frozen-eps", type=float, default=None)
    s.add_argument("--legacy-names", action="store_true")
    s.add_argument("--calibrate", action="store_true", help="BatchNorm statistics from data, not random")
    s.add_argument("--format", choices=["pth", "pth-legacy", "safetensors"], default="pth")
    s.add_argument("--weights", required=True)
    s = sub.add_parser("make-classifier")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--calibrate", action="store_true", help="BatchNorm statistics from data, not random")
    s.add_argument("--format", choices=["pth", "pth-legacy", "safetensors"], default="pth")
    s.add_argument("--weights", required=True)
    s = sub.add_parser("ref-detector")
    s.add_argument("--arch", choices=list(ARCHS), required=True)
    s.add_argument("--num-classes", type=int, default=91)
    s.add_argument("--frozen-eps", type=float, default=None)
    for knob, kind in KNOBS.items():
        s.add_argument("--" + knob.replace("_", "-"), dest=knob, type=kind, default=None)
    s.add_argument("--mask-threshold", type=float, default=0.5)
    # The intermediate steps (~50 MB of RoIAlign features per image): only the parity tests of
    # those steps read them, and a CI machine's disk holds every reference at once.
    s.add_argument("--trace", action="store_true", help="also record proposals and RoI features")
    s.add_argument("--weights", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("images", nargs="+")
    s = sub.add_parser("ref-classifier")
    s.add_argument("--preset", choices=["v1", "v2"], required=True)
    s.add_argument("--weights", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("images", nargs="+")
    s = sub.add_parser("images")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out-dir", required=True)
    s.add_argument("specs", nargs="+", help="name:HxW:RGB|L")
    s = sub.add_parser("ops")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--cases", type=int, default=15)
    s.add_argument("--out", required=True)
    s = sub.add_parser("decode-rle")
    s.add_argument("--answer", required=True)
    s.add_argument("--out", required=True)
    s = sub.add_parser("coco-eval")
    s.add_argument("--images", required=True)
    s.add_argument("--results", required=True)
    s.add_argument("--iou", choices=["segm", "keypoints", "bbox"], required=True)
    return p


def run(argv):
    a = parser().parse_args(argv)
    globals()["cmd_" + a.cmd.replace("-", "_")](a)


def serve():
    """Runs commands read from stdin, one JSON list of arguments per line, and answers each
    with one JSON line ({"ok", "stdout"} or {"ok": false, "error"}). The Rust tests send every
    reference of a run through one such process: torch and torchvision are imported once, not
    once per reference (3-6 s each). What a library prints goes to stderr, not into answers."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                run(json.loads(line))
            answer = {"ok": True, "stdout": printed.getvalue()}
        except BaseException:  # noqa: BLE001 (argparse's SystemExit included: the caller's error)
            answer = {"ok": False, "error": printed.getvalue() + traceback.format_exc()}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


def main():
    torch.set_num_threads(int(os.environ.get("TVREF_THREADS", torch.get_num_threads())))
    if sys.argv[1:] == ["serve"]:
        serve()
    else:
        run(sys.argv[1:])


if __name__ == "__main__":
    main()
