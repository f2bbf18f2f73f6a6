"""Tokens/s of a LoRA training step and of greedy generation: `misp bench model` against
transformers + peft on the same checkpoint, CPU, same threads, in one run.

Prints forward+backward tokens/s of a LoRA step on a small LLaVA (LLaMA 4 layers, hidden 256; 64
image tokens; batch 5) and greedy generation tokens/s for both sides, their ratios misp /
transformers, and each process's peak RSS.

The model is a random LlavaForConditionalGeneration: CLIP tower hidden 128, 4 layers, 64 px,
patch 8 (8 x 8 = 64 image tokens after the CLS is dropped); LLaMA hidden 256, 4 layers, 4
heads, intermediate 688, vocab 512 with `<image>` = 511 in a small Llama-style tokenizer (saved
with the checkpoint so it is a complete one; the timing inputs are random ids). Both sides:
  - train: `--batch` sequences of `--seq-len` tokens (BOS, 64 image tokens, random text), one
    image each; LoRA r 64, alpha 128, dropout 0.05 on q,k,v,o,gate,up,down of the language
    model only, training mode; the summed log-prob of the second half of every sequence,
    backward into the adapters. No optimiser step.
  - generate: `--gen-batch` prompts of `--prompt-len` tokens, greedy with the KV cache, exactly
    `--new-tokens` new tokens per row (transformers: `min_new_tokens`; misp: no EOS).
  Each figure is the fastest of `--repeat` runs after one warm-up; tokens/s counts all tokens
  of the batch (train) or the new tokens (generate, prefill included in the time).

Needs: a release build (`cargo build --release -p misp-cli`; `--misp` names another binary) and
torch 2.15.0, transformers 5.24.0, peft 0.21.2: run it from the repository root in the
reference venv made by bench/setup-reference-env.sh (pins in bench/requirements.txt):
    python bench/lora_step_vs_transformers.py [--seq-len 256] [--threads 2] [--repeat 3]
Figures and the machine they were measured on: bench/README.md.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import time

import peft
import torch
import transformers
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=5)
ap.add_argument("--seq-len", type=int, default=256)
ap.add_argument("--gen-batch", type=int, default=5)
ap.add_argument("--prompt-len", type=int, default=96)
ap.add_argument("--new-tokens", type=int, default=32)
ap.add_argument("--rank", type=int, default=64)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--repeat", type=int, default=3)
ap.add_argument("--misp", default=os.path.join(ROOT, "target", "release", "misp"))
ap.add_argument("--keep", action="store_true", help="keep the checkpoint folder")
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)

VOCAB, IMAGE, BOS, EOS, PAD = 512, 511, 1, 2, 0
work = tempfile.mkdtemp(prefix="misp-bench-model-")
ckpt = os.path.join(work, "llava-small-random")

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

# A Llama-style BPE (Metaspace, BOS by the post-processor) padded so `<image>` lands on 511.
corpus = ["USER: What is in the image? ASSISTANT: A red circle and a blue square.",
          "Is there a dog in the picture? Yes, there is a dog next to the table.",
          "Describe the scene. The astronaut stands on the moon with a flag."] * 20
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

n_img = cfg.image_seq_length
gen = torch.Generator().manual_seed(0)


def sequences(n, length):
    """BOS, the image tokens, random text ids (not special, not `<image>`)."""
    text = torch.randint(3, IMAGE, (n, length - 1 - n_img), generator=gen)
    head = torch.tensor([BOS] + [IMAGE] * n_img).expand(n, -1)
    return torch.cat([head, text], 1)


def best_of(f):
    f()
    times = []
    for _ in range(max(args.repeat, 1)):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
model = get_peft_model(base, PeftLoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05,
                                            target_modules=targets))
lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

# 1. LoRA forward + backward.
b, t = args.batch, args.seq_len
ids = sequences(b, t)
mask = torch.ones_like(ids)
labels = (torch.arange(t) >= t // 2).float().expand(b, -1)
pixels = torch.rand(b, 3, 64, 64, generator=gen) * 3 - 1.5
model.train()


def train_step():
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    (lp * labels[:, 1:]).sum().backward()
    model.zero_grad(set_to_none=True)


t_train = best_of(train_step)

# 2. Greedy generation, every row forced to the same length.
model.eval()
gids = sequences(args.gen_batch, args.prompt_len)
gpix = torch.rand(args.gen_batch, 3, 64, 64, generator=gen) * 3 - 1.5


def generate():
    with torch.no_grad():
        out = model.generate(input_ids=gids, attention_mask=torch.ones_like(gids), pixel_values=gpix,
                             max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                             do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    assert out.shape[1] - gids.shape[1] == args.new_tokens, out.shape


t_gen = best_of(generate)
hf = {
    "train_tokens_per_s": b * t / t_train, "train_seconds": t_train,
    "generate_tokens_per_s": args.gen_batch * args.new_tokens / t_gen, "generate_seconds": t_gen,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "lora_params": lora_params,
}
del model, base

cmd = [args.misp, "bench", "model", "--model", ckpt, "--batch", str(b), "--seq-len", str(t),
       "--gen-batch", str(args.gen_batch), "--prompt-len", str(args.prompt_len),
       "--new-tokens", str(args.new_tokens), "--rank", str(args.rank), "--repeat", str(args.repeat),
       "--json"]
env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
run = subprocess.run(cmd, env=env, capture_output=True, text=True)
if run.returncode != 0:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr}")
print(run.stdout.rstrip())
misp = json.loads(run.stdout.strip().splitlines()[-1])
if not args.keep:
    shutil.rmtree(work)
else:
    print("checkpoint kept in", ckpt)

print()
print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
      f"python {platform.python_version()}, {args.threads} threads, attention "
      f"{cfg.text_config._attn_implementation or 'default'}")
print(f"LoRA params: transformers {hf['lora_params']}, misp {misp['lora_params']}")
print(f"{'':34}{'transformers':>14}{'misp':>12}{'ratio':>9}")
for key, label, target in [
    ("train_tokens_per_s", f"fwd+bwd tokens/s ({b} x {t})", 1.0),
    ("generate_tokens_per_s", f"generate tokens/s ({args.gen_batch} x {args.new_tokens} new)", 1.0),
]:
    ratio = misp[key] / hf[key]
    print(f"{label:34}{hf[key]:14.1f}{misp[key]:12.1f}{ratio:9.2f}  (target >= {target})")
print(f"{'peak RSS MiB (whole process)':34}{hf['peak_rss_mib']:14.1f}{misp['peak_rss_mib']:12.1f}")
