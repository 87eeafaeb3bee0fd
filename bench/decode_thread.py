"""Decode-step time of SmolLM2 on the main thread vs a fresh non-main thread, interleaved.

    python -m modegpt_rt.bench.decode_thread --pairs 5 --steps 128

Why `modegpt serve` runs the model on the main thread: the C++ kernels open ~120 OpenMP regions per decode
step, and from a thread other than the main one they start slower (eleventh session: 22.2–26.5 ms per step
there against 16.7–20.5 ms on the main thread, five pairs, 2 threads, nothing else running).
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import torch

import modegpt_rt


def decode_ms(model, steps: int) -> float:
    cache = model.new_cache(1, 32 + 8 + steps)
    model.step(torch.randint(0, 1000, (1, 32)), cache, torch.tensor([32], dtype=torch.int32))
    one, tok = torch.ones(1, dtype=torch.int32), torch.tensor([[5]])
    for _ in range(8):
        model.step(tok, cache, one)
    t = time.perf_counter()
    for _ in range(steps):
        model.step(tok, cache, one)
    return (time.perf_counter() - t) / steps * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", nargs="?", default=None)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--steps", type=int, default=128)
    args = p.parse_args(argv)
    model = modegpt_rt.load(args.path, tokenizer=False)
    main_ms, thread_ms = [], []
    for _ in range(args.pairs):
        main_ms.append(decode_ms(model, args.steps))
        th = threading.Thread(target=lambda: thread_ms.append(decode_ms(model, args.steps)))
        th.start()
        th.join()
    print(
        json.dumps(
            {"backend": model.backend, "threads": torch.get_num_threads(), "main_ms": main_ms, "thread_ms": thread_ms}
        )
    )


if __name__ == "__main__":
    main()
