"""Writes the seed corpora of the fuzz targets into fuzz/corpus/<target>/.

    .venv/bin/python fuzz/seeds.py [TARGET...]

Needs torch and pillow (scripts/setup installs both). The files are small on purpose: the
fuzzer mutates them, so every byte costs executions. Seeds are named seed-*; files the fuzzer
adds are named by their SHA-1, and `cargo fuzz cmin` may drop either kind.
"""

import base64
import collections
import io
import json
import os
import pathlib

import torch
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent / "corpus"


def put(target, name, data):
    d = ROOT / target
    d.mkdir(parents=True, exist_ok=True)
    (d / f"seed-{name}").write_bytes(data)


# --- checkpoint: torch.save of small state dicts, zip and legacy formats -------------------------


def saved(obj, legacy, protocol=2):
    buf = io.BytesIO()
    torch.save(obj, buf, pickle_protocol=protocol, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def checkpoints():
    torch.manual_seed(0)
    dtypes = {
        "f32": torch.ones(2, 3),
        "f64": torch.arange(3, dtype=torch.float64),
        "f16": torch.tensor([1.5, -2.0], dtype=torch.float16),
        "bf16": torch.tensor([0.25], dtype=torch.bfloat16),
        "i64": torch.tensor([1, -2, 3]),
        "i32": torch.tensor([[7]], dtype=torch.int32),
        "i16": torch.tensor([5, 6], dtype=torch.int16),
        "i8": torch.tensor([-1], dtype=torch.int8),
        "u8": torch.tensor([255, 0], dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(3.0),
        "empty": torch.zeros(0, 4),
    }
    module = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2), torch.nn.Linear(2, 1)
    )
    nested = module.state_dict()  # an OrderedDict with _metadata
    assert hasattr(nested, "_metadata")
    base = torch.arange(12.0).view(3, 4)
    views = collections.OrderedDict(
        t=base.t(),  # non-contiguous: strides (1, 4)
        cols=base[:, 1::2],  # strided and offset, same storage
        tail=base[1:],  # storage offset 4
        base=base,
    )
    wrapped = {"model": module.state_dict(), "epoch": 3, "optimizer": {"lr": 0.1}}
    params = {"module.w": torch.nn.Parameter(torch.ones(2)), "module.b": torch.zeros(1)}
    cases = {
        "dtypes": dtypes,
        "nested": nested,
        "views": views,
        "wrapped": wrapped,
        "params": params,
    }
    for name, obj in cases.items():
        put("checkpoint", f"{name}.zip.pth", saved(obj, legacy=False))
        put("checkpoint", f"{name}.legacy.pth", saved(obj, legacy=True))
    put("checkpoint", "views.p4.zip.pth", saved(views, legacy=False, protocol=4))
    put("checkpoint", "nested.p4.legacy.pth", saved(nested, legacy=True, protocol=4))


# --- image: every decoder, odd shapes and modes -----------------------------------------------


def gradient(w, h, mode="RGB"):
    img = Image.new("RGB", (w, h))
    img.putdata([((x * 37) % 256, (y * 53) % 256, ((x + y) * 11) % 256) for y in range(h) for x in range(w)])
    return img.convert(mode) if mode != "RGB" else img


def encoded(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def images():
    rgb = gradient(8, 6)
    out = {
        "rgb.png": encoded(rgb, "PNG"),
        "gray.png": encoded(rgb.convert("L"), "PNG"),
        "palette.png": encoded(rgb.convert("P", palette=Image.ADAPTIVE, colors=4), "PNG"),
        "gray16.png": encoded(rgb.convert("I;16"), "PNG"),
        "rgba.png": encoded(rgb.convert("RGBA"), "PNG"),
        "la.png": encoded(rgb.convert("LA"), "PNG"),
        "1bit.png": encoded(rgb.convert("1"), "PNG"),
        "optimized.png": encoded(rgb, "PNG", optimize=True),
        "1x1.png": encoded(gradient(1, 1), "PNG"),
        "1x300.png": encoded(gradient(1, 300, "L"), "PNG"),
        "300x1.png": encoded(gradient(300, 1, "L"), "PNG"),
        "rgb.jpg": encoded(rgb, "JPEG", quality=50),
        "gray.jpg": encoded(rgb.convert("L"), "JPEG", quality=50),
        "progressive.jpg": encoded(rgb, "JPEG", quality=50, progressive=True),
        "cmyk.jpg": encoded(rgb.convert("CMYK"), "JPEG", quality=50),
        "1x1.jpg": encoded(gradient(1, 1), "JPEG"),
        "1x300.jpg": encoded(gradient(1, 300), "JPEG", quality=30),
        "300x1.jpg": encoded(gradient(300, 1), "JPEG", quality=30),
        "palette.gif": encoded(rgb.convert("P", palette=Image.ADAPTIVE, colors=8), "GIF"),
        "rgb.bmp": encoded(gradient(3, 2), "BMP"),
        "palette.bmp": encoded(gradient(3, 2).convert("P", palette=Image.ADAPTIVE, colors=4), "BMP"),
        "gray.bmp": encoded(gradient(3, 2, "L"), "BMP"),
        "rgb.tiff": encoded(gradient(4, 3), "TIFF"),
        "gray16.tiff": encoded(gradient(4, 3).convert("I;16"), "TIFF"),
        "lzw.tiff": encoded(gradient(4, 3), "TIFF", compression="tiff_lzw"),
        "deflate.tiff": encoded(gradient(4, 3, "L"), "TIFF", compression="tiff_adobe_deflate"),
        "rgba.tiff": encoded(gradient(4, 3, "RGBA"), "TIFF"),
        "lossy.webp": encoded(rgb, "WEBP", quality=30),
        "lossless.webp": encoded(rgb, "WEBP", lossless=True),
        "rgba.webp": encoded(rgb.convert("RGBA"), "WEBP", lossless=True),
    }
    # Animated GIF: the decoder reads the first frame; the second is smaller and offset.
    frames = [gradient(6, 4).convert("P"), gradient(6, 4, "L").convert("P")]
    out["animated.gif"] = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10, loop=0)
    # EXIF orientations 6 (rotate 90) and 3 (rotate 180) on a non-square JPEG, and one on PNG.
    for orientation in (3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        out[f"exif{orientation}.jpg"] = encoded(gradient(6, 3), "JPEG", quality=40, exif=exif)
    exif = Image.Exif()
    exif[0x0112] = 6
    out["exif6.png"] = encoded(gradient(6, 3), "PNG", exif=exif)
    out["exif6.webp"] = encoded(gradient(6, 3), "WEBP", lossless=True, exif=exif)
    # Formats the image crate also recognises by their magic bytes, so detectd accepts them too.
    out["rgb.ppm"] = encoded(gradient(3, 2), "PPM")
    out["gray.pgm"] = encoded(gradient(3, 2, "L"), "PPM")
    out["rgba.ico"] = encoded(gradient(16, 16, "RGBA"), "ICO", sizes=[(16, 16)])
    for name, data in out.items():
        put("image", name, data)
    return out


# --- http_body: selector byte (content type; +4 = /classify) then the body --------------------


def http_bodies(imgs):
    png = imgs["1x1.png"]
    jpg = imgs["1x1.jpg"]
    b64 = base64.b64encode(png).decode()
    raw = {
        "raw-png": bytes([0]) + png,
        "raw-jpg-classify": bytes([4]) + jpg,
        "json-image": bytes([1]) + json.dumps(
            {"image": b64, "score_threshold": 0.5, "max_detections": 3, "labels": ["person", "dog"]}
        ).encode(),
        "json-images": bytes([1]) + json.dumps(
            {"images": [b64, "data:image/png;base64," + b64.rstrip("=")], "labels": "cat, dog", "render": "png"}
        ).encode(),
        "json-classify": bytes([5]) + json.dumps({"image": b64, "top_k": 3}).encode(),
        "json-bad-param": bytes([1]) + json.dumps({"image": b64, "max_detections": "x"}).encode(),
    }

    def multipart(boundary, parts):
        out = b""
        for headers, body in parts:
            out += b"--" + boundary + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body + b"\r\n"
        return out + b"--" + boundary + b"--\r\n"

    file_part = ([b'Content-Disposition: form-data; name="image"; filename="a.png"', b"Content-Type: image/png"], png)
    typed_part = ([b'Content-Disposition: form-data; name="image"', b"Content-Type: image/jpeg"], jpg)
    raw["multipart"] = bytes([2]) + multipart(
        b"X",
        [
            file_part,
            ([b'Content-Disposition: form-data; name="score_threshold"'], b"0.25"),
            ([b'Content-Disposition: form-data; name="labels"'], b'["person","car"]'),
            ([b'Content-Disposition: form-data; name="render"'], b"jpeg"),
        ],
    )
    raw["multipart-two-files"] = bytes([2]) + multipart(
        b"X", [file_part, typed_part, ([b'Content-Disposition: form-data; name="max_detections"'], b"7")]
    )
    raw["multipart-classify"] = bytes([6]) + multipart(
        b"X", [typed_part, ([b'Content-Disposition: form-data; name="top_k"'], b"2")]
    )
    raw["multipart-quoted-boundary"] = bytes([3]) + multipart(b"a b", [file_part])
    for name, data in raw.items():
        put("http_body", name, data)


# --- labels: name lists and id<TAB>name lists -------------------------------------------------


def labels():
    coco = (pathlib.Path(__file__).resolve().parent.parent / "models" / "coco_categories.txt").read_text()
    names = [line.split("\t", 1)[1] for line in coco.splitlines() if line.strip()]
    out = {
        "coco-ids.txt": coco,
        "coco-names.txt": "\n".join(names) + "\n",
        "coco-names-crlf.txt": "\r\n".join(names),
        "few-ids.txt": "3\tdog\n\n1\tcat\n 90 \t toothbrush \n",
        "names.txt": "background\ncat\ndog\n",
        "mixed.txt": "1\tcat\ndog\n",
        "repeated.txt": "1\tcat\n1\tdog\n",
        "past-end.txt": "91\tx\n",
        "unicode.txt": "0\tcafé\n2\t猫\n",
    }
    for name, text in out.items():
        put("labels", name, text.encode())


if __name__ == "__main__":
    import sys

    only = set(sys.argv[1:])  # target names; all when none given
    if not only or "checkpoint" in only:
        checkpoints()
    if not only or {"image", "http_body"} & only:
        imgs = images()
        if not only or "http_body" in only:
            http_bodies(imgs)
    if not only or "labels" in only:
        labels()
    for target in sorted(os.listdir(ROOT)):
        files = list((ROOT / target).iterdir())
        print(f"{target}: {len(files)} files, {sum(f.stat().st_size for f in files)} bytes")
