"""Images/s of `misp embed pool` against transformers on the same machine, in one run.

A ViT-B/32-sized CLIP (random weights, 224 px), CPU, the same `--images` JPEGs, batch size and
threads on both sides; prints both images/s and misp / transformers. Both sides count decoding,
preprocessing (transformers: CLIPImageProcessor, PIL backend) and the image tower with its
projection and L2 normalisation, and exclude model loading.

Needs: a release build (`cargo build --release -p misp-cli`; `--misp` names another binary) and
torch, transformers and Pillow: run it from the repository root in the
reference venv made by bench/setup-reference-env.sh (pins in bench/requirements.txt):
    python bench/embed_vs_transformers.py [--images 256] [--threads 2]
Figures and the machine they were measured on: bench/README.md.
"""

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time

import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ap = argparse.ArgumentParser()
ap.add_argument("--images", type=int, default=256)
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--threads", type=int, default=os.cpu_count())
ap.add_argument("--misp", default=os.path.join(ROOT, "target", "release", "misp"))
ap.add_argument("--keep", action="store_true", help="keep the checkpoint and images (for profiling)")
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)

work = tempfile.mkdtemp(prefix="misp-bench-embed-")
ckpt = os.path.join(work, "clip-b32-random")
imgdir = os.path.join(work, "images")
os.makedirs(imgdir)

# ViT-B/32 sizes (openai/clip-vit-base-patch32), random weights.
cfg = CLIPConfig(
    text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                     max_position_embeddings=77, vocab_size=49408),
    vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=32),
    projection_dim=512,
)
model = CLIPModel(cfg).eval()
model.save_pretrained(ckpt)
proc = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
proc.save_pretrained(ckpt)

# Photo-like inputs: the fixture photographs, resized to typical dataset sizes, as JPEG.
src = [os.path.join("fixtures/clip/images", f) for f in sorted(os.listdir("fixtures/clip/images"))]
sizes = [(640, 480), (500, 375), (480, 640), (800, 600)]
for i in range(args.images):
    im = Image.open(src[i % len(src)]).convert("RGB").resize(sizes[i % len(sizes)], Image.BICUBIC)
    im.save(os.path.join(imgdir, f"img{i:05d}.jpg"), quality=90)
paths = sorted(os.path.join(imgdir, f) for f in os.listdir(imgdir))

# transformers: decode + preprocess + image tower + projection + normalise.
with torch.inference_mode():
    t0 = time.perf_counter()
    for b in range(0, len(paths), args.batch):
        ims = [Image.open(p).convert("RGB") for p in paths[b:b + args.batch]]
        px = proc(images=ims, return_tensors="pt")["pixel_values"]
        pooled = model.vision_model(pixel_values=px).pooler_output
        e = model.visual_projection(pooled)
        e = e / e.norm(dim=-1, keepdim=True)
    t_hf = time.perf_counter() - t0
hf_rate = len(paths) / t_hf

# misp: the same checkpoint and images through `misp embed pool` (its reported time excludes loading).
out = subprocess.run(
    [args.misp, "embed", "pool", "--clip", ckpt, "--images", imgdir, "--out", os.path.join(work, "pool"),
     "--batch-size", str(args.batch), "--quiet"],
    capture_output=True, text=True, env={**os.environ, "RAYON_NUM_THREADS": str(args.threads)},
)
if out.returncode != 0:
    raise SystemExit(out.stderr)
m = re.search(r"(\d+) embedded.* in ([0-9.]+) s", out.stderr)
n, t_misp = int(m.group(1)), float(m.group(2))
misp_rate = n / t_misp

print(f"| engine | images | seconds | images/s |\n|---|---|---|---|")
print(f"| transformers {__import__('transformers').__version__} / torch {torch.__version__} | {len(paths)} | {t_hf:.2f} | {hf_rate:.1f} |")
print(f"| misp | {n} | {t_misp:.2f} | {misp_rate:.1f} |")
print(f"\nratio misp / transformers: {misp_rate / hf_rate:.2f} (target >= 1.0); {args.threads} threads, batch {args.batch}")
if args.keep:
    print(f"kept {work}")
else:
    shutil.rmtree(work)
