"""SFT loss of a world LLaVA per sft.jsonl kind, with each row's own image and with the images
shuffled among rows: a kind whose loss does not rise when the image is swapped is answered from
the text alone (ShapesWorld grounding diagnostic). 256 sft.jsonl rows drawn with seed 0. Argument:
a LLaVA folder. Env: WORLD (required; the world the model was trained on).
Run from the repository root in the reference venv (bench/setup-reference-env.sh; torch 2.15.0,
transformers 5.24.0); the folders are described in paths.py and bench/README.md.
    WORLD=out/world python bench/world_grounding/loss_swap.py models/shapes-llava
"""
import json, random, torch, sys, os
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
import paths
torch.set_num_threads(2); torch.manual_seed(0)
mdir = sys.argv[1]; world=paths.world()
proc = AutoProcessor.from_pretrained(mdir); tok = proc.tokenizer
model = LlavaForConditionalGeneration.from_pretrained(mdir).eval()
ntok = model.config.image_seq_length if hasattr(model.config,"image_seq_length") else 16
rows = [json.loads(l) for l in open(f"{world}/sft.jsonl")]
rng = random.Random(0); rows = rng.sample(rows, 256)
T = "USER: <image>\n{p} ASSISTANT:"
def loss(rs, imgs):
    out = {}
    for r, im in zip(rs, imgs):
        text = T.format(p=r["prompt"])
        inp = proc(images=Image.open(f"{world}/{im}").convert("RGB"), text=text, return_tensors="pt")
        resp = tok(" " + r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.cat([inp["input_ids"], torch.tensor([resp])], 1)
        lab = torch.full_like(ids, -100); lab[0, -len(resp):] = torch.tensor(resp)
        with torch.no_grad():
            l = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inp["pixel_values"], labels=lab).loss.item()
        out.setdefault(r["kind"], []).append(l)
    return {k: round(sum(v)/len(v),3) for k, v in out.items()}
print("true   ", loss(rows, [r["image"] for r in rows]))
sh = [r["image"] for r in rows]; rng.shuffle(sh)
print("swapped", loss(rows, sh))
