"""The world CLIP trained by torch + transformers on the descriptions (same config and schedule as
misp world pretrain), then a linear probe of its tower for the clearly visible shapes (ShapesWorld
grounding diagnostic). MISPINIT=1 uses a flat N(0, 0.02) init (misp world pretrain's init before
commit 9fe8a3d of 2026-11-26, which left the CLIP at contrastive loss 3.0);
NEG=1 adds one hard-negative caption per image (one shape word swapped, NegCLIP-style); OBJ=p
replaces a description by a single-object phrase ("A large green triangle.") with probability p.
Env also: STEPS, LR, PATCH, CDIR (config + processor; default PRETRAINED/shapes-clip), WORLD
(required), OUTC (where to save; default out/diag/torch_clip).
Run from the repository root in the reference venv (bench/setup-reference-env.sh; torch 2.15.0,
transformers 5.24.0); the folders are described in paths.py and bench/README.md.
    WORLD=out/w48m PRETRAINED=out/p48 NEG=1 STEPS=800 python bench/world_grounding/torch_clip.py
"""
import json, random, time, torch, os
from PIL import Image
from transformers import CLIPModel, CLIPConfig, PreTrainedTokenizerFast, CLIPImageProcessor
import paths
torch.set_num_threads(2); torch.manual_seed(0)
cdir=os.environ.get("CDIR") or paths.pretrained("shapes-clip"); world=paths.world()
cfg=CLIPConfig.from_pretrained(cdir)
P=int(os.environ.get("PATCH","16")); cfg.vision_config.patch_size=P
model=CLIPModel(cfg)
if os.environ.get("MISPINIT"):
    for n,p in model.named_parameters():
        if "logit_scale" in n: continue
        if "layer_norm" in n or "layrnorm" in n:
            torch.nn.init.ones_(p) if n.endswith("weight") else torch.nn.init.zeros_(p)
        elif n.endswith("bias"): torch.nn.init.zeros_(p)
        else: torch.nn.init.normal_(p,std=0.02)
tok=PreTrainedTokenizerFast.from_pretrained(cdir); ip=CLIPImageProcessor.from_pretrained(cdir)
rows=[json.loads(l) for l in open(f"{world}/sft.jsonl")]; rows=[r for r in rows if r["kind"]=="description"]
imgs={}
def px(p):
    if p not in imgs: imgs[p]=ip(images=Image.open(f"{world}/{p}").convert("RGB"),return_tensors="pt")["pixel_values"][0]
    return imgs[p]
opt=torch.optim.AdamW(model.parameters(),lr=float(os.environ.get("LR","2e-3")),weight_decay=0.1)
steps=int(os.environ.get("STEPS","300")); warm=40
sched=torch.optim.lr_scheduler.LambdaLR(opt,lambda s: min(1,(s+1)/warm)*0.5*(1+__import__('math').cos(__import__('math').pi*min(s,steps)/steps)))
SCN={json.loads(l)["image"]:json.loads(l) for l in open(f"{world}/scenes.jsonl")}; OBJ=float(os.environ.get("OBJ","0")); rng=random.Random(0); t0=time.time(); NEG=os.environ.get("NEG")=="1"; SH=["circle","square","triangle","diamond","cross","ring","star","hexagon"]
print(rows[0]["response"])
for step in range(steps):
    b=rng.sample(rows,64)
    texts=[]
    for r in b:
        objs=[o for o in SCN[r["image"]]["objects"] if o["visibility"]=="clear"]
        if OBJ and objs and rng.random()<OBJ: o=rng.choice(objs); texts.append(f"A {o['size']} {o['colour']} {o['shape']}.")
        else: texts.append(r["response"])
    t=tok(texts,padding=True,return_tensors="pt")
    if NEG:
        negs=[]
        for r in b:
            ws=r["response"].split(" ")
            idx=[i for i,w in enumerate(ws) if w.strip(".,") in SH]
            i=rng.choice(idx); w=ws[i]; core=w.strip(".,"); new=rng.choice([x for x in SH if x!=core]); ws=ws[:]; ws[i]=w.replace(core,new); negs.append(" ".join(ws))
        t=tok([r["response"] for r in b]+negs,padding=True,return_tensors="pt")
    out=model(input_ids=t["input_ids"],attention_mask=t["attention_mask"],pixel_values=torch.stack([px(r["image"]) for r in b]),return_loss=False)
    li=out.logits_per_image; B=li.shape[0]; lab_=torch.arange(B)
    loss=(torch.nn.functional.cross_entropy(li,lab_)+torch.nn.functional.cross_entropy(li[:, :B].t(),lab_))/2
    class O: pass
    out=O(); out.loss=loss; out.logits_per_image=li[:, :B]
    opt.zero_grad(); out.loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(),1.0); opt.step(); sched.step()
    if step%100==0 or step==steps-1:
        acc=(out.logits_per_image.argmax(1)==torch.arange(64)).float().mean().item()
        print(step, round(out.loss.item(),3), round(acc,3), round(time.time()-t0,1), flush=True)
model.save_pretrained(paths.output("OUTC","torch_clip"))
# probe layer-1 patch features for clear shapes
sc=[json.loads(l) for l in open(f"{world}/scenes.jsonl")]
tr=[s for s in sc if s["split"]=="train"]; va=[s for s in sc if s["split"]=="val"]
shapes=["circle","square","triangle","diamond","cross","ring","star","hexagon"]
def feats(ss,layer):
    with torch.no_grad():
        return model.vision_model(torch.stack([px(s["image"]) for s in ss]),output_hidden_states=True).hidden_states[layer][:,1:].max(1).values
def lab(ss): return torch.tensor([[float(any(o["shape"]==sh and o["visibility"]=="clear" for o in s["objects"])) for sh in shapes] for s in ss])
Ytr,Yva=lab(tr),lab(va)
for layer in [1,2]:
    A,B=feats(tr,layer),feats(va,layer); mu,sd=A.mean(0),A.std(0)+1e-6; A=(A-mu)/sd; B=(B-mu)/sd
    W=torch.zeros(A.shape[1],8,requires_grad=True); bb=torch.zeros(8,requires_grad=True); o=torch.optim.Adam([W,bb],lr=1e-2)
    for _ in range(500):
        l=torch.nn.functional.binary_cross_entropy_with_logits(A@W+bb,Ytr)+1e-3*W.pow(2).sum(); o.zero_grad(); l.backward(); o.step()
    acc=((B@W+bb>0).float()==Yva).float().mean(0)
    print("layer",layer,"probe acc",[round(a,2) for a in acc.tolist()],"mean",round(acc.mean().item(),3),"base",round(torch.maximum(Yva.mean(0),1-Yva.mean(0)).mean().item(),3))
