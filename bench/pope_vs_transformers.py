"""Questions/s of `misp eval pope` against transformers' greedy generation, on CPU, in one run.

A small LLaVA (random weights), the same POPE questions and images, the same threads, batch size
and number of new tokens on both sides; prints both questions/s and misp / transformers (best of
`--repeats` alternating runs, and the median ratio), and counts the identical answers. Both
sides count image decoding and preprocessing, prompt
encoding, the vision tower, prefill and greedy decoding, and exclude model loading (misp's time
is the one `misp eval pope` reports for its answering loop).

Random weights stop at EOS whenever EOS happens to win, which would let the two sides generate
different numbers of tokens; the script zeroes EOS's row of the LM head, so its logit is 0 while
the largest of ~500 random logits is positive: EOS never wins and every answer is exactly
--new-tokens long on both sides (checked on the transformers side; misp runs the same weights).

The model: CLIP tower 64 px, patch 8 (64 image tokens), hidden 128, 4 layers; LLaMA hidden 256,
4 layers, 4 heads, a ~500-token BPE tokenizer (Llama-style Metaspace, `<image>` last).

Needs: a release build (`cargo build --release -p misp-cli`; `--misp` names another binary) and
torch, transformers, tokenizers and Pillow: run it from the repository root in the
reference venv made by bench/setup-reference-env.sh (pins in bench/requirements.txt):
    python bench/pope_vs_transformers.py [--questions 128] [--threads 2] [--repeats 3]
Figures and the machine they were measured on: bench/README.md.
"""

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import tempfile
import time

# OpenMP threads that spin while waiting collapse when the cores are shared (another build, a
# second benchmark side): at 2 threads on a 2-core Xeon with both cores busy, torch ran 6x slower with
# the default active wait than with the passive one, which flatters misp. Passive unless the
# caller says otherwise; set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaTokenizerFast,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ap = argparse.ArgumentParser()
ap.add_argument("--questions", type=int, default=128)
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--new-tokens", type=int, default=8)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--misp", default=os.path.join(ROOT, "target", "release", "misp"))
ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)
rng = random.Random(0)

SUFFIX = "\nAnswer the question using a single word or phrase."  # misp's default --suffix
OBJECTS = ["circle", "square", "triangle", "star", "dog", "cat", "car", "person", "cup", "chair",
           "table", "bottle", "bird", "horse", "boat", "clock"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]

work = tempfile.mkdtemp(prefix="misp-bench-pope-")
ckpt = os.path.join(work, "llava-small-random")
imgdir = os.path.join(work, "images")
os.makedirs(ckpt)
os.makedirs(imgdir)

# Tokenizer: a small Llama-style BPE trained on question-like text.
corpus = [f"USER: Is there a {c} {o} in the image? Answer the question using a single word or phrase. "
          f"ASSISTANT: {'Yes' if rng.random() < 0.5 else 'No'}, there is a {o} next to the {rng.choice(OBJECTS)}."
          for o in OBJECTS for c in COLOURS]
# Pseudo-words from syllables widen the vocabulary to the ~500 tokens asked for.
syllables = [a + b for a in "bdfgklmnprstvz" for b in ["a", "e", "i", "o", "u", "ar", "en", "ol"]]
corpus += [" ".join("".join(rng.choice(syllables) for _ in range(rng.randrange(1, 4))) for _ in range(12))
           for _ in range(400)]
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"],
                                                    show_progress=False))
tok.add_special_tokens(["<image>"])
image_token = tok.token_to_id("<image>")
vocab = tok.get_vocab_size()
tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
tok_path = os.path.join(ckpt, "tokenizer.json")
tok.save(tok_path)

text_cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=512,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
vision_cfg = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                              image_size=64, patch_size=8, projection_dim=128)
cfg = LlavaConfig(vision_config=vision_cfg, text_config=text_cfg, image_token_index=image_token,
                  image_seq_length=64, vision_feature_layer=-2, vision_feature_select_strategy="default",
                  projector_hidden_act="gelu", tie_word_embeddings=False)
model = LlavaForConditionalGeneration(cfg).eval()
with torch.no_grad():
    model.lm_head.weight[2].zero_()  # EOS never wins: see the module doc
model.save_pretrained(ckpt)
model.generation_config.pad_token_id = 0

fast = LlamaTokenizerFast(tokenizer_file=tok_path, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                          pad_token="<unk>", add_bos_token=True, add_eos_token=False, legacy=False)
fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
fast.padding_side = "left"
improc = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
processor = LlavaProcessor(image_processor=improc, tokenizer=fast, patch_size=8,
                           vision_feature_select_strategy="default", num_additional_image_tokens=1,
                           image_token="<image>")
processor.save_pretrained(ckpt)
processor.tokenizer.padding_side = "left"

# Scenes: a few coloured shapes on a plain background, 128 px (so both sides resize), PNG.
n_images = max(1, args.questions // 4)
for i in range(n_images):
    im = Image.new("RGB", (128, 128), tuple(rng.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(im)
    for _ in range(3):
        x, y, r = rng.randrange(16, 112), rng.randrange(16, 112), rng.randrange(6, 16)
        d.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    im.save(os.path.join(imgdir, f"{i:05d}.png"))
questions = [{"question_id": q, "image": f"{q % n_images:05d}.png",
              "text": f"Is there a {rng.choice(COLOURS)} {rng.choice(OBJECTS)} in the image?",
              "label": rng.choice(["yes", "no"])} for q in range(args.questions)]
qfile = os.path.join(work, "random_val.jsonl")
with open(qfile, "w") as f:
    f.writelines(json.dumps(q) + "\n" for q in questions)

def run_transformers():
    """Decode + preprocess + tokenise + generate, batch by batch, as misp does."""
    global prompt_len
    answers = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        for b in range(0, len(questions), args.batch):
            chunk = questions[b:b + args.batch]
            ims = [Image.open(os.path.join(imgdir, q["image"])).convert("RGB") for q in chunk]
            texts = [f"USER: <image>\n{q['text']}{SUFFIX} ASSISTANT:" for q in chunk]
            enc = processor(text=texts, images=ims, return_tensors="pt", padding=True)
            out = model.generate(**enc, max_new_tokens=args.new_tokens, do_sample=False)
            new = out[:, enc["input_ids"].shape[1]:]
            assert new.shape[1] == args.new_tokens and not (new == 2).any(), "EOS won; see the module doc"
            answers += fast.batch_decode(new, skip_special_tokens=True)
            prompt_len = enc["input_ids"].shape[1]
        return time.perf_counter() - t0, answers


def run_misp():
    """The same checkpoint, questions and images through `misp eval pope`; its own timing of the
    answering loop (loading excluded), and the whole process's wall time."""
    run = os.path.join(work, "misp-run")
    t0 = time.perf_counter()
    out = subprocess.run(
        [args.misp, "eval", "pope", "--model", ckpt, "--questions", qfile, "--images", imgdir, "--out", run,
         "--batch-size", str(args.batch), "--max-new-tokens", str(args.new_tokens)],
        capture_output=True, text=True, env={**os.environ, "RAYON_NUM_THREADS": str(args.threads)},
    )
    t_process = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    m = re.search(r"(\d+) questions answered in ([0-9.]+) s", out.stderr)
    assert int(m.group(1)) == len(questions), out.stderr
    with open(os.path.join(run, "answers.jsonl")) as f:
        answers = [json.loads(line)["answer"] for line in f]
    return float(m.group(2)), t_process, answers


# Alternate the two sides so that load from other processes hits both alike; keep each side's
# best time (the least disturbed) and report the median too.
hf_times, misp_times, process_times = [], [], []
for _ in range(args.repeats):
    t, hf_answers = run_transformers()
    hf_times.append(t)
    t, t_process, misp_answers = run_misp()
    misp_times.append(t)
    process_times.append(t_process)
same = sum(a.strip() == b.strip() for a, b in zip(misp_answers, hf_answers))
n = len(questions)
t_hf, t_misp = min(hf_times), min(misp_times)
hf_rate, misp_rate = n / t_hf, n / t_misp
median_ratio = statistics.median(h / m for h, m in zip(hf_times, misp_times))

new_tokens = len(questions) * args.new_tokens
print("| engine | questions | seconds | questions/s | new tokens/s |\n|---|---:|---:|---:|---:|")
print(f"| transformers {transformers.__version__} / torch {torch.__version__} | {len(questions)} | {t_hf:.2f} "
      f"| {hf_rate:.1f} | {new_tokens / t_hf:.0f} |")
print(f"| misp | {n} | {t_misp:.2f} | {misp_rate:.1f} | {n * args.new_tokens / t_misp:.0f} |")
print(f"\nratio misp / transformers: {misp_rate / hf_rate:.2f} (target >= 1.0); {args.threads} threads, "
      f"batch {args.batch}, {args.new_tokens} new tokens, prompt ~{prompt_len} tokens, vocab {vocab}; "
      f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; best of {args.repeats} alternating runs (median ratio {median_ratio:.2f}); misp process incl. loading "
      f"{min(process_times):.2f} s; identical answers {same}/{n}")
if args.keep:
    print(f"kept {work}")
else:
    shutil.rmtree(work)
