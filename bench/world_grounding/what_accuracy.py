"""Teacher-forced accuracy of a world LLaVA on "What is in the {cell}?" -> "A {size} {colour}
{shape}.", per answer word, over clearly visible objects of a split (ShapesWorld grounding
diagnostic). Argument: a LLaVA folder, e.g. one torch_sft.py saved. Env: WORLD (required), SPLIT
(default val).
Run from the repository root in the reference venv (bench/setup-reference-env.sh; torch 2.15.0,
transformers 5.24.0); the folders are described in paths.py and bench/README.md.
    WORLD=out/w48m python bench/world_grounding/what_accuracy.py out/diag/torch_llava
"""
import json, torch, os, sys
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
import paths
torch.set_num_threads(2)
mdir=sys.argv[1]; world=paths.world(); split=os.environ.get("SPLIT","val")
proc=AutoProcessor.from_pretrained(mdir); tok=proc.tokenizer; model=LlavaForConditionalGeneration.from_pretrained(mdir).eval()
CELLS=["top left","top middle","top right","middle left","center","middle right","bottom left","bottom middle","bottom right"]
hit={"size":0,"colour":0,"shape":0}; n=0
for l in list(open(f"{world}/scenes.jsonl")):
    s=json.loads(l)
    if s["split"]!=split: continue
    img=Image.open(f"{world}/{s['image']}").convert("RGB")
    for o in s["objects"]:
        if o["visibility"]!="clear": continue
        inp=proc(images=img,text=f"USER: <image>\nWhat is in the {CELLS[o['cell']]}? ASSISTANT:",return_tensors="pt")
        resp=tok(f" A {o['size']} {o['colour']} {o['shape']}.",add_special_tokens=False)["input_ids"]
        ids=torch.cat([inp["input_ids"],torch.tensor([resp])],1)
        with torch.no_grad(): lg=model(input_ids=ids,attention_mask=torch.ones_like(ids),pixel_values=inp["pixel_values"]).logits[0]
        P=inp["input_ids"].shape[1]
        pred=lg[P-1:P-1+len(resp)].argmax(-1).tolist()
        for k,j in (("size",1),("colour",2),("shape",3)): hit[k]+=pred[j]==resp[j]
        n+=1
    if n>300: break
print({k:round(v/n,3) for k,v in hit.items()}, n)
