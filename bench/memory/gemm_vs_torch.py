"""The bf16 products of a frozen linear layer on LLaVA-1.5-7B's shapes, in one run: torch.matmul
(oneDNN / MKL, with avx512_bf16 where the CPU has it), candle's matmul (widens bf16 to f32) and
misp's AVX-512 BF16 kernel (`misp bench gemm`, which times the last two).

Products, for a [tokens, IN] activation and a weight [OUT, IN] (nn.Linear's layout):
  x W^T  (forward; also the recomputation under activation checkpointing)
  g W    (the input's gradient in backward; the frozen weight gets none)

Run from the repository root in the reference venv, after `cargo build --release -p misp-cli`:
    python bench/memory/gemm_vs_torch.py --threads 2
Each side runs alone, one after the other, with the same threads; `uptime`'s load average is
printed before and after, since a shared machine's load moves every figure.
"""

import argparse
import json
import os
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load():
    return open("/proc/loadavg").read().split()[:3]


def torch_side(tokens, shapes, repeat, threads):
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    rows = {}
    for inp, out in shapes:
        x = (torch.rand(tokens, inp, generator=g) * 2 - 1).bfloat16()
        w = (torch.rand(out, inp, generator=g) * 2 - 1).bfloat16()
        gr = (torch.rand(tokens, out, generator=g) * 2 - 1).bfloat16()
        for name, f in [("x W^T", lambda: x @ w.t()), ("g W", lambda: gr @ w)]:
            f()  # oneDNN picks and caches its kernel on the first call
            secs = []
            for _ in range(repeat):
                t = time.perf_counter()
                f()
                secs.append(time.perf_counter() - t)
            rows[(inp, out, name)] = sorted(secs)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=3510, help="activation rows (the slice's 5 sequences)")
    ap.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096", help="weights as INxOUT")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--misp", default=os.path.join(ROOT, "target", "release", "misp"))
    a = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    print("load average before:", *load())
    cmd = [a.misp, "bench", "gemm", "--tokens", str(a.tokens), "--shapes", a.shapes,
           "--repeat", str(a.repeat), "--json"]
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    misp = {}
    for line in out.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            misp[(r["in"], r["out"], r["product"])] = r
    print("load average after misp:", *load())
    torch = torch_side(a.tokens, shapes, a.repeat, a.threads)
    print("load average after torch:", *load())
    print(f"\n{a.tokens} rows, {a.threads} threads, fastest of {a.repeat} (s); ratio = torch s / misp s")
    print(f"| weight IN x OUT | product | torch.matmul | candle matmul | misp kernel | torch / misp |")
    print("|---|---|---|---|---|---|")
    for inp, out in shapes:
        for name in ["x W^T", "g W"]:
            t = torch[(inp, out, name)][0]
            r = misp.get((inp, out, name), {})
            c = r["candle_s"][0] if r else float("nan")
            m = r["misp_s"][0] if r and r.get("misp_s") else float("nan")
            print(f"| {inp} x {out} | {name} | {t:.3f} | {c:.3f} | {m:.3f} | {t / m:.2f} |")


if __name__ == "__main__":
    main()
