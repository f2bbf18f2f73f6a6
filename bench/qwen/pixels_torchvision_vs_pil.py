"""How far the pixel values of transformers' torchvision-backed Qwen2-VL image processor
(`Qwen2VLImageProcessor`, torch's antialiased bicubic) are from its PIL-backed one
(`Qwen2VLImageProcessorPil`, PIL's bicubic), which is the one misp implements
(crates/misp/src/model/qwen2_5_vl/image_processor.rs).

The reference venv has no torchvision; this runs in a throwaway venv with a torch that
torchvision's wheel pairs with and the same transformers, e.g. (CPU use only; the CUDA libraries
the torch wheel asks for can be taken from an existing torch install):
    python -m venv .venv-torchvision
    .venv-torchvision/bin/pip install --no-deps "torch>=2.14,<2.15" torchvision==0.29.2
    .venv-torchvision/bin/pip install transformers==5.24.0 pillow==13.0.0 numpy filelock \
        typing-extensions sympy networkx jinja2 fsspec
    .venv-torchvision/bin/python bench/qwen/pixels_torchvision_vs_pil.py

Compares, per photo of fixtures/qwen2_5_vl and a 640 x 480 enlargement of one, under the
conformance fixture's min / max pixels and transformers' default bounds: the grids (equal, as both use the same smart_resize) and
the max / mean absolute difference of pixel_values (normalised values, so 1 / 255 of a channel
is about 0.015).
"""

import os

import numpy as np
import PIL
import torch
import torchvision
import transformers
from PIL import Image
from transformers import Qwen2VLImageProcessor, Qwen2VLImageProcessorPil

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLIP = os.path.join(ROOT, "fixtures", "clip", "images")
QWEN = os.path.join(ROOT, "fixtures", "qwen2_5_vl", "images")
PHOTOS = [os.path.join(CLIP, "astronaut_small.png"), os.path.join(CLIP, "camera_gray.png"),
          os.path.join(CLIP, "rocket_rgb16.png"), os.path.join(QWEN, "hopper.png")]
PHOTOS += [os.path.join(QWEN, p) for p in sorted(os.listdir(QWEN)) if p.startswith("small_")]

print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"transformers {transformers.__version__}, Pillow {PIL.__version__}")
print("| photo | size | bounds | grid | max abs diff | mean abs diff |")
print("|---|---|---|---|---|---|")
# A photo of the paper's typical size: hopper enlarged to 640 x 480 (PIL bicubic), which
# smart_resize then shrinks to 644 x 476.
typical = Image.open(os.path.join(QWEN, "hopper.png")).convert("RGB").resize(
    (640, 480), Image.Resampling.BICUBIC)
worst = []
for bounds, kw in [("56^2..28^2*10", dict(min_pixels=56 * 56, max_pixels=28 * 28 * 10)),
                   ("defaults", {})]:
    tv = Qwen2VLImageProcessor(**kw)
    pil = Qwen2VLImageProcessorPil(**kw)
    for path in PHOTOS + ["hopper_640x480"]:
        img = typical if path == "hopper_640x480" else Image.open(path).convert("RGB")
        a = tv(images=img, return_tensors="np")
        b = pil(images=img, return_tensors="np")
        assert (a["image_grid_thw"] == b["image_grid_thw"]).all(), path
        d = np.abs(np.asarray(a["pixel_values"], np.float64) - np.asarray(b["pixel_values"], np.float64))
        worst.append(d.max())
        print(f"| {os.path.basename(path)} | {img.width}x{img.height} | {bounds} | "
              f"{a['image_grid_thw'][0].tolist()} | {d.max():.4f} | {d.mean():.5f} |")
print(f"largest difference over all: {max(worst):.4f}")
