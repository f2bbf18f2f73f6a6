"""Does the world LLaVA look at the image? (ShapesWorld grounding diagnostic)

Accuracy of its yes/no logit on "Is there a X in the image?" for 60 scenes x 3 shapes, and how much
swapping the image for another scene's moves that logit (0 = blind). Argument: a LLaVA folder
(default models/shapes-llava of the repository). Env: WORLD (required; e.g. made by
`misp world generate --out out/world`), SPLIT, SUF (text after the question; default POPE's
"Answer the question using a single word or phrase."; SUF="" asks as the SFT data does).
Run from the repository root in the reference venv (bench/setup-reference-env.sh; torch 2.15.0,
transformers 5.24.0); the folders are described in paths.py and bench/README.md.
    WORLD=out/world SPLIT=val python bench/world_grounding/swap_sensitivity.py models/shapes-llava
"""
import json, random, torch, sys, os
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
import paths
torch.set_num_threads(1)
mdir = sys.argv[1] if len(sys.argv) > 1 else str(paths.MODELS / "shapes-llava")
world = paths.world()
proc = AutoProcessor.from_pretrained(mdir)
model = LlavaForConditionalGeneration.from_pretrained(mdir).eval()
scenes = {json.loads(l)["id"]: json.loads(l) for l in open(f"{world}/scenes.jsonl")}
import os; SPLIT=os.environ.get("SPLIT","val"); val = [s for s in scenes.values() if s["split"] == SPLIT][:60]
shapes = ["circle","square","triangle","diamond","cross","ring","star","hexagon"]
rng = random.Random(0)
def lp_yes(img, q):
    SUF=os.environ.get("SUF","\nAnswer the question using a single word or phrase.")
    text = f"USER: <image>\n{q}{SUF} ASSISTANT:"
    inp = proc(images=img, text=text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inp).logits[0, -1]
    y = proc.tokenizer.convert_tokens_to_ids("yes")
    n = proc.tokenizer.convert_tokens_to_ids("no")
    return (logits[y] - logits[n]).item()
diffs_true, diffs_swap = [], []
correct = 0; tot = 0
for s in val:
    img = Image.open(f"{world}/{s['image']}").convert("RGB")
    other = rng.choice(val); img2 = Image.open(f"{world}/{other['image']}").convert("RGB")
    present = {o["shape"] for o in s["objects"]}
    for sh in rng.sample(shapes, 3):
        q = f"Is there a {sh} in the image?"
        a = lp_yes(img, q); b = lp_yes(img2, q)
        diffs_swap.append(abs(a - b))
        correct += ((a > 0) == (sh in present)); tot += 1
print("vocab has Yes/No:", proc.tokenizer.convert_tokens_to_ids("yes"), proc.tokenizer.convert_tokens_to_ids("no"))
print(f"acc {correct/tot:.3f} over {tot}; mean |logit(yes-no) true - swapped image| = {sum(diffs_swap)/len(diffs_swap):.3f}")
