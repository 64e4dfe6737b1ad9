#!/usr/bin/env python3
"""Write the decode bench inputs (not committed): 256x256 JPEG q90 natural images as one
WebDataset tar, cut from scikit-image's bundled sample photos.

usage: scripts/make_bench_data.py [OUT_DIR]   (default target/bench-data)
needs: pip install scikit-image pillow numpy
"""
import io
import os
import sys
import tarfile

import numpy as np
from PIL import Image
import skimage.data as data

out_dir = sys.argv[1] if len(sys.argv) > 1 else "target/bench-data"
os.makedirs(out_dir, exist_ok=True)

# Colour photos bundled with scikit-image (no download needed).
names = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"]
photos = []
for n in names:
    try:
        photos.append(np.asarray(getattr(data, n)())[..., :3])
    except Exception as e:  # a sample that needs a download: skip it
        print(f"skipping {n}: {e}", file=sys.stderr)
if not photos:
    sys.exit("no scikit-image sample photos available: pip install scikit-image")

rng = np.random.default_rng(0)
per_photo = 128 // len(photos) + 1
members = []
for p, img in enumerate(photos):
    h, w = img.shape[:2]
    for k in range(per_photo):
        # Random square crop of 50-100% of the short side, resized to 256x256.
        side = int(min(h, w) * rng.uniform(0.5, 1.0))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(img[y:y + side, x:x + side]).resize((256, 256), Image.BILINEAR)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        members.append((f"photo{p}-{k:03d}.jpg", buf.getvalue()))

path = os.path.join(out_dir, "jpeg256.tar")
with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
    for name, payload in members:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode = len(payload), 0, 0o644
        tf.addfile(ti, io.BytesIO(payload))
print(f"wrote {len(members)} images to {path}")
