"""Checks `misp bench memory`'s predictions against the peak resident memory `misp train`
measures, on a checkpoint made by bench/memory/make_llava_7b_shaped.py (LLaVA) or
bench/memory/make_qwen_small.py (Qwen2.5-VL: its shape.json gives the tokens per sequence and the
photos' size, which `misp bench memory --image` resizes as the image processor does).

For each setting (batched, sequence groups, activation checkpointing, head chunks), runs one
optimiser step of the `misp` config (K = 3: 5 sequences) on the folder's one record, on the CPU
with `--kernels generic` (the graph a GPU runs) and bf16 weights, with
MISP_RETURN_FREED_MEMORY=1 so that the resident size follows the bytes alive, and reads
`memory/step_peak_rss_mib` and `memory/rss_at_step_start_mib` from the run's metrics. It
compares:
  - the whole step: measured peak vs predicted peak (weights, adapters and AdamW state,
    the largest phase), the process's own overhead (libraries, tokenizer, thread stacks)
    included on the measured side only;
  - the step's own memory: measured peak minus the resident size at the step's start vs the
    predicted largest phase plus the gradient sum the first step allocates and the pixels of
    the images the step reads.

Needs only a release build (`cargo build --release -p misp-cli`) and Python 3 (no torch). Run
from the repository root:
    python bench/memory/check.py --dir out/llava-7b-slice [--settings batched,ckpt1]
    python bench/memory/check.py --dir out/qwen-small --settings batched,group1,ckpt1,ckpt2
A setting is one of: batched, group1, ckpt1, ckpt2, ckpt1-chunk16, ckpt1-nodrop.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETTINGS = {
    "batched": [],
    "group1": ["sequence_group=1"],
    "ckpt1": ["gradient_checkpointing=true", "sequence_group=1"],
    "ckpt2": ["gradient_checkpointing=true", "sequence_group=2"],
    "ckpt1-chunk16": ["gradient_checkpointing=true", "sequence_group=1", "logprob_chunk=16"],
    "ckpt1-nodrop": ["gradient_checkpointing=true", "sequence_group=1", "lora_dropout=0.0"],
}

ap = argparse.ArgumentParser()
ap.add_argument("--dir", required=True, help="folder written by make_llava_7b_shaped.py")
ap.add_argument("--settings", default="ckpt1,ckpt2,ckpt1-nodrop")
ap.add_argument("--misp", default=os.path.join(ROOT, "target", "release", "misp"))
ap.add_argument("--reuse", action="store_true",
                help="report a setting's earlier run (its check-* folder has two steps) instead of running it again")
args = ap.parse_args()

d = os.path.abspath(args.dir)
cfg = json.load(open(os.path.join(d, "model", "config.json")))
rec = json.loads(open(os.path.join(d, "records.jsonl")).readline())
image_flags = []
if cfg.get("model_type") == "qwen2_5_vl":
    # Counted by make_qwen_small.py with transformers' processor.
    shape = json.load(open(os.path.join(d, "shape.json")))
    tokens, response = shape["tokens"], shape["response_tokens"]
    image_flags = ["--image", "{}x{}".format(*shape["image"])]
else:
    v = cfg["vision_config"]
    grid = v["image_size"] // v["patch_size"]
    # The template `USER: <image>\n{prompt} ASSISTANT:` in the word-level tokenizer: BOS, "USER",
    # ":", the image tokens, the prompt's words, "ASSISTANT", ":"; the response's words and EOS.
    prompt = 1 + 2 + grid * grid + len(rec["prompt"].split()) + 2
    response = len(rec["chosen"].split()) + 1
    tokens = prompt + response

rows = []
for name in args.settings.split(","):
    sets = SETTINGS[name]
    out = os.path.join(d, f"check-{name}")
    metrics = os.path.join(out, "metrics.jsonl")
    done = os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= 2
    cmd = [args.misp, "train", "--config", os.path.join(ROOT, "configs", "misp.toml"),
           "--model", os.path.join(d, "model"), "--data", os.path.join(d, "records.jsonl"),
           "--negatives", os.path.join(d, "negatives.jsonl"), "--pool", os.path.join(d, "pool"),
           "--out", out, "--kernels", "generic", "--quiet",
           "--set", 'dtype="bf16"', "--set", "batch_size=1", "--set", "micro_batch_size=1",
           "--set", "max_steps=2", "--set", "epochs=2"]
    for s in sets:
        cmd += ["--set", s]
    if not (args.reuse and done):
        subprocess.run(["rm", "-rf", out], check=True)
        env = dict(os.environ, MISP_RETURN_FREED_MEMORY="1")
        subprocess.run(cmd, check=True, env=env)
    # The second step: the reference values are cached by then, and the process's one-time
    # buffers (thread pools, gemm's packing space) exist, so the step's own memory is what is
    # left; the first step's peak is reported beside it.
    lines = open(os.path.join(out, "metrics.jsonl")).read().splitlines()
    first, m = json.loads(lines[0]), json.loads(lines[1])
    flags = ["--model-config", os.path.join(d, "model", "config.json"), "--tokens", str(tokens),
             "--sequences", "5", "--response-tokens", str(response), "--json"] + image_flags
    opts = dict(s.split("=") for s in sets)
    if opts.get("gradient_checkpointing") == "true":
        flags.append("--checkpointing")
    if "sequence_group" in opts:
        flags += ["--sequence-group", opts["sequence_group"]]
    if "logprob_chunk" in opts:
        flags += ["--logprob-chunk", opts["logprob_chunk"]]
    if opts.get("lora_dropout") == "0.0":
        flags.append("--no-lora-dropout")
    pred = json.loads(subprocess.run([args.misp, "bench", "memory"] + flags, check=True,
                                     capture_output=True, text=True).stdout.strip().splitlines()[-1])
    mib = 1 << 20
    persistent = sum(i["bytes"] for i in pred["persistent"])
    grad_sum = next(i["bytes"] for i in pred["persistent"] if i["name"].startswith("LoRA")) / 4
    # The micro-batch's pixels are read during the step (after its start's RSS is taken); for
    # LLaVA they are 7 MB, for Qwen2.5-VL's 640 x 480 photos 35 MiB.
    pixels = next(i["bytes"] for i in pred["persistent"] if i["name"].startswith("pixels"))
    peak_phase = max(pred["phases"], key=lambda p: sum(i["bytes"] for i in p["items"]))
    step_pred = sum(i["bytes"] for i in peak_phase["items"]) + grad_sum + pixels
    measured_peak = m["memory/step_peak_rss_mib"]
    step_meas = measured_peak - m["memory/rss_at_step_start_mib"]
    step_seconds = m.get("step_seconds", float("nan"))
    rows.append((name, pred["peak_bytes"] / mib, max(measured_peak, first["memory/step_peak_rss_mib"]),
                 step_pred / mib, step_meas, peak_phase["name"], step_seconds))

print(f"\n{d}: {cfg['text_config']['num_hidden_layers']} layers, hidden {cfg['text_config']['hidden_size']}; "
      f"5 sequences x {tokens} tokens ({response} scored); bf16, generic kernels, CPU")
print("| setting | predicted peak MiB | measured peak MiB (either step) | ratio | predicted step MiB | measured step MiB (step 2) | ratio | peak phase | step 2 s |")
print("|---|---|---|---|---|---|---|---|---|")
for name, pp, mp, ps, ms, phase, secs in rows:
    print(f"| {name} | {pp:.0f} | {mp:.0f} | {mp / pp:.3f} | {ps:.0f} | {ms:.0f} | {ms / ps:.3f} | {phase} | {secs:.2f} |")
