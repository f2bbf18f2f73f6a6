"""A LLaVA-1.5-7B-shaped checkpoint with random bf16 weights, and one preference record to train
on: what `bench/memory/check.py` measures `misp train` against `misp bench memory` with.

The model is llava-hf/llava-1.5-7b-hf's config (fixtures/model_configs/llava-1.5-7b.config.json:
CLIP ViT-L/14-336 tower, 576 image tokens, Vicuna-7B widths) with `--layers` decoder layers
(32 for the full shape, 14 GB; 2 for the "7B-width slice"), built by transformers 5.24
(`LlavaForConditionalGeneration`), weights drawn N(0, 0.02) (norms 1), saved in bf16 as
transformers saves it. A word-level tokenizer of the model's 32064 ids (`<image>` = 32000) and
CLIP's 336 px image processor complete the folder.

The record (TRL JSONL) has a prompt and responses of `--words` words each, so that one
sequence is about 576 + 2 x words + 10 tokens (700 at the default 60), and three negatives
(strategy misp, uniform q) from a three-image pool: K + 2 = 5 sequences, the paper's K = 3.

Run from the repository root in the reference venv (bench/setup-reference-env.sh):
    python bench/memory/make_llava_7b_shaped.py --layers 2 --out out/llava-7b-slice
    python bench/memory/make_llava_7b_shaped.py --config bench/memory/small.config.json --out out/small
Writes OUT/model (the checkpoint), OUT/records.jsonl, OUT/negatives.jsonl, OUT/pool/ids.jsonl
and OUT/images/.
"""

import argparse
import json
import os
import shutil

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (CLIPImageProcessor, LlamaTokenizerFast, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ap = argparse.ArgumentParser()
ap.add_argument("--layers", type=int, default=None,
                help="decoder layers (32: the full 7B shape; default: the config's)")
ap.add_argument("--config", default=os.path.join(ROOT, "fixtures", "model_configs", "llava-1.5-7b.config.json"),
                help="the LLaVA config.json to build (bench/memory/small.config.json: the small bench model)")
ap.add_argument("--out", required=True)
ap.add_argument("--words", type=int, default=60, help="words of the prompt and of each response")
ap.add_argument("--seed", type=int, default=0)
args = ap.parse_args()
torch.manual_seed(args.seed)

with open(args.config) as f:
    raw = json.load(f)
if args.layers is not None:
    raw["text_config"]["num_hidden_layers"] = args.layers
cfg = LlavaConfig.from_dict(raw)
# bf16 from the start: to_empty() keeps the meta tensors' dtype, and an f32 32-layer model
# would need 28 GB.
torch.set_default_dtype(torch.bfloat16)
with torch.device("meta"):
    model = LlavaForConditionalGeneration(cfg)
model = model.to_empty(device="cpu").to(torch.bfloat16)
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layer_norm" in name or "layrnorm" in name:
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            # In slices, so that a 7B model never needs an f32 copy of a whole tensor.
            flat = p.view(-1)
            for lo in range(0, flat.numel(), 1 << 24):
                hi = min(lo + (1 << 24), flat.numel())
                flat[lo:hi] = (torch.randn(hi - lo) * 0.02).to(torch.bfloat16)
out_model = os.path.join(args.out, "model")
shutil.rmtree(args.out, ignore_errors=True)
model.save_pretrained(out_model, max_shard_size="5GB")
del model

# Word-level tokenizer over the model's ids: `w{i}` is id i; `<image>` at the config's image
# token (32000 for LLaVA-1.5), `<pad>` just after it (or before, at the end of the vocabulary).
V, IMG = raw["text_config"]["vocab_size"], raw["image_token_index"]
PAD = IMG + 1 if IMG + 1 < V else IMG - 1
vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
for i in range(3, V):
    vocab[f"w{i}"] = i
del vocab[f"w{IMG}"], vocab[f"w{PAD}"]
vocab["<image>"], vocab["<pad>"] = IMG, PAD
tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
tok.add_special_tokens(["<image>", "<pad>"])
tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
tok_path = os.path.join(out_model, "tokenizer.json")
tok.save(tok_path)
fast = LlamaTokenizerFast(tokenizer_file=tok_path, bos_token="<s>", eos_token="</s>",
                          unk_token="<unk>", pad_token="<pad>", add_bos_token=True,
                          add_eos_token=False, legacy=False)
fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
side = raw["vision_config"]["image_size"]
image_processor = CLIPImageProcessor(size={"shortest_edge": side},
                                     crop_size={"height": side, "width": side})
LlavaProcessor(image_processor=image_processor, tokenizer=fast,
               patch_size=raw["vision_config"]["patch_size"],
               vision_feature_select_strategy="default", num_additional_image_tokens=1,
               image_token="<image>").save_pretrained(out_model)

# One record, three pool images as its negatives.
images = os.path.join(args.out, "images")
os.makedirs(images)
photos = ["hopper.jpg", "astronaut_small.png", "camera_gray.png", "coffee_cmyk.jpg"]
for p in photos:
    shutil.copy(os.path.join(ROOT, "fixtures", "clip", "images", p), os.path.join(images, p))
g = torch.Generator().manual_seed(args.seed)
words = lambda n: " ".join(f"w{int(i)}" for i in torch.randint(3, min(IMG, PAD) - 1, (n,), generator=g))
record = {"id": "r0", "image": f"images/{photos[0]}", "prompt": words(args.words),
          "chosen": words(args.words), "rejected": words(args.words)}
with open(os.path.join(args.out, "records.jsonl"), "w") as f:
    f.write(json.dumps(record) + "\n")
os.makedirs(os.path.join(args.out, "pool"))
with open(os.path.join(args.out, "pool", "ids.jsonl"), "w") as f:
    for p in photos[1:]:
        f.write(json.dumps({"id": p, "path": os.path.abspath(os.path.join(images, p))}) + "\n")
negatives = [{"image": p, "strategy": "misp", "score": 1.0, "recon": 0.5, "l1": 0.5, "q": 1 / 3}
             for p in photos[1:]]
with open(os.path.join(args.out, "negatives.jsonl"), "w") as f:
    f.write(json.dumps({"id": "r0", "negatives": negatives}) + "\n")
grid = side // raw["vision_config"]["patch_size"]
print(f"wrote {args.out}: {raw['text_config']['num_hidden_layers']} decoder layers, "
      f"records of ~{grid * grid + 2 * args.words + 8} tokens per sequence")
