"""Where a world LLaVA looks when it names the shape in "What is in the {cell}?": attention of the
position predicting the shape word, per layer and head, to the asked cell's image token, the
other image tokens and the text, averaged over the first clearly visible object of each val
scene (ShapesWorld grounding diagnostic). Argument: a LLaVA folder, e.g. one torch_sft.py saved.
Env: WORLD (required).
Run from the repository root in the reference venv (bench/setup-reference-env.sh; torch 2.15.0,
transformers 5.24.0); the folders are described in paths.py and bench/README.md.
    WORLD=out/w48m python bench/world_grounding/attention_readout.py out/diag/torch_llava
"""
import json, torch, os, sys
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
import paths
mdir=sys.argv[1]; world=paths.world()
proc=AutoProcessor.from_pretrained(mdir); tok=proc.tokenizer; model=LlavaForConditionalGeneration.from_pretrained(mdir, attn_implementation="eager").eval()
CELLS=["top left","top middle","top right","middle left","center","middle right","bottom left","bottom middle","bottom right"]
tot=torch.zeros(2,4,3); n=0
for l in open(f"{world}/scenes.jsonl"):
    s=json.loads(l)
    if s["split"]!="val": continue
    o=[o for o in s["objects"] if o["visibility"]=="clear"]
    if not o: continue
    o=o[0]
    inp=proc(images=Image.open(f"{world}/{s['image']}").convert("RGB"),text=f"USER: <image>\nWhat is in the {CELLS[o['cell']]}? ASSISTANT:",return_tensors="pt")
    resp=tok(f" A {o['size']} {o['colour']}",add_special_tokens=False)["input_ids"]
    ids=torch.cat([inp["input_ids"],torch.tensor([resp])],1)
    img=(ids[0]==model.config.image_token_index).nonzero()[:,0]
    with torch.no_grad(): out=model(input_ids=ids,attention_mask=torch.ones_like(ids),pixel_values=inp["pixel_values"],output_attentions=True)
    for L,a in enumerate(out.attentions):
        a=a[0,:,-1]  # heads x keys, from the colour position (predicting shape)
        tot[L,:,0]+=a[:,img[o['cell']]]; tot[L,:,1]+=a[:,img].sum(-1)-a[:,img[o['cell']]]; tot[L,:,2]+=a.sum(-1)-a[:,img].sum(-1)
    n+=1
    if n>=100: break
print("attention from the position predicting the shape, per layer x head: [right cell, other cells, text]")
print((tot/n).round(decimals=2))
