"""Linear probe: do the world tower's layer -2 patch features (what the LLaVA reads) tell which
shapes are clearly visible in a picture? Prints val accuracy per shape next to the base rate.
(ShapesWorld grounding diagnostic.) Argument: a LLaVA folder (default models/shapes-llava of the
repository). Env: WORLD (required).
Run from the repository root in the reference venv (bench/setup-reference-env.sh; torch 2.15.0,
transformers 5.24.0); the folders are described in paths.py and bench/README.md.
    WORLD=out/world python bench/world_grounding/probe_tower.py [models/shapes-llava]
"""
import json, torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
import sys
import paths
torch.manual_seed(0)
mdir=sys.argv[1] if len(sys.argv) > 1 else str(paths.MODELS / "shapes-llava"); world=paths.world()
proc=AutoProcessor.from_pretrained(mdir); model=LlavaForConditionalGeneration.from_pretrained(mdir).eval()
sc=[json.loads(l) for l in open(f"{world}/scenes.jsonl")]
tr=[s for s in sc if s["split"]=="train"][:1500]; va=[s for s in sc if s["split"]=="val"]
shapes=["circle","square","triangle","diamond","cross","ring","star","hexagon"]
def feats(ss):
    px=proc.image_processor(images=[Image.open(f"{world}/{s['image']}").convert("RGB") for s in ss], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        h=model.model.vision_tower(px, output_hidden_states=True).hidden_states[-2][:,1:]
    return h
def lab(ss): return torch.tensor([[float(any(o["shape"]==sh and o["visibility"]=="clear" for o in s["objects"])) for sh in shapes] for s in ss])
Xtr,Xva=feats(tr),feats(va); Ytr,Yva=lab(tr),lab(va)
for name,f in [("meanpool",lambda X: X.mean(1)),("maxpool",lambda X: X.max(1).values),("flat",lambda X: X.flatten(1))]:
    A,B=f(Xtr),f(Xva); mu,sd=A.mean(0),A.std(0)+1e-6; A=(A-mu)/sd; B=(B-mu)/sd
    W=torch.zeros(A.shape[1],8,requires_grad=True); b=torch.zeros(8,requires_grad=True)
    opt=torch.optim.Adam([W,b],lr=1e-2)
    for _ in range(500):
        loss=torch.nn.functional.binary_cross_entropy_with_logits(A@W+b,Ytr)+1e-3*W.pow(2).sum(); opt.zero_grad(); loss.backward(); opt.step()
    acc=((B@W+b>0).float()==Yva).float().mean(0)
    print(name, "val acc per shape", [round(a,2) for a in acc.tolist()], "base", [round(max(p,1-p),2) for p in Yva.mean(0).tolist()])
