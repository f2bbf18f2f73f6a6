"""The world LLaVA architecture trained by torch + transformers: does it learn to look? (ShapesWorld
grounding diagnostic.) Env: MDIR (start checkpoint; default PRETRAINED/shapes-llava), WORLD
(required), KINDS (comma list of sft.jsonl kinds, `all`, or `none`; default the existence
questions), WHAT=1 (add "What is in the {cell}?" -> "A {size} {colour} {shape}." rows for every
clearly visible object), ONE=1 (those rows from one-object scenes only), STEPS, LR, TOWERLR (tower +
projector), REINIT=1 (fresh LLM + projector) or REINIT=all, FRESHTOWER=1 (fresh CLIP tower), OUTD
(where to save; default out/diag/torch_llava), TOWER (a dense_tower.py state dict), FREEZETOWER=1.
Score the result with what_accuracy.py.
Run from the repository root in the reference venv (bench/setup-reference-env.sh; torch 2.15.0,
transformers 5.24.0); the folders are described in paths.py and bench/README.md.
    WORLD=out/w48m PRETRAINED=out/p48 WHAT=1 KINDS=none STEPS=1500 python bench/world_grounding/torch_sft.py
"""
# Does the same LLaVA architecture learn to look when trained by torch on the same data?
import json, random, sys, time, torch, os
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
import paths
torch.set_num_threads(2); torch.manual_seed(0)
mdir = os.environ.get("MDIR") or paths.pretrained("shapes-llava"); world = paths.world()
proc = AutoProcessor.from_pretrained(mdir); tok = proc.tokenizer
model = LlavaForConditionalGeneration.from_pretrained(mdir)
if os.environ.get("FRESHTOWER"):
    from transformers import CLIPVisionModel
    fresh=CLIPVisionModel(model.config.vision_config)
    print(model.model.vision_tower.load_state_dict(fresh.state_dict(), strict=False))
if os.environ.get("TOWER"):
    # dense_tower.py's state dict is a CLIPVisionModel's; the LLaVA holds the inner vision model
    print(model.model.vision_tower.load_state_dict(torch.load(os.environ["TOWER"]), strict=False))
if os.environ.get("REINIT"):
    for n, p in model.named_parameters():
        if "vision_tower" not in n or os.environ.get("REINIT") == "all":
            if p.dim() > 1: torch.nn.init.normal_(p, std=0.02)
            elif "norm" in n: torch.nn.init.ones_(p)
            else: torch.nn.init.zeros_(p)
kinds = set(os.environ.get("KINDS", "exists_yes,exists_no").split(","))
rows = [json.loads(l) for l in open(f"{world}/sft.jsonl")]
rows = [r for r in rows if r["kind"] in kinds or "all" in kinds]
CELLS=["top left","top middle","top right","middle left","center","middle right","bottom left","bottom middle","bottom right"]
if os.environ.get("WHAT"):
    for l in open(f"{world}/scenes.jsonl"):
        s=json.loads(l)
        if s["split"]!="train": continue
        for o in s["objects"]:
            if o["visibility"]=="clear" and (not os.environ.get("ONE") or len(s["objects"])==1):
                rows.append({"image":s["image"],"prompt":f"What is in the {CELLS[o['cell']]}?","response":f"A {o['size']} {o['colour']} {o['shape']}.","kind":"what"})
print(len(rows), rows[-1])
cache = {}
def px(path):
    if path not in cache:
        cache[path] = proc.image_processor(images=Image.open(f"{world}/{path}").convert("RGB"), return_tensors="pt")["pixel_values"][0]
    return cache[path]
NT = model.config.image_seq_length
T = "USER: <image>\n{p} ASSISTANT:"
def batch(rs):
    ids, labels, pix = [], [], []
    for r in rs:
        prompt = tok(T.format(p=r["prompt"]).replace("<image>", "<image>" * NT))["input_ids"]
        resp = tok(" " + r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids.append(prompt + resp); labels.append([-100] * len(prompt) + resp); pix.append(px(r["image"]))
    L = max(map(len, ids))
    att = [[1] * len(i) + [0] * (L - len(i)) for i in ids]
    labels = [l + [-100] * (L - len(l)) for l in labels]
    ids = [i + [tok.pad_token_id or 0] * (L - len(i)) for i in ids]
    return torch.tensor(ids), torch.tensor(att), torch.tensor(labels), torch.stack(pix)
lr=float(os.environ.get("LR", "1e-3")); tl=float(os.environ.get("TOWERLR", str(lr)))
frozen=os.environ.get("FREEZETOWER")
tw=[p for n,p in model.named_parameters() if ("vision_tower" in n and not frozen) or "projector" in n]
if frozen: model.model.vision_tower.requires_grad_(False); rest=[p for n,p in model.named_parameters() if not("vision_tower" in n or "projector" in n)]
opt = torch.optim.AdamW([{"params":tw,"lr":tl},{"params":rest,"lr":lr}], weight_decay=0.0)
steps = int(os.environ.get("STEPS", "300")); rng = random.Random(0); t0 = time.time()
for step in range(steps):
    i, a, l, p = batch(rng.sample(rows, 32))
    out = model(input_ids=i, attention_mask=a, pixel_values=p, labels=l)
    opt.zero_grad(); out.loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    if step % 50 == 0 or step == steps - 1:
        print(step, round(out.loss.item(), 3), round(time.time() - t0, 1), flush=True)
model.eval(); od=paths.output("OUTD","torch_llava"); model.save_pretrained(od); proc.save_pretrained(od)
