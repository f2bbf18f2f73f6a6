"""Dense per-cell pretraining of the world's CLIP tower in torch (ShapesWorld grounding diagnostic;
`misp world pretrain`'s dense loss, crates/misp/src/pretrain/dense.rs, does the same): every
patch token of hidden state LAYER (default 1 = the LLaVA's vision_feature_layer -2 of a 2-layer
tower) predicts the shape (8 + "none") and colour (6 + "none") of the clearly visible object in its
grid cell (POSLOSS=1: and its cell index); 48 px / patch 16 makes one cell exactly one patch. Saves the tower's state dict to OUT
for readout_bisect.py and torch_sft.py (TOWER=OUT; default out/diag/dense_tower.pt). Env: WORLD,
PRETRAINED (its processor and the tower's config; required), LAYER, STEPS, POSLOSS, OUT.
Run from the repository root in the reference venv (bench/setup-reference-env.sh; torch 2.15.0,
transformers 5.24.0); the folders are described in paths.py and bench/README.md.
    WORLD=out/w48m PRETRAINED=out/p48 python bench/world_grounding/dense_tower.py
"""
import json, os, random, time, torch
from PIL import Image
from transformers import CLIPVisionModel, CLIPImageProcessor, LlavaForConditionalGeneration
import paths
torch.set_num_threads(2); torch.manual_seed(0)
world = paths.world(); ip = CLIPImageProcessor.from_pretrained(paths.pretrained("shapes-clip"))
sc = [json.loads(l) for l in open(f"{world}/scenes.jsonl")]
shapes = ["circle", "square", "triangle", "diamond", "cross", "ring", "star", "hexagon"]
colours = ["red", "green", "blue", "yellow", "purple", "orange"]
def labels(s):
    sh, co = [8] * 9, [6] * 9
    for o in s["objects"]:
        if o["visibility"] == "clear": sh[o["cell"]], co[o["cell"]] = shapes.index(o["shape"]), colours.index(o["colour"])
    return sh, co
def load(split):
    ss = [s for s in sc if s["split"] == split]
    x = ip(images=[Image.open(f"{world}/{s['image']}").convert("RGB") for s in ss], return_tensors="pt")["pixel_values"]
    sh, co = zip(*map(labels, ss))
    return x, torch.tensor(sh), torch.tensor(co)
Xtr, Str, Ctr = load("train"); Xva, Sva, Cva = load("val")
m = CLIPVisionModel(LlavaForConditionalGeneration.from_pretrained(paths.pretrained("shapes-llava")).config.vision_config)
hs, hc, hp = torch.nn.Linear(64, 9), torch.nn.Linear(64, 7), torch.nn.Linear(64, 9)
params = list(m.parameters()) + list(hs.parameters()) + list(hc.parameters()) + list(hp.parameters())
CELL = torch.arange(9)
opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0)
LAYER = int(os.environ.get("LAYER", "1"))
def fwd(x):
    h = m(pixel_values=x, output_hidden_states=True).hidden_states[LAYER][:, 1:]
    return hs(h), hc(h), hp(h)
t0 = time.time()
for step in range(int(os.environ.get("STEPS", "801"))):
    i = torch.randint(0, len(Xtr), (64,))
    ps, pc, pp = fwd(Xtr[i]); ce = torch.nn.functional.cross_entropy
    loss = ce(ps.reshape(-1, 9), Str[i].reshape(-1)) + ce(pc.reshape(-1, 7), Ctr[i].reshape(-1))
    if os.environ.get("POSLOSS"): loss = loss + ce(pp.reshape(-1, 9), CELL.repeat(len(i)))
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 200 == 0:
        with torch.no_grad():
            ps, pc, _ = fwd(Xva); obj = Sva < 8
            print(step, round(loss.item(), 3), "val shape acc (objects)", round((ps.argmax(-1) == Sva)[obj].float().mean().item(), 3),
                  "colour", round((pc.argmax(-1) == Cva)[obj].float().mean().item(), 3), round(time.time() - t0), flush=True)
torch.save(m.state_dict(), paths.output("OUT", "dense_tower.pt"))
