"""Peak memory and step time of one MISP-DPO training step, misp against transformers + peft with
gradient checkpointing, on the same checkpoint and record, CPU, in one run.

The folder is one made by bench/memory/make_llava_7b_shaped.py (the "7B-width slice":
`--layers 2`, LLaVA-1.5-7B's widths, random bf16 weights, one record with K = 3 negatives, so
K + 2 = 5 sequences of ~700 tokens).

  - misp: `misp train --config configs/misp.toml` with `gradient_checkpointing = true`,
    `sequence_group = 1`, bf16, `--kernels generic` (the graph a GPU runs) or `fused`, two
    optimiser steps on the one record; step 2 (the reference log-probs cached by then) is
    compared: `step_seconds` and `memory/step_peak_rss_mib` from OUT/metrics.jsonl, and the
    process's peak resident size (wait4's ru_maxrss).
  - transformers + peft: `LlavaForConditionalGeneration` in bf16, LoRA r 64 / alpha 128 /
    dropout 0.05 on the language model's q, k, v, o, gate, up and down projections (misp's
    defaults), `gradient_checkpointing_enable(use_reentrant=False)`, the five sequences in one
    right-padded batch as TRL's DPOTrainer concatenates them, the reference log-probs computed
    beforehand with the adapter disabled (not timed, as misp's are cached in step 2), the
    MISP-DPO loss of Eq. 10 (text DPO term + Plackett-Luce image term, importance weights 1),
    backward, clipping to 1.0 and an AdamW step. Two steps; step 2 is compared. Its step peak
    is VmHWM after resetting it (writing 5 to /proc/self/clear_refs) just before the step; the
    process peak is the child process's ru_maxrss, as for misp.

Run from the repository root in the reference venv (bench/setup-reference-env.sh), after
`cargo build --release -p misp-cli`:
    python bench/memory/make_llava_7b_shaped.py --layers 2 --out out/llava-7b-slice
    python bench/memory/slice_vs_peft.py --dir out/llava-7b-slice --threads 2
Figures and the machine they were measured on: bench/README.md.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"  # misp's default LLaVA-1.5 template
RANK, ALPHA, DROPOUT = 64, 128.0, 0.05
BETA, LAMBDA, LR, WD, CLIP = 0.5, 1.0, 1e-5, 0.05, 1.0


def vm(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def torch_side(d, threads, steps, device):
    """Runs the transformers + peft step in this process; prints one JSON line."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model_dir = os.path.join(d, "model")
    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16).to(device)
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                     target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    model = get_peft_model(model, cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()

    rec = json.loads(open(os.path.join(d, "records.jsonl")).readline())
    neg = json.loads(open(os.path.join(d, "negatives.jsonl")).readline())["negatives"]
    pool = {json.loads(l)["id"]: json.loads(l)["path"] for l in open(os.path.join(d, "pool", "ids.jsonl"))}
    positive = Image.open(os.path.join(d, rec["image"])).convert("RGB")
    negatives = [Image.open(pool[n["image"]]).convert("RGB") for n in neg]
    prompt = TEMPLATE.format(prompt=rec["prompt"])
    eos = processor.tokenizer.eos_token_id
    # (response, image) of the K + 2 sequences: y_p | m_p, y_p | each negative, y_n | m_p.
    pairs = [(rec["chosen"], positive)] + [(rec["chosen"], n) for n in negatives] + [(rec["rejected"], positive)]
    ids, masks, pixels = [], [], []
    for response, image in pairs:
        p = processor(images=image, text=prompt, return_tensors="pt")
        r = processor.tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
        ids.append(torch.cat([p["input_ids"][0], torch.tensor(r)]))
        masks.append(torch.cat([torch.zeros(p["input_ids"].shape[1]), torch.ones(len(r))]))
        pixels.append(p["pixel_values"][0])
    T = max(len(x) for x in ids)
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.full((len(ids), T), pad, dtype=torch.long)
    attention = torch.zeros((len(ids), T), dtype=torch.long)
    scored = torch.zeros((len(ids), T))
    for i, (x, m) in enumerate(zip(ids, masks)):
        input_ids[i, : len(x)], attention[i, : len(x)], scored[i, : len(x)] = x, 1, m
    pixel_values = torch.stack(pixels).to(device, torch.bfloat16)
    input_ids, attention, scored = input_ids.to(device), attention.to(device), scored.to(device)

    def response_logps():
        out = model(input_ids=input_ids, attention_mask=attention, pixel_values=pixel_values)
        logits = out.logits[:, :-1].float()
        target = input_ids[:, 1:]
        lp = torch.gather(F.log_softmax(logits, -1), 2, target.unsqueeze(-1)).squeeze(-1)
        return (lp * scored[:, 1:]).sum(-1)

    model.eval()
    with torch.no_grad(), model.disable_adapter():
        ref = response_logps()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD)
    rows = []
    for step in range(steps):
        model.train()
        open("/proc/self/clear_refs", "w").write("5")
        start_rss = vm("VmRSS:")
        if device != "cpu":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        lp = response_logps()
        delta = BETA * (lp - ref)  # implicit rewards of the five sequences
        text = -F.logsigmoid(delta[0] - delta[-1])
        # Plackett-Luce with the true image ranked first over the K negatives (Eq. 6, K >= 1).
        image = -(delta[0] - torch.logsumexp(delta[:-1], 0))
        loss = image + LAMBDA * text
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device != "cpu":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        row = {"step_seconds": seconds, "step_peak_rss_mib": vm("VmHWM:"),
               "rss_at_step_start_mib": start_rss, "loss": float(loss.detach())}
        if device != "cpu":
            row["gpu_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
            row["gpu_peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
        rows.append(row)
    tokens = int(attention.sum())
    print(json.dumps({"steps": rows, "policy_tokens": tokens, "sequences": len(ids), "padded_len": T}))


def gpu_used_mib():
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return float(out.split()[0])


def run_child(cmd, env=None):
    """Runs a command, returns (stdout, the child's own peak resident size in MiB)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed with status {p.returncode}")
    return out, usage.ru_maxrss / 1024.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="folder written by make_llava_7b_shaped.py")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--kernels", default="generic", choices=["generic", "fused"])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bench/gpu/check.sh)")
    ap.add_argument("--json-out", help="also write the figures to this JSON file")
    ap.add_argument("--misp", default=os.path.join(ROOT, "target", "release", "misp"))
    ap.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    d = os.path.abspath(args.dir)
    if args.torch_child:
        torch_side(d, args.threads, args.steps, args.device)
        return

    # Each side in its own child, one after the other; wait4 gives each child's own peak.
    t_out, t_peak = run_child([sys.executable, os.path.abspath(__file__), "--dir", d,
                               "--threads", str(args.threads), "--steps", str(args.steps),
                               "--device", args.device, "--torch-child"])
    torch_res = json.loads(t_out.strip().splitlines()[-1])

    out = os.path.join(d, "vs-peft-misp")
    subprocess.run(["rm", "-rf", out], check=True)
    cmd = [args.misp, "train", "--config", os.path.join(ROOT, "configs", "misp.toml"),
           "--model", os.path.join(d, "model"), "--data", os.path.join(d, "records.jsonl"),
           "--negatives", os.path.join(d, "negatives.jsonl"), "--pool", os.path.join(d, "pool"),
           "--out", out, "--kernels", args.kernels, "--device", args.device, "--quiet",
           "--set", 'dtype="bf16"', "--set", "batch_size=1", "--set", "micro_batch_size=1",
           "--set", f"max_steps={args.steps}", "--set", f"epochs={args.steps}",
           "--set", "gradient_checkpointing=true", "--set", "sequence_group=1"]
    poll = None
    if args.device != "cpu":
        # misp's GPU memory: the device's used memory polled every 100 ms while it runs, less
        # what was in use before (nvidia-smi; candle has no allocator statistics).
        base = gpu_used_mib()
        poll = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                 "-lms", "100"], stdout=subprocess.PIPE, text=True)
    _, m_peak = run_child(cmd, env=dict(os.environ, RAYON_NUM_THREADS=str(args.threads)))
    m_gpu = None
    if poll is not None:
        poll.terminate()
        used = [float(x) for x in poll.communicate()[0].split() if x.strip()]
        m_gpu = max(used) - base if used else float("nan")
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    m = lines[-1]

    t = torch_res["steps"][-1]
    print(f"\n{d}: 5 sequences, {torch_res['policy_tokens']} policy tokens (padded to "
          f"{torch_res['padded_len']}); bf16, CPU, {args.threads} threads, step {args.steps} compared")
    print("| side | step s | steps/s ratio (misp/torch) | step peak RSS MiB | process peak RSS MiB |")
    print("|---|---|---|---|---|")
    print(f"| transformers + peft, gradient checkpointing, batched | {t['step_seconds']:.1f} | | "
          f"{t['step_peak_rss_mib']:.0f} | {t_peak:.0f} |")
    print(f"| misp {args.kernels}, gradient_checkpointing, sequence_group 1 | {m['step_seconds']:.1f} | "
          f"{t['step_seconds'] / m['step_seconds']:.2f} | {m['memory/step_peak_rss_mib']:.0f} | {m_peak:.0f} |")
    if m_gpu is not None:
        print(f"GPU memory, whole run: transformers + peft peak allocated {t['gpu_peak_allocated_mib']:.0f} MiB "
              f"(reserved {t['gpu_peak_reserved_mib']:.0f}); misp peak used {m_gpu:.0f} MiB (nvidia-smi, 100 ms polls)")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"torch": torch_res, "torch_process_peak_rss_mib": t_peak, "misp": lines,
                       "misp_process_peak_rss_mib": m_peak, "misp_gpu_peak_used_mib": m_gpu,
                       "device": args.device, "threads": args.threads}, f, indent=1)


if __name__ == "__main__":
    main()
