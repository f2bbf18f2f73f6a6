"""The shape of the object in a given cell from the tower's layer -2 patch token of that cell
(what the LLaVA reads there), tower trained from scratch with a linear head, or (PROJ=1) with a
LLaVA-like projector + RMSNorm + linear head (ShapesWorld grounding diagnostic). Both reach ~0.85
val accuracy in 600 steps of batch 32 on the 48 px world, while the LLaVA trained on the same
question through its LLM stays at chance (torch_sft.py WHAT=1). Env: WORLD, PRETRAINED (its
processor and the tower's config; required), PROJ.
Run from the repository root in the reference venv (bench/setup-reference-env.sh; torch 2.15.0,
transformers 5.24.0); the folders are described in paths.py and bench/README.md.
    WORLD=out/w48m PRETRAINED=out/p48 python bench/world_grounding/cell_readout.py
"""
import json, torch, os, random
from PIL import Image
from transformers import CLIPVisionModel, CLIPImageProcessor, LlavaForConditionalGeneration
import paths
torch.set_num_threads(2); torch.manual_seed(0)
world=paths.world(); ip=CLIPImageProcessor.from_pretrained(paths.pretrained("shapes-clip"))
sc=[json.loads(l) for l in open(f"{world}/scenes.jsonl")]
shapes=["circle","square","triangle","diamond","cross","ring","star","hexagon"]
def items(split):
    out=[]
    for s in sc:
        if s["split"]!=split: continue
        for o in s["objects"]:
            if o["visibility"]=="clear": out.append((s["image"],o["cell"],shapes.index(o["shape"])))
    return out
tr,va=items("train"),items("val")
cache={}
def px(p):
    if p not in cache: cache[p]=ip(images=Image.open(f"{world}/{p}").convert("RGB"),return_tensors="pt")["pixel_values"][0]
    return cache[p]
m=CLIPVisionModel(LlavaForConditionalGeneration.from_pretrained(paths.pretrained("shapes-llava")).config.vision_config)
proj=os.environ.get("PROJ")
head=torch.nn.Sequential(torch.nn.Linear(64,128),torch.nn.GELU(),torch.nn.Linear(128,128),torch.nn.RMSNorm(128),torch.nn.Linear(128,8)) if proj else torch.nn.Linear(64,8)
opt=torch.optim.AdamW(list(m.parameters())+list(head.parameters()),lr=1e-3,weight_decay=0)
def fwd(b):
    h=m(pixel_values=torch.stack([px(p) for p,_,_ in b]),output_hidden_states=True).hidden_states[1][:,1:]
    return head(h[torch.arange(len(b)),torch.tensor([c for _,c,_ in b])])
rng=random.Random(0)
for step in range(601):
    b=rng.sample(tr,32); loss=torch.nn.functional.cross_entropy(fwd(b),torch.tensor([y for *_,y in b])); opt.zero_grad(); loss.backward(); opt.step()
    if step%200==0:
        with torch.no_grad(): acc=(fwd(va).argmax(-1)==torch.tensor([y for *_,y in va])).float().mean().item()
        print(step,round(loss.item(),3),"val shape acc",round(acc,3),flush=True)
