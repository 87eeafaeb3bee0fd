"""Load test of `modegpt serve`: concurrent clients against the in-process server, batching on and off.

    python -m modegpt_rt.bench.serve_load [PATH] --clients 8 --requests 2 --new 64 --max-batch 1,8 \
        --batching continuous,static --late --json bench/results/serve_load.json

Each client sends `--requests` greedy completions one after another (its prompt: `--prompt` tokens of
WikiText-2 test text at its own offset, `ignore_eos`; `--new N` new tokens each, or `--new LO:HI` to spread
the clients' lengths evenly from LO to HI). For every `--max-batch` value and `--batching` mode a fresh
server runs the same load; the settings are interleaved `--repeats` times and the medians reported:
aggregate new tokens per second (all clients' new tokens / wall time) and the median request latency.
A first row runs the same requests through `model.generate` one at a time, without the server.
`--late` adds, per batching mode, a request for `--late-long` tokens and `--late-delay` seconds later one for
2 tokens: the latencies of both (the short one's is what continuous batching is for).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.request
from pathlib import Path

import torch

import modegpt_rt
from modegpt_rt import data
from modegpt_rt.server import make_server


def _post(url, body):
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def _serve(model, clients, **server_kw):
    """As `modegpt serve` runs: HTTP on a thread, the model on this (main) thread until every client function
    (each on its own thread) has returned. Returns the server (its scheduler's counters) and the wall time."""
    srv = make_server(model, port=0, worker_thread=False, **server_kw)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    wall = []

    def drive():
        threads = [threading.Thread(target=c, args=(srv.url,)) for c in clients]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall.append(time.perf_counter() - t0)
        srv.scheduler.close()

    threading.Thread(target=drive, daemon=True).start()
    try:
        srv.scheduler.run()
    finally:
        srv.shutdown()
        srv.server_close()
    return srv, wall[0]


def run_load(
    model, prompts, requests: int, new: list[int], max_batch: int, batch_wait: float, batching: str = "auto"
) -> dict:
    """The clients' load against a fresh server; client i asks for new[i] tokens per request."""
    latencies, tokens = [], []
    lock = threading.Lock()

    def client(prompt, n):
        def run(url):
            for _ in range(requests):
                t = time.perf_counter()
                out = _post(url, {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True})
                with lock:
                    latencies.append(time.perf_counter() - t)
                    tokens.append(out["usage"]["completion_tokens"])

        return run

    clients = [client(p, n) for p, n in zip(prompts, new)]
    srv, wall = _serve(model, clients, max_batch=max_batch, batch_wait=batch_wait, batching=batching)
    return {
        "tok_per_s": sum(tokens) / wall,
        "latency_median_s": statistics.median(latencies),
        "wall_s": wall,
        "new_tokens": sum(tokens),
        "mean_batch": statistics.mean(srv.scheduler.batch_sizes),
    }


def run_late(model, prompt, long: int, delay: float, batching: str, batch_wait: float) -> dict:
    """A request for `long` new tokens, then `delay` seconds later one for 2: both latencies."""
    out = {}

    def ask(name, n, wait):
        def run(url):
            time.sleep(wait)
            t = time.perf_counter()
            _post(url, {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True})
            out[name] = time.perf_counter() - t

        return run

    _serve(
        model, [ask("long", long, 0.0), ask("short", 2, delay)], max_batch=8, batch_wait=batch_wait, batching=batching
    )
    return {"long_latency_s": out["long"], "short_latency_s": out["short"]}


def run_direct(model, prompts, requests: int, new: list[int]) -> dict:
    """The same requests through `model.generate`, one at a time, no server: the reference for its overhead."""
    latencies, tokens = [], 0
    t0 = time.perf_counter()
    for _ in range(requests):
        for prompt, n in zip(prompts, new):
            t = time.perf_counter()
            tokens += len(model.generate([prompt], max_new_tokens=n, temperature=0, ignore_eos=True)[0].token_ids)
            latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    return {"tok_per_s": tokens / wall, "latency_median_s": statistics.median(latencies), "wall_s": wall}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", nargs="?", default=None)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--new", default="64", help="new tokens per request: N, or LO:HI spread over the clients")
    p.add_argument("--max-batch", default="1,8", help="server settings compared")
    p.add_argument("--batching", default="auto", help="batching modes compared: auto, continuous, static")
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--late", action="store_true", help="also time a short request sent while a long one runs")
    p.add_argument("--late-long", type=int, default=96)
    p.add_argument("--late-delay", type=float, default=0.3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bf16-weights", action="store_true", help="bfloat16 matrices, float32 compute")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    lo, _, hi = args.new.partition(":")
    lo, hi = int(lo), int(hi or lo)
    new = [lo + round((hi - lo) * i / max(1, args.clients - 1)) for i in range(args.clients)]
    model = modegpt_rt.load(args.path, weight_dtype=torch.bfloat16 if args.bf16_weights else None)
    ids = data.tokenize(model.tokenizer, data.read_text("wikitext2", "test"))
    prompts = [ids[1000 + 97 * i : 1000 + 97 * i + args.prompt].tolist() for i in range(args.clients)]
    modes = args.batching.split(",")
    settings = [f"{b}/{m}" for b in args.max_batch.split(",") for m in modes]
    run_load(model, prompts[:1], 1, [4], 1, 0.0)  # warm-up
    runs = {b: [] for b in settings + ["direct"] + [f"late/{m}" for m in modes if args.late]}
    wait = args.batch_wait_ms / 1000
    for _ in range(args.repeats):
        runs["direct"].append(run_direct(model, prompts, args.requests, new))
        print(json.dumps({"direct": True, **runs["direct"][-1]}), flush=True)
        for b in settings:
            size, mode = b.split("/")
            runs[b].append(run_load(model, prompts, args.requests, new, int(size), wait, mode))
            print(json.dumps({"max_batch": int(size), "batching": mode, **runs[b][-1]}), flush=True)
        for m in modes if args.late else []:
            runs[f"late/{m}"].append(run_late(model, prompts[0], args.late_long, args.late_delay, m, wait))
            print(json.dumps({"late": m, **runs[f"late/{m}"][-1]}), flush=True)
    rows = []
    for b in runs:
        if b == "direct":
            row = {"setting": "model.generate, one request at a time, no server"}
        elif b.startswith("late/"):
            row = {"setting": f"late short request, {b[5:]} batching"}
        else:
            row = {"max_batch": int(b.split("/")[0]), "batching": b.split("/")[1]}
        for k in ("tok_per_s", "latency_median_s", "mean_batch", "long_latency_s", "short_latency_s"):
            if k in runs[b][0]:
                row[k] = statistics.median(r[k] for r in runs[b])
        rows.append(row)
    out = {
        "model": str(model.source),
        "backend": model.backend,
        "weight_dtype": str(model.weight_dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "clients": args.clients,
        "requests_per_client": args.requests,
        "prompt_tokens": args.prompt,
        "new_tokens": new,
        "batch_wait_ms": args.batch_wait_ms,
        "late": {"long": args.late_long, "delay_s": args.late_delay} if args.late else None,
        "repeats": args.repeats,
        "rows": rows,
        "runs": runs,
    }
    print(json.dumps(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
