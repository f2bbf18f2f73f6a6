"""Bisect of the shape readout (ShapesWorld grounding diagnostic): tower -> layer -2 patch tokens ->
projector -> [9 image tokens, a learned query for the asked cell] -> LAYERS causal pre-norm
transformer layers -> RMSNorm -> shape head, all trained together. POS=1 adds learned positions;
ROUTE=1 lets the query attend only to its own cell's token (hard routing); TOWER=path starts from a
tower state dict saved by dense_tower.py, FREEZE=1 keeps the tower fixed. Measured 2026-11-26
(commit d401b94) with a fresh tower on the 48 px world, 600 steps of batch 32: LAYERS=2 or 1:
0.23-0.25 val shape accuracy; ROUTE=1: 0.76 (cell_readout.py, no attention: 0.85). Env: WORLD,
PRETRAINED (its processor and the tower's config; required), POS, ROUTE, LAYERS, TOWER, FREEZE,
QSTD, STEPS.
Run from the repository root in the reference venv (bench/setup-reference-env.sh; torch 2.15.0,
transformers 5.24.0); the folders are described in paths.py and bench/README.md.
    WORLD=out/w48m PRETRAINED=out/p48 ROUTE=1 POS=1 LAYERS=1 python bench/world_grounding/readout_bisect.py
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
    return [(s["image"],o["cell"],shapes.index(o["shape"])) for s in sc if s["split"]==split for o in s["objects"] if o["visibility"]=="clear"]
tr,va=items("train"),items("val"); cache={}
def px(p):
    if p not in cache: cache[p]=ip(images=Image.open(f"{world}/{p}").convert("RGB"),return_tensors="pt")["pixel_values"][0]
    return cache[p]
m=CLIPVisionModel(LlavaForConditionalGeneration.from_pretrained(paths.pretrained("shapes-llava")).config.vision_config)
if os.environ.get("TOWER"): m.load_state_dict(torch.load(os.environ["TOWER"]))
proj=torch.nn.Sequential(torch.nn.Linear(64,128),torch.nn.GELU(),torch.nn.Linear(128,128))
cellq=torch.nn.Embedding(9,128); torch.nn.init.normal_(cellq.weight,std=float(os.environ.get("QSTD","0.02")))
pos=torch.nn.Parameter(torch.randn(10,128)*0.02)
L=int(os.environ.get("LAYERS","1"))
enc=torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(128,4,344,dropout=0.0,batch_first=True,norm_first=True),L)
norm=torch.nn.RMSNorm(128); head=torch.nn.Linear(128,8)
params=([] if os.environ.get("FREEZE") else list(m.parameters()))+list(proj.parameters())+list(cellq.parameters())+[pos]+list(enc.parameters())+list(norm.parameters())+list(head.parameters())
opt=torch.optim.AdamW(params,lr=1e-3,weight_decay=0)
def fwd(b):
    h=m(pixel_values=torch.stack([px(p) for p,_,_ in b]),output_hidden_states=True).hidden_states[1][:,1:]
    x=torch.cat([proj(h),cellq(torch.tensor([c for _,c,_ in b]))[:,None]],1)
    if os.environ.get("POS"): x=x+pos
    if os.environ.get("ROUTE"):
        mk=torch.full((len(b),10,10),float("-inf"))
        for i,(_,c,_) in enumerate(b): mk[i,:9,:9]=0; mk[i,9,c]=0; mk[i,9,9]=0
        mk=mk.repeat_interleave(4,0)
        y=enc(x,mask=mk)
    else:
        y=enc(x,mask=torch.nn.Transformer.generate_square_subsequent_mask(10),is_causal=True)
    return head(norm(y[:,-1]))
rng=random.Random(0)
for step in range(int(os.environ.get("STEPS","601"))):
    b=rng.sample(tr,32); loss=torch.nn.functional.cross_entropy(fwd(b),torch.tensor([y for *_,y in b])); opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params,1.0); opt.step()
    if step%200==0:
        with torch.no_grad(): acc=(fwd(va).argmax(-1)==torch.tensor([y for *_,y in va])).float().mean().item()
        print(step,round(loss.item(),3),"val shape acc",round(acc,3),flush=True)
