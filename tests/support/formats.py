"""Writes one small image per format detectd reads, plus the RGB8 pixels each should decode
to (as a lossless PNG beside it), computed with PIL and numpy.

Usage: python formats.py OUT_DIR
"""

import os
import sys

import numpy as np
from PIL import Image, ImageOps

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(5)
h, w = 40, 60
yy, xx = np.mgrid[0:h, 0:w]
rgb = np.stack([(xx * 4) % 256, (yy * 6) % 256, (xx + yy) * 2 % 256], -1).astype(np.uint8)
rgb[10:20, 5:25] = rng.integers(0, 255, (10, 20, 3))


def save(name, img, expected, **kw):
    img.save(os.path.join(out, name), **kw)
    Image.fromarray(np.asarray(expected, np.uint8)).save(os.path.join(out, name + ".expected.png"))


base = Image.fromarray(rgb)
save("rgb.png", base, rgb)
save("rgb.bmp", base, rgb)
save("rgb.tiff", base, rgb)
save("rgb.webp", base, rgb, lossless=True)
rgba = np.concatenate([rgb, np.full((h, w, 1), 100, np.uint8)], -1)
save("rgba.png", Image.fromarray(rgba), rgb)
gray = rgb[..., 0]
save("gray.png", Image.fromarray(gray), np.stack([gray] * 3, -1))
# 16-bit: detectd scales to 8 bits (v / 257, rounded), as the image crate does.
g16 = (xx * 1000 + yy * 37).astype(np.uint16)
save("gray16.png", Image.fromarray(g16), np.stack([np.round(g16 / 257.0)] * 3, -1))
# GIF: the first frame counts.
pal = base.quantize(colors=64)
second = Image.fromarray(255 - rgb).quantize(colors=64)
save("anim.gif", pal, np.asarray(pal.convert("RGB")), save_all=True, append_images=[second])
# JPEG with EXIF orientation 6 (rotate 90° clockwise to display). Lossy: compared loosely.
exif = Image.Exif()
exif[0x0112] = 6
base.save(os.path.join(out, "rotated.jpg"), quality=95, exif=exif)
shown = ImageOps.exif_transpose(Image.open(os.path.join(out, "rotated.jpg"))).convert("RGB")
shown.save(os.path.join(out, "rotated.jpg.expected.png"))
