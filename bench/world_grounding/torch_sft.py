"""The world LLaVA architecture trained by torch + transformers on the same sft.jsonl: does it
learn to look? (issue 8 diagnostic, session 5). Env: KINDS (comma list of sft kinds; default the
existence questions), STEPS, LR, REINIT=1 (fresh LLM + projector) or REINIT=all (tower too).
Saves /tmp/diag/torch_llava for swap_sensitivity.py. Run:
    REINIT=1 STEPS=600 /work/.venv-ref/bin/python bench/world_grounding/torch_sft.py
"""
# Does the same LLaVA architecture learn to look when trained by torch on the same data?
import json, random, sys, time, torch, os
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
torch.set_num_threads(2); torch.manual_seed(0)
mdir = "/work/main/models/shapes-llava"; world = "/tmp/world"
proc = AutoProcessor.from_pretrained(mdir); tok = proc.tokenizer
model = LlavaForConditionalGeneration.from_pretrained(mdir)
if os.environ.get("REINIT"):
    for n, p in model.named_parameters():
        if "vision_tower" not in n or os.environ.get("REINIT") == "all":
            if p.dim() > 1: torch.nn.init.normal_(p, std=0.02)
            elif "norm" in n: torch.nn.init.ones_(p)
            else: torch.nn.init.zeros_(p)
kinds = set(os.environ.get("KINDS", "exists_yes,exists_no").split(","))
rows = [json.loads(l) for l in open(f"{world}/sft.jsonl")]
rows = [r for r in rows if r["kind"] in kinds]
cache = {}
def px(path):
    if path not in cache:
        cache[path] = proc.image_processor(images=Image.open(f"{world}/{path}").convert("RGB"), return_tensors="pt")["pixel_values"][0]
    return cache[path]
T = "USER: <image>\n{p} ASSISTANT:"
def batch(rs):
    ids, labels, pix = [], [], []
    for r in rs:
        p = proc(images=None, text=T.format(p=r["prompt"]), return_tensors=None)["input_ids"] if False else None
        prompt = tok(T.format(p=r["prompt"]).replace("<image>", "<image>" * 16))["input_ids"]
        resp = tok(" " + r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids.append(prompt + resp); labels.append([-100] * len(prompt) + resp); pix.append(px(r["image"]))
    L = max(map(len, ids))
    att = [[1] * len(i) + [0] * (L - len(i)) for i in ids]
    labels = [l + [-100] * (L - len(l)) for l in labels]
    ids = [i + [tok.pad_token_id or 0] * (L - len(i)) for i in ids]
    return torch.tensor(ids), torch.tensor(att), torch.tensor(labels), torch.stack(pix)
opt = torch.optim.AdamW(model.parameters(), lr=float(os.environ.get("LR", "1e-3")), weight_decay=0.0)
steps = int(os.environ.get("STEPS", "300")); rng = random.Random(0); t0 = time.time()
for step in range(steps):
    i, a, l, p = batch(rng.sample(rows, 32))
    out = model(input_ids=i, attention_mask=a, pixel_values=p, labels=l)
    opt.zero_grad(); out.loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    if step % 50 == 0 or step == steps - 1:
        print(step, round(out.loss.item(), 3), round(time.time() - t0, 1), flush=True)
model.eval(); model.save_pretrained("/tmp/diag/torch_llava"); proc.save_pretrained("/tmp/diag/torch_llava")
