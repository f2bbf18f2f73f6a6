"""Can the world's CLIP tower learn shapes at all when supervised directly? A multi-label head
(which shapes are clearly visible) on the tower's class token (POOL=cls) or max-pooled patches
(POOL=max) of hidden state LAYER, tower trained with it (ShapesWorld grounding diagnostic).
Env: WORLD (required), IMG (processor size), PATCH, MODE=fresh|pre (pre: start from CDIR's tower;
CDIR defaults to models/shapes-clip of the repository), LABEL=colour (colours instead of shapes),
POOL, LAYER, STEPS. Measured 2026-11-26 (commit 226e196): 64 px / patch 16 (grid cells straddle
patches) stays at the base rate 0.76; 48 px / patch 16 (one cell = one patch) reaches 0.95.
Run from the repository root in the reference venv (bench/setup-reference-env.sh; torch 2.15.0,
transformers 5.24.0); the folders are described in paths.py and bench/README.md.
    WORLD=out/w48m IMG=48 PATCH=16 STEPS=801 python bench/world_grounding/tower_capacity.py
"""
# Can the world tower architecture learn shape presence at all when trained directly?
import json, torch, os, time, sys
from PIL import Image
from transformers import CLIPVisionModel, CLIPVisionConfig, CLIPImageProcessor
import paths
torch.set_num_threads(2); torch.manual_seed(0)
world=paths.world(); mdir=os.environ.get("CDIR", str(paths.MODELS / "shapes-clip"))
IMG=int(os.environ.get("IMG","64"))
proc=CLIPImageProcessor.from_pretrained(mdir, size={"shortest_edge":IMG}, crop_size={"height":IMG,"width":IMG})
sc=[json.loads(l) for l in open(f"{world}/scenes.jsonl")]
tr=[s for s in sc if s["split"]=="train"]; va=[s for s in sc if s["split"]=="val"]
shapes=["circle","square","triangle","diamond","cross","ring","star","hexagon"]
def px(ss): return proc(images=[Image.open(f"{world}/{s['image']}").convert("RGB") for s in ss], return_tensors="pt")["pixel_values"]
def lab0(ss): return torch.tensor([[float(any(o["shape"]==sh and o["visibility"]=="clear" for o in s["objects"])) for sh in shapes] for s in ss])
colours=["red","green","blue","yellow","purple","orange"]
def lab(ss):
    if os.environ.get("LABEL")=="colour": return torch.tensor([[float(any(o["colour"]==c and o["visibility"]=="clear" for o in s["objects"])) for c in colours] for s in ss])
    return lab0(ss)
NOUT=6 if os.environ.get("LABEL")=="colour" else 8
Xtr,Xva=px(tr),px(va); Ytr,Yva=lab(tr),lab(va)
mode=os.environ.get("MODE","fresh"); patch=int(os.environ.get("PATCH","16"))
if mode=="pre": m=CLIPVisionModel.from_pretrained(mdir)
else:
    c=CLIPVisionConfig.from_pretrained(mdir); c.patch_size=patch; c.image_size=Xtr.shape[-1]; m=CLIPVisionModel(c)
head=torch.nn.Linear(m.config.hidden_size,NOUT)
opt=torch.optim.AdamW(list(m.parameters())+list(head.parameters()),lr=1e-3)
pool=os.environ.get("POOL","cls")
def fwd(x):
    L=os.environ.get("LAYER")
    h=m(pixel_values=x,output_hidden_states=True).hidden_states[int(L)] if L else m(pixel_values=x).last_hidden_state
    return head(h[:,0] if pool=="cls" else h[:,1:].max(1).values)
t0=time.time()
for step in range(int(os.environ.get("STEPS","600"))):
    i=torch.randint(0,len(tr),(64,))
    loss=torch.nn.functional.binary_cross_entropy_with_logits(fwd(Xtr[i]),Ytr[i]); opt.zero_grad(); loss.backward(); opt.step()
    if step%100==0:
        with torch.no_grad(): acc=((fwd(Xva)>0).float()==Yva).float().mean().item()
        print(step,round(loss.item(),3),"val acc",round(acc,3),round(time.time()-t0),flush=True)
acc=((fwd(Xva)>0).float()==Yva).float().mean(0)
print("per-class",[round(a,2) for a in acc.tolist()])
print("base",round(torch.maximum(Yva.mean(0),1-Yva.mean(0)).mean().item(),3))
