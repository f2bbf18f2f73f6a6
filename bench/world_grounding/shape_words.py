"""Does a world LLaVA read shapes when it describes a scene? Teacher-forced accuracy of its argmax on
the shape words of val descriptions (the first 150 description records of records_val.jsonl), with
the scene's own image and with another scene's (ShapesWorld grounding diagnostic). A model that
reads shapes scores much higher with its own image; one that names shapes from the text prior
scores the same with both. Argument: a LLaVA folder. Env: WORLD (required).
Run from the repository root in the reference venv (bench/setup-reference-env.sh; torch 2.15.0,
transformers 5.24.0); the folders are described in paths.py and bench/README.md.
    WORLD=out/world python bench/world_grounding/shape_words.py models/shapes-llava
"""
import json, os, random, sys, torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
import paths
torch.set_num_threads(2)
mdir = sys.argv[1]; world = paths.world()
proc = AutoProcessor.from_pretrained(mdir); tok = proc.tokenizer
model = LlavaForConditionalGeneration.from_pretrained(mdir).eval()
shapes = ["circle", "square", "triangle", "diamond", "cross", "ring", "star", "hexagon"]
shape_ids = {tok.convert_tokens_to_ids(s) for s in shapes}
# val scenes have no sft rows; their preference records' chosen descriptions are the truth
recs = [json.loads(l) for l in open(f"{world}/records_val.jsonl")]
recs = [r for r in recs if r["kind"] == "description"]
rng = random.Random(0); hits = {"own": [0, 0], "swapped": [0, 0]}
for r in recs[:150]:
    img = Image.open(f"{world}/{r['image']}").convert("RGB")
    other = Image.open(f"{world}/{rng.choice(recs)['image']}").convert("RGB")
    for name, im in (("own", img), ("swapped", other)):
        inp = proc(images=im, text=f"USER: <image>\n{r['prompt']} ASSISTANT:", return_tensors="pt")
        resp = tok(" " + r["chosen"], add_special_tokens=False)["input_ids"]
        ids = torch.cat([inp["input_ids"], torch.tensor([resp])], 1)
        with torch.no_grad():
            lg = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inp["pixel_values"]).logits[0]
        P = inp["input_ids"].shape[1]
        pred = lg[P - 1:P - 1 + len(resp)].argmax(-1).tolist()
        for p, t in zip(pred, resp):
            if t in shape_ids: hits[name][0] += p == t; hits[name][1] += 1
print({k: round(a / max(n, 1), 3) for k, (a, n) in hits.items()}, "shape words:", hits["own"][1])
