#!/usr/bin/env python3
"""Pillow + NumPy baseline of benches/decode.rs: decode + torchvision-style train transforms
(RandomResizedCrop, horizontal flip, rotation, ColorJitter, RandomGrayscale, ToTensor,
Normalize), written with Pillow/NumPy as torchvision's PIL path does them. One process = one core.

usage: benches/decode_pillow.py FMNIST_TAR JPEG_TAR [SECONDS]
"""
import io
import math
import random
import sys
import tarfile
import time

import numpy as np
from PIL import Image, ImageEnhance


def load(path, exts):
    with tarfile.open(path) as tf:
        return [tf.extractfile(m).read() for m in tf.getmembers()
                if m.isfile() and m.name.rsplit(".", 1)[-1].lower() in exts]


def rrc_params(rng, w, h, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    area = w * h
    lr = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        ta = area * rng.uniform(*scale)
        ar = math.exp(rng.uniform(*lr))
        cw, ch = int(round(math.sqrt(ta * ar))), int(round(math.sqrt(ta / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
    r = w / h
    if r < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif r > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def adjust_hue(img, f):
    h, s, v = img.convert("HSV").split()
    nh = np.asarray(h, dtype=np.uint8)
    with np.errstate(over="ignore"):
        nh = nh + np.uint8(int(f * 255) % 256)
    return Image.merge("HSV", (Image.fromarray(nh, "L"), s, v)).convert("RGB")


def transform(data, mode, size, rng, jitter, gray_p, mean, std):
    img = Image.open(io.BytesIO(data)).convert(mode)
    w, h = img.size
    i, j, ch, cw = rrc_params(rng, w, h)
    img = img.resize((size, size), Image.BILINEAR, box=(j, i, j + cw, i + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    img = img.rotate(rng.uniform(-10, 10), Image.BILINEAR)
    b, c, s, hu = jitter
    ops = [0, 1, 2, 3]
    rng.shuffle(ops)
    for op in ops:
        if op == 0 and b:
            img = ImageEnhance.Brightness(img).enhance(rng.uniform(1 - b, 1 + b))
        elif op == 1 and c:
            img = ImageEnhance.Contrast(img).enhance(rng.uniform(1 - c, 1 + c))
        elif op == 2 and s and mode == "RGB":
            img = ImageEnhance.Color(img).enhance(rng.uniform(1 - s, 1 + s))
        elif op == 3 and hu and mode == "RGB":
            img = adjust_hue(img, rng.uniform(-hu, hu))
    if mode == "RGB" and rng.random() < gray_p:
        img = img.convert("L").convert("RGB")
    x = np.asarray(img, dtype=np.float32) / 255.0
    if x.ndim == 2:
        x = x[None]
    else:
        x = x.transpose(2, 0, 1)
    return (x - mean) / std


def bench(name, images, seconds, **kw):
    rng = random.Random(0)
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        for d in images:
            transform(d, rng=rng, **kw)
        n += len(images)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    n_dec, t1, c1 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t1 < seconds / 2:
        for d in images:
            Image.open(io.BytesIO(d)).convert(kw["mode"]).load()
        n_dec += len(images)
    dt_dec, dc_dec = time.perf_counter() - t1, time.process_time() - c1
    print(f"pillow {name}:  1 thread(s) {n / dt:7.0f} img/s ({n / dc:7.0f}/cpu-s)"
          f"   decode only {n_dec / dt_dec:7.0f} img/s ({n_dec / dc_dec:7.0f}/cpu-s)")


def main():
    fm, jp = sys.argv[1], sys.argv[2]
    secs = float(sys.argv[3]) if len(sys.argv) > 3 else 3.0
    bench("fmnist 28x28 png -> 28 grey", load(fm, {"png"}), secs, mode="L", size=28,
          jitter=(0.4, 0.4, 0.0, 0.0), gray_p=0.0,
          mean=np.array([0.5], np.float32)[:, None, None], std=np.array([0.5], np.float32)[:, None, None])
    bench("jpeg 256x256 q90 -> 224 rgb", load(jp, {"jpg"}), secs, mode="RGB", size=224,
          jitter=(0.4, 0.4, 0.4, 0.1), gray_p=0.2,
          mean=np.array([0.485, 0.456, 0.406], np.float32)[:, None, None],
          std=np.array([0.229, 0.224, 0.225], np.float32)[:, None, None])


if __name__ == "__main__":
    main()
