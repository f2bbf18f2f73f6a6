"""A small random Qwen2.5-VL checkpoint in bf16 and one preference record with 640 x 480
photos: what `bench/memory/check.py` measures `misp train` against `misp bench memory` with for
Qwen2.5-VL (the LLaVA counterpart is make_llava_7b_shaped.py).

The model (transformers 5.24's `Qwen2_5_VLForConditionalGeneration`, weights N(0, 0.02), norms 1,
saved in bf16): vision tower of 4 blocks (hidden 128, 2 heads, intermediate 256, window 112 px,
block 3 full attention), merger to 256; Qwen2 of 4 layers (hidden 256, 8 query heads over 2
key/value heads: GQA, intermediate 768, mrope_section [4, 6, 6]); the byte-level BPE tokenizer
and chat template of fixtures/qwen2_5_vl/tiny (its vocabulary, 414 ids, is the model's);
Qwen2VLImageProcessorPil with transformers' default bounds (56^2 to 28^2 x 1280 pixels), so a
640 x 480 photo is resized to 644 x 476: 34 x 46 patches, 391 image tokens.

The record (TRL JSONL) and its three negatives (strategy misp, uniform q) use four photos of
fixtures/clip/images resized to 640 x 480 (PIL bicubic), so every sequence has the same image
tokens: K + 2 = 5 sequences of the same length up to the responses. OUT/shape.json holds the
tokens per sequence (the longer response's) and the scored tokens, counted with transformers'
processor and TRL's completion convention (response, `<|im_end|>`, newline).

Run from the repository root in the reference venv (bench/setup-reference-env.sh):
    python bench/memory/make_qwen_small.py --out out/qwen-small
    python bench/memory/check.py --dir out/qwen-small --settings batched,group1,ckpt1,ckpt2
"""

import argparse
import json
import os
import shutil

import torch
from PIL import Image
from transformers import (AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "fixtures", "qwen2_5_vl", "tiny")
ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--words", type=int, default=40, help="words of the prompt and of each response")
ap.add_argument("--seed", type=int, default=0)
args = ap.parse_args()
torch.manual_seed(args.seed)

# Without torchvision transformers cannot build the video processor and refuses the whole
# processor; images need none (as fixtures/qwen2_5_vl/make_fixtures.py).
Qwen2_5_VLProcessor.get_attributes = classmethod(lambda cls: ["image_processor", "tokenizer"])
tokenizer = AutoTokenizer.from_pretrained(TINY)
ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
       ["<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
        "<|vision_end|>"]}
config = Qwen2_5_VLConfig(
    text_config={
        "vocab_size": len(tokenizer), "hidden_size": 256, "intermediate_size": 768,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "type": "mrope", "mrope_section": [4, 6, 6],
                            "rope_theta": 1000000.0},
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
    },
    vision_config={
        "depth": 4, "hidden_size": 128, "intermediate_size": 256, "num_heads": 2, "in_channels": 3,
        "out_hidden_size": 256, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "window_size": 112, "fullatt_block_indexes": [3], "hidden_act": "silu",
    },
    image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
    vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    tie_word_embeddings=False,
)
model = Qwen2_5_VLForConditionalGeneration(config)
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or ".norm1." in name or ".norm2." in name or "ln_q" in name:
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02)
model = model.to(torch.bfloat16)
out_model = os.path.join(args.out, "model")
shutil.rmtree(args.out, ignore_errors=True)
model.save_pretrained(out_model)
processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer,
                                chat_template=open(os.path.join(TINY, "chat_template.jinja")).read())
processor.save_pretrained(out_model)

images = os.path.join(args.out, "images")
os.makedirs(images)
photos = ["hopper.jpg", "astronaut_small.png", "camera_gray.png", "coffee_cmyk.jpg"]
names = []
for p in photos:
    name = os.path.splitext(p)[0] + ".png"
    img = Image.open(os.path.join(ROOT, "fixtures", "clip", "images", p)).convert("RGB")
    img.resize((640, 480), Image.Resampling.BICUBIC).save(os.path.join(images, name))
    names.append(name)

# Words the BPE tokenizer was trained on, drawn at random.
corpus = ("what is in the image a red circle and blue square there dog next to table describe "
          "scene astronaut stands on moon with flag how many cats are two sofa colour car green "
          "parked near road rocket launch pad under grey sky camera man holds tripod field").split()
g = torch.Generator().manual_seed(args.seed)
words = lambda n: " ".join(corpus[int(i)] for i in torch.randint(0, len(corpus), (n,), generator=g))
record = {"id": "r0", "image": f"images/{names[0]}", "prompt": words(args.words),
          "chosen": words(args.words), "rejected": words(args.words)}
with open(os.path.join(args.out, "records.jsonl"), "w") as f:
    f.write(json.dumps(record) + "\n")
os.makedirs(os.path.join(args.out, "pool"))
with open(os.path.join(args.out, "pool", "ids.jsonl"), "w") as f:
    for p in names[1:]:
        f.write(json.dumps({"id": p, "path": os.path.abspath(os.path.join(images, p))}) + "\n")
negatives = [{"image": p, "strategy": "misp", "score": 1.0, "recon": 0.5, "l1": 0.5, "q": 1 / 3}
             for p in names[1:]]
with open(os.path.join(args.out, "negatives.jsonl"), "w") as f:
    f.write(json.dumps({"id": "r0", "negatives": negatives}) + "\n")

# Tokens per sequence as transformers' processor counts them, and TRL's scored completion.
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record["prompt"]}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
enc = processor(text=[text], images=[Image.open(os.path.join(images, names[0]))], return_tensors="pt")
prompt = enc["input_ids"].shape[1]
response = max(len(tokenizer(r + "<|im_end|>\n", add_special_tokens=False)["input_ids"])
               for r in (record["chosen"], record["rejected"]))
grid = enc["image_grid_thw"][0].tolist()
shape = {"tokens": prompt + response, "response_tokens": response, "image": [640, 480],
         "image_grid_thw": grid}
with open(os.path.join(args.out, "shape.json"), "w") as f:
    json.dump(shape, f)
print(f"wrote {args.out}: {shape}")
