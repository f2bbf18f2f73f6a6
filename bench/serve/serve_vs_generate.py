"""Requests/s and latency of `misp serve` under concurrent clients vs `misp generate` on the same
questions in one batch job.

Both sides answer the same N (image, prompt) rows greedily with the same max tokens and batch
size, and both leave model loading out of the clock:

- `misp generate` times itself in-process, from the loaded model to the last answer (image
  decoding and preprocessing, prompts, the batched forwards, detokenizing), and records it in
  `OUT.config.json` (`timings.generate_s`); rows/s = N / generate_s. (Timing two process runs
  and subtracting, as this script once did, is noise-dominated at N <= 128.)
- The server is started (the clock starts after it has loaded the model and printed its
  address), then C client threads send the N rows as chat requests (images as data: URLs, the
  bodies built before the clock starts so that the clients' Python costs the shared CPUs
  little), each thread on one persistent connection as a harness's `requests.Session` is
  (`--no-keep-alive`: a new connection per request); requests/s = N / wall time from the first
  request sent to the last reply read, and the p50 / p99 of the per-request latencies. Neither
  side is warmed up: both pay their first batch's first-touch costs.

Both sides' CPU time (user + system, all threads) over the same span is reported per row too:
on a shared machine it moves less with the load than the wall time (the server, with more
threads, can also get a larger share of a busy machine than `misp generate`, which flatters its
wall-clock rate). It is the server process's alone: the Python clients' CPU is not in it.

`--repeat R` runs the pair R times (generate then serve each time) and reports every run and
the median ratio, with the load average, since the machine may be shared. The server's own
account of where the time went (`GET /health` timings) is printed after each run.

Needs: python3 (standard library only) and a built misp (default target/release/misp).
    python bench/serve/serve_vs_generate.py --model models/shapes-llava --clients 16 --n 64
Where the server's CPU time goes (perf's data in serve.perf):
    python bench/serve/serve_vs_generate.py --n 512 --wrap 'perf record -g -o serve.perf --'
"""

import argparse
import base64
import http.client
import json
import os
import shlex
import signal
import statistics
import subprocess
import tempfile
import threading
import time

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
    out = os.path.join(tmp, "out.jsonl")
    subprocess.run([misp, "generate", "--model", model, "--data", path, "--out", out,
                    "--batch-size", str(batch), "--max-new-tokens", str(max_tokens), "--quiet"],
                   check=True, stderr=subprocess.DEVNULL)
    with open(out + ".config.json") as f:
        timings = json.load(f)["timings"]
    if timings["rows"] != len(data):
        raise RuntimeError(f"misp generate answered {timings['rows']} of {len(data)} rows")
    return timings["generate_s"], timings.get("cpu_s")


def cpu_s(pid):
    """CPU seconds (user + system, all threads) process `pid` has used; None off Linux."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def chat_body(img, prompt, max_tokens):
    with open(img, "rb") as f:
        b64 = base64.b64encode(f.read()).decode()
    mime = "image/png" if img.endswith(".png") else "image/jpeg"
    return json.dumps({"model": "m", "temperature": 0, "max_tokens": max_tokens, "messages": [
        {"role": "user", "content": [
            {"type": "text", "text": prompt},
            {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{b64}"}}]}]}).encode()


def post(conn, body, keep_alive):
    """One chat request on `conn` (an http.client connection); its latency in seconds."""
    headers = {"Content-Type": "application/json"}
    if not keep_alive:
        headers["Connection"] = "close"
    t = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
    r = conn.getresponse()
    reply = r.read()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {reply[:200]!r}")
    json.loads(reply)
    if not keep_alive:
        conn.close()
    return time.perf_counter() - t


def get_json(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("GET", path, headers={"Connection": "close"})
    out = json.loads(conn.getresponse().read())
    conn.close()
    return out


def time_serve(args, data):
    """(requests/s, sorted latencies, the server's /health timings) of one server run."""
    server = subprocess.Popen(shlex.split(args.wrap) + [args.misp, "serve", "--model", args.model, "--port", "0",
                               "--batch-size", str(args.batch_size),
                               "--batch-wait-ms", str(args.batch_wait_ms)]
                              + shlex.split(args.serve_args),
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()
        port = int(line.split("127.0.0.1:")[1].split("/")[0])
        bodies = [chat_body(img, p, args.max_tokens) for img, p in data]
        latencies = []
        lock = threading.Lock()
        todo = list(bodies)

        def client():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            while True:
                with lock:
                    if not todo:
                        break
                    body = todo.pop()
                dt = post(conn, body, args.keep_alive)
                with lock:
                    latencies.append(dt)
            conn.close()

        cpu_before = cpu_s(server.pid)
        t = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        cpu_after = cpu_s(server.pid)
        timings = get_json(port, "/health")["timings"]
    finally:
        # SIGINT, so that a wrapping profiler writes its data before it exits.
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    cpu = None if None in (cpu_before, cpu_after) else cpu_after - cpu_before
    return len(data) / wall, sorted(latencies), timings, cpu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--misp", default=os.path.join(ROOT, "target", "release", "misp"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "shapes-llava"))
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--batch-wait-ms", type=int, default=5)
    ap.add_argument("--no-keep-alive", dest="keep_alive", action="store_false",
                    help="a new connection per request")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--serve-args", default="",
                    help="more flags for misp serve, e.g. '--join-group 8'")
    ap.add_argument("--wrap", default="",
                    help="command the server runs under, e.g. 'perf record -g -o serve.perf --'")
    args = ap.parse_args()
    data = rows(args.n)
    print(f"| n | clients | batch | generate rows/s | serve requests/s | ratio | p50 s | p99 s "
          f"| CPU ms/row generate | CPU ms/request serve | load 1 min |")
    print(f"|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    ratios = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            t_n, gen_cpu = time_generate(args.misp, args.model, data, args.batch_size,
                                         args.max_tokens, tmp)
        gen_rate = args.n / t_n
        serve_rate, latencies, timings, serve_cpu = time_serve(args, data)
        ms = lambda c: "-" if c is None else f"{1000 * c / args.n:.2f}"
        ratios.append(serve_rate / gen_rate)
        p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
        print(f"| {args.n} | {args.clients} | {args.batch_size} | {gen_rate:.2f} | "
              f"{serve_rate:.2f} | {ratios[-1]:.2f} | {p(0.5):.3f} | {p(0.99):.3f} | "
              f"{ms(gen_cpu)} | {ms(serve_cpu)} | {os.getloadavg()[0]:.2f} |", flush=True)
        print(f"    server: {json.dumps(timings)}", flush=True)
    if args.repeat > 1:
        print(f"median ratio over {args.repeat} runs: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
