"""Tokens/s of a LoRA training step and of greedy generation: `misp bench model` against
transformers + peft on the same checkpoint, CPU, same threads, in one run.

Prints forward+backward tokens/s of a LoRA step on a small vision-language model (batch 5) and
greedy generation tokens/s for both sides, their ratios misp / transformers, and each process's
peak RSS. `--arch` picks the model, a random checkpoint of bench size:

  llava (default): LlavaForConditionalGeneration: CLIP tower hidden 128, 4 layers, 64 px, patch
    8 (8 x 8 = 64 image tokens after the CLS is dropped); LLaMA hidden 256, 4 layers, 4 heads,
    intermediate 688, vocab 512 with `<image>` = 511 in a small Llama-style tokenizer (saved with
    the checkpoint so it is a complete one; the timing inputs are random ids).
  qwen2_5_vl: Qwen2_5_VLForConditionalGeneration: vision tower 4 blocks (block 3 full attention,
    blocks 0-2 windowed, window_size 112 px = 4 x 4 merge units), hidden 128, 4 heads, SwiGLU
    512, patch 14, temporal patch 2, merge 2; one `--image-size` 224 px image per sequence
    (16 x 16 patches, four windows, 64 merged image tokens) given as random processed patches;
    Qwen2 hidden 256, 4 layers, 4 query heads over 2 key/value heads (GQA, head_dim 64),
    intermediate 688, mrope_section [8, 12, 12] (the 7B's [16, 24, 24] for half its head_dim),
    vocab 512 (`<|vision_start|>` 508, `<|vision_end|>` 509, `<|video_pad|>` 510, `<|image_pad|>`
    511). No tokenizer: neither side reads one here. transformers gets `mm_token_type_ids`, as
    its processor gives them, so both sides use the multimodal positions.
Both sides, both models:
  - train: `--batch` sequences of `--seq-len` tokens (a first token, the image tokens, random
    text), one image each; LoRA r 64, alpha 128, dropout 0.05 on q,k,v,o,gate,up,down of the
    language model only, training mode; the summed log-prob of the second half of every
    sequence, backward into the adapters. No optimiser step.
  - generate: `--gen-batch` prompts of `--prompt-len` tokens, greedy with the KV cache, exactly
    `--new-tokens` new tokens per row (transformers: `min_new_tokens`; misp: no EOS).
  Each figure is the fastest of `--repeat` runs after one warm-up; tokens/s counts all tokens
  of the batch (train) or the new tokens (generate, prefill included in the time).

Needs: a release build (`cargo build --release -p misp-cli`; `--misp` names another binary) and
torch 2.15.0, transformers 5.24.0, peft 0.21.2: run it from the repository root in the
reference venv made by bench/setup-reference-env.sh (pins in bench/requirements.txt):
    python bench/lora_step_vs_transformers.py [--arch qwen2_5_vl] [--threads 2] [--repeat 3]
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

# torch's OpenMP threads spin while they wait by default; on cores shared with other work that
# made torch several times slower (bench/README.md, the POPE notes), which flatters misp. Passive
# unless the caller says otherwise; set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig as PeftLoraConfig  # noqa: E402
from peft import get_peft_model  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ap = argparse.ArgumentParser()
ap.add_argument("--arch", choices=["llava", "qwen2_5_vl"], default="llava")
ap.add_argument("--batch", type=int, default=5)
ap.add_argument("--seq-len", type=int, default=256)
ap.add_argument("--gen-batch", type=int, default=5)
ap.add_argument("--prompt-len", type=int, default=96)
ap.add_argument("--new-tokens", type=int, default=32)
ap.add_argument("--rank", type=int, default=64)
ap.add_argument("--image-size", type=int, default=224,
                help="qwen2_5_vl: the image's side in pixels, a multiple of 28 (224: 64 image tokens)")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--repeat", type=int, default=3)
ap.add_argument("--misp", default=os.path.join(ROOT, "target", "release", "misp"))
ap.add_argument("--keep", action="store_true", help="keep the checkpoint folder")
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)

VOCAB, IMAGE, BOS, EOS, PAD = 512, 511, 1, 2, 0
work = tempfile.mkdtemp(prefix="misp-bench-model-")
gen = torch.Generator().manual_seed(0)


def llava_checkpoint(ckpt):
    """The random LLaVA saved to `ckpt` with its tokenizer; (model, image tokens per sequence,
    images(n) -> the forward's image arguments, misp's extra arguments)."""
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
    model = LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(ckpt)

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

    def images(n):
        return {"pixel_values": torch.rand(n, 3, 64, 64, generator=gen) * 3 - 1.5}

    return model, cfg.image_seq_length, images, []


def qwen_checkpoint(ckpt):
    """The random Qwen2.5-VL of the docstring saved to `ckpt`; as `llava_checkpoint`."""
    if args.image_size % 28 or args.image_size <= 0:
        raise SystemExit(f"--image-size {args.image_size}: expected a positive multiple of 28")
    cfg = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": VOCAB, "hidden_size": 256, "intermediate_size": 688,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "tie_word_embeddings": False, "bos_token_id": BOS, "eos_token_id": EOS,
            "pad_token_id": PAD,
            "rope_parameters": {"rope_type": "default", "type": "mrope",
                                "mrope_section": [8, 12, 12], "rope_theta": 1000000.0},
        },
        vision_config={
            "depth": 4, "hidden_size": 128, "intermediate_size": 512, "num_heads": 4,
            "in_channels": 3, "out_hidden_size": 256, "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [3],
            "hidden_act": "silu",
        },
        image_token_id=IMAGE, video_token_id=IMAGE - 1, vision_start_token_id=IMAGE - 3,
        vision_end_token_id=IMAGE - 2, tie_word_embeddings=False,
    )
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(ckpt)
    grid = args.image_size // 14
    patch_dim = 3 * 2 * 14 * 14

    def images(n):
        # What Qwen2VLImageProcessor hands the model: every image's patches, flattened.
        return {"pixel_values": torch.rand(n * grid * grid, patch_dim, generator=gen) * 3 - 1.5,
                "image_grid_thw": torch.tensor([[1, grid, grid]] * n)}

    return model, (grid // 2) ** 2, images, ["--image-size", str(args.image_size)]


ckpt = os.path.join(work, f"{args.arch}-small-random")
base, n_img, image_inputs, misp_args = (qwen_checkpoint if args.arch == "qwen2_5_vl"
                                        else llava_checkpoint)(ckpt)


def sequences(n, length):
    """BOS, the image tokens, random text ids (not special, not `<image>`), and the forward's
    token arguments (Qwen2.5-VL's multimodal positions need to know which tokens are image's)."""
    text = torch.randint(3, IMAGE, (n, length - 1 - n_img), generator=gen)
    head = torch.tensor([BOS] + [IMAGE] * n_img).expand(n, -1)
    ids = torch.cat([head, text], 1)
    extra = {"mm_token_type_ids": (ids == IMAGE).int()} if args.arch == "qwen2_5_vl" else {}
    return ids, extra


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
ids, ids_extra = sequences(b, t)
mask = torch.ones_like(ids)
labels = (torch.arange(t) >= t // 2).float().expand(b, -1)
pixels = image_inputs(b)
model.train()


def train_step():
    logits = model(input_ids=ids, attention_mask=mask, **pixels, **ids_extra).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    (lp * labels[:, 1:]).sum().backward()
    model.zero_grad(set_to_none=True)


t_train = best_of(train_step)

# 2. Greedy generation, every row forced to the same length.
model.eval()
gids, gids_extra = sequences(args.gen_batch, args.prompt_len)
gpix = image_inputs(args.gen_batch)


def generate():
    with torch.no_grad():
        out = model.generate(input_ids=gids, attention_mask=torch.ones_like(gids), **gpix, **gids_extra,
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
attention = base.config.text_config._attn_implementation or "default"
del model, base

cmd = [args.misp, "bench", "model", "--model", ckpt, "--batch", str(b), "--seq-len", str(t),
       "--gen-batch", str(args.gen_batch), "--prompt-len", str(args.prompt_len),
       "--new-tokens", str(args.new_tokens), "--rank", str(args.rank), "--repeat", str(args.repeat),
       "--json", *misp_args]
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
      f"{attention}, {args.arch}, OMP_WAIT_POLICY {os.environ['OMP_WAIT_POLICY']}")
print(f"LoRA params: transformers {hf['lora_params']}, misp {misp['lora_params']}")
print(f"{'':34}{'transformers':>14}{'misp':>12}{'ratio':>9}")
for key, label, target in [
    ("train_tokens_per_s", f"fwd+bwd tokens/s ({b} x {t})", 1.0),
    ("generate_tokens_per_s", f"generate tokens/s ({args.gen_batch} x {args.new_tokens} new)", 1.0),
]:
    ratio = misp[key] / hf[key]
    print(f"{label:34}{hf[key]:14.1f}{misp[key]:12.1f}{ratio:9.2f}  (target >= {target})")
print(f"{'peak RSS MiB (whole process)':34}{hf['peak_rss_mib']:14.1f}{misp['peak_rss_mib']:12.1f}")
