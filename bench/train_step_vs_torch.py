"""Records/s of a MISP-DPO training step: `misp train` against the same step written with
transformers + peft + torch, CPU, same threads, same data, in one run.

Prints step throughput (records/s) of both sides on a small config and misp / torch, plus misp's
epoch 1 and epoch 2 step times (epoch 2 reads the cached reference log-probs) and torch's untimed
reference pass.

The model is a random LlavaForConditionalGeneration in HF layout (as in
`lora_step_vs_transformers.py`): CLIP tower hidden 128, 4 layers, 64 px, patch 8 (64 image
tokens); LLaMA hidden 256, 4 layers, 4 heads, intermediate 688, vocab 512 with `<image>` = 511
in a small Llama-style BPE tokenizer whose vocabulary holds every word of a small word list as
one token. The data set is written the way `misp embed` / `misp mine` would leave it:
  - `--records` TRL-style records (random-noise 64 x 64 PNG, a prompt of 8 words starting with `the`, chosen and
    rejected responses of exactly `--seq-text` tokens each, so every record has the same
    sequence lengths: prompt = BOS + template + 64 image tokens, response = text + EOS);
  - a pool of random-noise PNGs with `ids.jsonl`;
  - a negatives file giving every record K = 3 pool negatives of strategy `misp` with a
    proposal probability `q` (so `configs/misp.toml`'s `expect_strategies` is met and the
    importance-sampling estimator of Eq. 8 is on).
Both sides use the same ids (the Python side encodes with the checkpoint's tokenizer.json the
way `crates/misp/src/model/llava/processor.rs` does), the same images and the same settings: LoRA r 64,
alpha 128, dropout 0.05 on q,k,v,o,gate,up,down of the language model, beta 0.5, lambda 1,
AdamW lr 1e-5 / weight decay 0.05, cosine schedule with warmup 0.1, clipping 1.0, effective
batch `--batch-size` records accumulated over micro-batches of `--micro-batch-size` records.

What one step is, on both sides (`crates/misp/src/train/step.rs`, `run.rs`): for every
micro-batch, the K + 2 sequences of each record (y_p | m_p, y_p | each negative, y_n | m_p) in
one batched forward in training mode (right-padded; here all the same length), the summed
response log-probs (response tokens + EOS), the reference log-probs from a cache, the MISP-DPO
loss of Eq. 10 with the importance-sampled image term (value of Eq. 6, gradient of Eq. 8),
`sum(per_record) / batch` backward (gradient accumulation), then global-norm clipping to 1.0 and
one AdamW step.

What is timed:
  - torch: the reference log-probs of every record are computed beforehand (LoRA disabled,
    eval mode, no grad) and not timed. One warm-up micro-batch (forward, backward, clip, AdamW
    step) is run, then one epoch over the `--records` records; each optimiser step is timed
    from the start of its first micro-batch to the end of `optimizer.step()`, and records/s =
    records / sum of the step times (the epoch's wall time is printed too).
  - misp: `misp train --config configs/misp.toml ... --set epochs=2`. Epoch 1 computes and
    caches the reference values; epoch 2 reads them from the cache, so epoch 2 is the one
    compared. The trainer times each optimiser step the same way (start of its first
    micro-batch to the end of the AdamW step; metrics writing and checkpoints are outside) and
    writes `tokens_per_s` = policy tokens of the step / its seconds into `OUT/metrics.jsonl`.
    Every record has the same number of policy tokens T = (K+2) P + (K+1) |y_p| + |y_n|, so a
    step's seconds = records * T / tokens_per_s; records/s = records of epoch 2 / the sum of
    its steps' seconds. The per-epoch wall times of `OUT/report.md` (0.1 s resolution,
    including the metrics lines and, for the last epoch, the final checkpoint) are printed
    beside the derived sums as a check.

Needs: a release build (`cargo build --release -p misp-cli`; `--misp` names another binary) and
torch 2.15.0, transformers 5.24.0, peft 0.21.2: run it from the repository root in the
reference venv made by bench/setup-reference-env.sh (pins in bench/requirements.txt):
    python bench/train_step_vs_torch.py --threads 1
    python bench/train_step_vs_torch.py --threads 1 --records 4 --batch-size 2 \
        --micro-batch-size 1          # a quick smoke run
Figures and the machine they were measured on: bench/README.md.
"""

import argparse
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import peft
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          get_cosine_schedule_with_warmup)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--records", type=int, default=32)
ap.add_argument("--batch-size", type=int, default=8, help="records per optimiser step")
ap.add_argument("--micro-batch-size", type=int, default=2, help="records per forward")
ap.add_argument("--seq-text", type=int, default=32, help="text tokens per response (EOS not counted)")
ap.add_argument("--pool", type=int, default=16, help="pool images")
ap.add_argument("--misp", default=os.path.join(ROOT, "target", "release", "misp"))
ap.add_argument("--config", default=os.path.join(ROOT, "configs", "misp.toml"))
ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
args = ap.parse_args()
if args.micro_batch_size > args.batch_size:
    raise SystemExit("--micro-batch-size must not exceed --batch-size")
torch.set_num_threads(args.threads)
torch.manual_seed(0)
rng = np.random.default_rng(0)

K = 3
RANK, ALPHA, DROPOUT = 64, 128.0, 0.05
BETA, LAMBDA, LR, WD, WARMUP, CLIP = 0.5, 1.0, 1e-5, 0.05, 0.1, 1.0
VOCAB, IMAGE, BOS, EOS, PAD = 512, 511, 1, 2, 0
TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"  # misp's DEFAULT_TEMPLATE
WORDS = ("the a red blue green cat dog car sun moon tree man sky sea two one big small on in is "
         "are there and with near table chair flag cup box road park bird fish door wall hat "
         "ball tall old new left right top").split()

work = tempfile.mkdtemp(prefix="misp-bench-train-")
ckpt = os.path.join(work, "llava-small-random")
data_dir = os.path.join(work, "data")
pool_dir = os.path.join(work, "pool")
out_dir = os.path.join(work, "out")
for d in (ckpt, os.path.join(data_dir, "images"), os.path.join(pool_dir, "images")):
    os.makedirs(d, exist_ok=True)

# ---------------------------------------------------------------------------------------------
# 1. Checkpoint and tokenizer.
cfg = LlavaConfig(
    vision_config=CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                   num_attention_heads=4, image_size=64, patch_size=8),
    text_config=LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB,
                            max_position_embeddings=1024, bos_token_id=BOS, eos_token_id=EOS,
                            pad_token_id=PAD),
    image_token_index=IMAGE, image_seq_length=64, vision_feature_layer=-2,
    vision_feature_select_strategy="default", projector_hidden_act="gelu",
)
base = LlavaForConditionalGeneration(cfg).eval()
base.save_pretrained(ckpt)
n_img = cfg.image_seq_length

# A Llama-style BPE (Metaspace, BOS by the post-processor) trained on the word list and the
# template, padded so `<image>` lands on 511.
corpus = [" ".join(rng.permutation(WORDS)) for _ in range(50)] + ["USER: \nthe ASSISTANT:"] * 50
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=IMAGE, show_progress=False,
                                                    special_tokens=["<unk>", "<s>", "</s>"]))
tok.add_tokens([f"<extra_{i}>" for i in range(IMAGE - tok.get_vocab_size())])
tok.add_special_tokens(["<image>"])
assert tok.token_to_id("<image>") == IMAGE
tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
tok.save(os.path.join(ckpt, "tokenizer.json"))
tok = Tokenizer.from_file(os.path.join(ckpt, "tokenizer.json"))  # what misp reads
WORDS = [w for w in WORDS if tok.token_to_id("\u2581" + w) is not None]
assert len(WORDS) >= 20, f"only {len(WORDS)} words are single tokens"


def prompt_ids(prompt):
    """misp's `LlavaProcessor::prompt_ids`: template, encode with BOS, expand `<image>`."""
    out = []
    for i in tok.encode(TEMPLATE.replace("{prompt}", prompt), add_special_tokens=True).ids:
        out.extend([i] * n_img if i == IMAGE else [i])
    return out


def response_ids(text):
    """misp's `LlavaProcessor::response_ids`: no special tokens, then EOS."""
    return tok.encode(text, add_special_tokens=False).ids + [EOS]


def words(n):
    return " ".join(rng.choice(WORDS, n))


# ---------------------------------------------------------------------------------------------
# 2. Data: records, pool, negatives.
def noise_png(path):
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)


records, lengths = [], set()
with open(os.path.join(data_dir, "records.jsonl"), "w") as f:
    for i in range(args.records):
        rel = f"images/r{i:04d}.png"
        noise_png(os.path.join(data_dir, rel))
        rec = {"id": f"r{i:04d}", "image": rel, "prompt": "the " + words(7),
               "chosen": words(args.seq_text), "rejected": words(args.seq_text)}
        rec["_p"], rec["_c"], rec["_r"] = (prompt_ids(rec["prompt"]), response_ids(rec["chosen"]),
                                           response_ids(rec["rejected"]))
        assert 0 not in rec["_p"] + rec["_c"] + rec["_r"], "an <unk> token: extend the tokenizer corpus"
        lengths.add((len(rec["_p"]), len(rec["_c"]), len(rec["_r"])))
        f.write(json.dumps({k: v for k, v in rec.items() if not k.startswith("_")}) + "\n")
        records.append(rec)
if len(lengths) != 1:
    raise SystemExit(f"records differ in length {sorted(lengths)}: the misp step time derivation needs equal ones")
P, RC, RR = lengths.pop()
T_REC = (K + 2) * P + (K + 1) * RC + RR  # misp's policy tokens per record (step.rs `layout`)

pool_paths = []
with open(os.path.join(pool_dir, "ids.jsonl"), "w") as f:
    for j in range(args.pool):
        p = os.path.join(pool_dir, "images", f"p{j:04d}.png")
        noise_png(p)
        pool_paths.append(p)
        f.write(json.dumps({"id": f"p{j:04d}", "path": p}) + "\n")
with open(os.path.join(data_dir, "negatives.jsonl"), "w") as f:
    for rec in records:
        picks = rng.choice(args.pool, K, replace=False)
        q = rng.uniform(0.05, 0.5, K)
        rec["_neg"], rec["_q"] = [pool_paths[j] for j in picks], q.tolist()
        f.write(json.dumps({"id": rec["id"], "negatives": [
            {"image": f"p{j:04d}", "strategy": "misp", "score": 0.5, "recon": 0.1, "l1": 0.2,
             "q": float(qq)} for j, qq in zip(picks, q)]}) + "\n")

# ---------------------------------------------------------------------------------------------
# 3. torch side.
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def pixels(path):
    a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(((a - MEAN) / STD).transpose(2, 0, 1).copy())


for rec in records:
    pos = pixels(os.path.join(data_dir, rec["image"]))
    negs = [pixels(p) for p in rec["_neg"]]
    # The K + 2 sequences in misp's order: y_p | m_p, y_p | m_n^1..K, y_n | m_p.
    rec["_seqs"] = ([(rec["_c"], pos)] + [(rec["_c"], px) for px in negs] + [(rec["_r"], pos)])
    rec["_logq"] = torch.tensor(np.log(rec["_q"]), dtype=torch.float32)

targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
model = get_peft_model(base, PeftLoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                            target_modules=targets))
lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)


def batch(recs):
    """Right-padded ids, mask, pixels and response mask of the micro-batch's sequences."""
    seqs = [(rec["_p"], resp, px) for rec in recs for resp, px in rec["_seqs"]]
    L = max(len(p) + len(r) for p, r, _ in seqs)
    ids = torch.full((len(seqs), L), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    resp = torch.zeros((len(seqs), L), dtype=torch.float32)
    for i, (p, r, _) in enumerate(seqs):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, :len(p) + len(r)] = 1
        resp[i, len(p):len(p) + len(r)] = 1
    return ids, mask, torch.stack([px for _, _, px in seqs]), resp


def seq_logps(ids, mask, px, resp):
    """Summed log-probs of the response tokens (EOS included) of every sequence, [S]."""
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (lp * resp[:, 1:]).sum(-1)


def misp_dpo_per_record(lp, ref, log_q):
    """Eq. 10 per record, image term valued by Eq. 6 and differentiated by Eq. 8 (IS), as in
    crates/misp/src/objective.rs (all K negatives usable here). lp, ref: [R, K + 2]."""
    r = lp - ref
    r_c, r_neg, r_r = r[:, 0], r[:, 1:K + 1], r[:, K + 1]
    a = BETA * (r_neg - r_c[:, None])
    lse = torch.logsumexp(a, -1)
    value = F.softplus(lse).detach()
    w = torch.softmax(a.detach() - log_q, -1)
    coef = torch.sigmoid(lse).detach()
    surrogate = coef * (w * a).sum(-1)
    image = value + (surrogate - surrogate.detach())
    text = F.softplus(-BETA * (r_c - r_r))
    return image + LAMBDA * text


# Reference log-probs once, LoRA disabled, no dropout, no grad: not timed.
micro = args.micro_batch_size
t = time.perf_counter()
model.eval()
with torch.no_grad(), model.disable_adapter():
    for s in range(0, len(records), micro):
        chunk = records[s:s + micro]
        ref = seq_logps(*batch(chunk)).view(len(chunk), K + 2)
        for rec, row in zip(chunk, ref):
            rec["_ref"] = row.clone()
t_ref = time.perf_counter() - t

steps_per_epoch = math.ceil(len(records) / args.batch_size)
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD)
# One warm-up step (a single micro-batch) before the timed epoch; the schedule counts it.
total = steps_per_epoch + 1
sched = get_cosine_schedule_with_warmup(opt, math.ceil(WARMUP * total), total)
model.train()


def step(recs):
    """One optimiser step over `recs`, micro-batches of `micro`; returns the mean loss."""
    opt.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for s in range(0, len(recs), micro):
        chunk = recs[s:s + micro]
        lp = seq_logps(*batch(chunk)).view(len(chunk), K + 2)
        ref = torch.stack([rec["_ref"] for rec in chunk])
        log_q = torch.stack([rec["_logq"] for rec in chunk])
        loss = misp_dpo_per_record(lp, ref, log_q).sum() / len(recs)
        value = loss.item()
        if not math.isfinite(value):
            raise SystemExit("torch: non-finite loss")
        loss.backward()
        loss_sum += value
    torch.nn.utils.clip_grad_norm_(params, CLIP)
    opt.step()
    sched.step()
    return loss_sum


step(records[:micro])  # warm-up
order = rng.permutation(len(records))
step_times, losses = [], []
t_epoch = time.perf_counter()
for b in range(steps_per_epoch):
    recs = [records[i] for i in order[b * args.batch_size:(b + 1) * args.batch_size]]
    t = time.perf_counter()
    losses.append(step(recs))
    step_times.append(time.perf_counter() - t)
t_epoch = time.perf_counter() - t_epoch
hf = {"records_per_s": len(records) / sum(step_times), "seconds": sum(step_times),
      "wall": t_epoch, "ref_seconds": t_ref,
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "lora_params": lora_params}
attn = cfg.text_config._attn_implementation or "default"
del model, base, opt

# ---------------------------------------------------------------------------------------------
# 4. misp side.
for _ in range(12):  # the binary may be being rebuilt by someone else
    if os.path.isfile(args.misp):
        break
    print(f"{args.misp} missing, waiting...", file=sys.stderr)
    time.sleep(10)
sets = {"epochs": 2, "batch_size": args.batch_size, "micro_batch_size": micro, "k": K,
        "lora_r": RANK, "lora_alpha": ALPHA, "lora_dropout": DROPOUT, "beta": BETA, "lambda": LAMBDA,
        "lr": LR, "weight_decay": WD, "warmup_ratio": WARMUP, "max_grad_norm": CLIP,
        "importance_sampling": "true", "dtype": "f32", "checkpoint_every": 0, "seed": 0}
cmd = [args.misp, "train", "--config", args.config, "--model", ckpt,
       "--data", os.path.join(data_dir, "records.jsonl"),
       "--negatives", os.path.join(data_dir, "negatives.jsonl"), "--pool", pool_dir,
       "--out", out_dir, "--quiet"]
for key, value in sets.items():
    cmd += ["--set", f"{key}={value}"]
env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
t = time.perf_counter()
run = subprocess.run(cmd, env=env, capture_output=True, text=True)
t_misp_total = time.perf_counter() - t
if run.returncode != 0:
    raise SystemExit(f"misp train failed (exit {run.returncode}):\n{' '.join(cmd)}\n"
                     f"--- stdout\n{run.stdout}\n--- stderr\n{run.stderr}\n(files in {work})")
rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl")) if line.strip()]
if len(rows) != 2 * steps_per_epoch:
    raise SystemExit(f"misp wrote {len(rows)} metrics rows, expected {2 * steps_per_epoch}: {rows}")
if any(r.get("refused") for r in rows):
    raise SystemExit(f"misp refused a step: {rows}")
skipped = open(os.path.join(out_dir, "skipped.jsonl")).read().strip()
if skipped:
    raise SystemExit(f"misp skipped records:\n{skipped}")


def epoch_of(row):
    return (row["step"] - 1) // steps_per_epoch + 1


derived = {1: 0.0, 2: 0.0}
records_in = {1: 0, 2: 0}
for r in rows:
    derived[epoch_of(r)] += r["records"] * T_REC / r["tokens_per_s"]
    records_in[epoch_of(r)] += r["records"]
report = open(os.path.join(out_dir, "report.md")).read()
report_secs = {int(e): float(s) for e, s in re.findall(r"- epoch (\d+): ([\d.]+) s", report)}
misp = {"records_per_s": records_in[2] / derived[2], "seconds": derived[2],
        "epoch1_seconds": derived[1]}
misp_losses = [r["loss"] for r in rows]

if args.keep:
    print("files kept in", work)
else:
    shutil.rmtree(work)

# ---------------------------------------------------------------------------------------------
# 5. Report.
print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
      f"numpy {np.__version__}, python {platform.python_version()}, {platform.machine()}; "
      f"{args.threads} thread(s) (torch.set_num_threads / RAYON_NUM_THREADS); attention {attn}")
print(f"misp: {args.misp} --config {args.config}, {' '.join(f'{k}={v}' for k, v in sets.items())}")
print(f"config: {args.records} records, K = {K} negatives, batch {args.batch_size} records / "
      f"micro-batch {micro} ({(K + 2) * micro} sequences per forward), {steps_per_epoch} steps "
      f"per epoch; sequence = prompt {P} tokens ({n_img} image) + response {RC} (chosen) / "
      f"{RR} (rejected) tokens with EOS; {T_REC} policy tokens per record")
print(f"LoRA r {RANK} alpha {ALPHA:g} dropout {DROPOUT}: {hf['lora_params']} trainable parameters (torch)")
print(f"torch: reference pass (untimed) {hf['ref_seconds']:.2f} s; timed epoch: steps "
      f"{hf['seconds']:.2f} s, wall {hf['wall']:.2f} s; losses {[round(x, 4) for x in losses]}")
print(f"misp: epoch 1 (computes the reference) steps {misp['epoch1_seconds']:.2f} s "
      f"(report.md {report_secs.get(1, float('nan')):.1f} s), epoch 2 (cached reference) steps "
      f"{misp['seconds']:.2f} s (report.md {report_secs.get(2, float('nan')):.1f} s incl. final "
      f"checkpoint); whole process {t_misp_total:.1f} s; losses {[round(x, 4) for x in misp_losses]}")
print()
print(f"| threads | records/s transformers+peft+torch | records/s misp | ratio misp/torch |")
print(f"|---|---|---|---|")
ratio = misp["records_per_s"] / hf["records_per_s"]
print(f"| {args.threads} | {hf['records_per_s']:.3f} | {misp['records_per_s']:.3f} | {ratio:.2f} |")
print(f"\ntarget: ratio >= 1.0 -> {'met' if ratio >= 1.0 else 'NOT met'}")
print(f"peak RSS MiB of the Python process (torch side, data set-up included): {hf['peak_rss_mib']:.0f}")
