"""Requests/s and latency of `misp serve` under concurrent clients vs `misp generate` on the same
questions in one batch job.

Both sides answer the same N (image, prompt) rows greedily with the same max tokens and batch
size. `misp generate` is timed twice (all rows, and one row) so that its model loading cancels
out: rows/s = (N - 1) / (t_N - t_1). The server is started once, warmed with one request, then
C client threads send the N rows as chat requests (images as data: URLs); requests/s = N / wall
time, and the p50 / p99 of the per-request latencies.

Needs: python3 (standard library only) and a built misp (default target/release/misp).
    python bench/serve/serve_vs_generate.py --model models/shapes-llava --clients 16 --n 64
"""

import argparse
import base64
import json
import os
import subprocess
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGES = os.path.join(ROOT, "fixtures", "clip", "images")
PROMPTS = ["Is there a circle?", "What colour is the square?", "Describe the image.",
           "How many shapes are there?"]


def rows(n):
    names = sorted(os.listdir(IMAGES))
    return [(os.path.join(IMAGES, names[i % len(names)]), PROMPTS[i % len(PROMPTS)])
            for i in range(n)]


def time_generate(misp, model, data, batch, max_tokens, tmp):
    path = os.path.join(tmp, "in.jsonl")
    with open(path, "w") as f:
        for i, (img, p) in enumerate(data):
            f.write(json.dumps({"id": i, "image": img, "prompt": p}) + "\n")
    t = time.perf_counter()
    subprocess.run([misp, "generate", "--model", model, "--data", path, "--out",
                    os.path.join(tmp, "out.jsonl"), "--batch-size", str(batch),
                    "--max-new-tokens", str(max_tokens), "--quiet"], check=True,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def post(port, img, prompt, max_tokens):
    with open(img, "rb") as f:
        b64 = base64.b64encode(f.read()).decode()
    mime = "image/png" if img.endswith(".png") else "image/jpeg"
    body = json.dumps({"model": "m", "temperature": 0, "max_tokens": max_tokens, "messages": [
        {"role": "user", "content": [
            {"type": "text", "text": prompt},
            {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{b64}"}}]}]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        json.loads(r.read())
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--misp", default=os.path.join(ROOT, "target", "release", "misp"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "shapes-llava"))
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    data = rows(args.n)
    with tempfile.TemporaryDirectory() as tmp:
        t_n = time_generate(args.misp, args.model, data, args.batch_size, args.max_tokens, tmp)
        t_1 = time_generate(args.misp, args.model, data[:1], args.batch_size, args.max_tokens, tmp)
    gen_rate = (args.n - 1) / max(t_n - t_1, 1e-9)

    server = subprocess.Popen([args.misp, "serve", "--model", args.model, "--port", "0",
                               "--batch-size", str(args.batch_size), "--batch-wait-ms", "20"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()
        port = int(line.split("127.0.0.1:")[1].split("/")[0])
        post(port, *data[0], args.max_tokens)  # warm-up
        latencies = []
        lock = threading.Lock()
        todo = list(data)

        def client():
            while True:
                with lock:
                    if not todo:
                        return
                    img, p = todo.pop()
                dt = post(port, img, p, args.max_tokens)
                with lock:
                    latencies.append(dt)

        t = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
    finally:
        server.kill()
        server.wait()
    latencies.sort()
    serve_rate = args.n / wall
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    print(f"| n | clients | batch | generate rows/s | serve requests/s | ratio | p50 s | p99 s |")
    print(f"|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.n} | {args.clients} | {args.batch_size} | {gen_rate:.2f} | {serve_rate:.2f} | "
          f"{serve_rate / gen_rate:.2f} | {p(0.5):.3f} | {p(0.99):.3f} |")


if __name__ == "__main__":
    main()
