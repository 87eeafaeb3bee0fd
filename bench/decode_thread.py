"""Decode-step time of SmolLM2 on the main thread vs a fresh non-main thread, interleaved.

    python -m modegpt_rt.bench.decode_thread --pairs 5 --steps 128 [--probe]

Why `modegpt serve` runs the model on the main thread: the C++ kernels open ~150 OpenMP regions per decode
step, and from a thread other than the main one they start slower (eleventh session: 22.2–26.5 ms per step
there against 16.7–20.5 ms on the main thread, five pairs, 2 threads, nothing else running).

`--probe` times one small parallel product (576 x 576, one row: one OpenMP region) per call, first on a
thread before the main thread has run any region, then on the main thread, then on another thread. The
twelfth session found why (three runs: 14.3–16.3, 15.4–15.6 and 46.4–69.9 µs per call): libgomp keeps
one pool of workers per thread that opens regions. Once a second pool exists its managed threads
outnumber the 2 CPUs, libgomp throttles its spin-wait to almost nothing, and every region of the second
thread wakes its worker through the kernel. The first thread to run regions keeps the fast path,
whichever it is; no GOMP_SPINCOUNT or OMP_WAIT_POLICY setting closed the gap.
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


def region_us(calls: int = 2000) -> float:
    """Microseconds per call of a one-row 576 x 576 product (one OpenMP region in the C++ kernel)."""
    from modegpt_rt.kernels import cpu_linear

    x, w = torch.randn(1, 576), torch.randn(576, 576)
    for _ in range(100):
        cpu_linear.linear(x, w)
    t = time.perf_counter()
    for _ in range(calls):
        cpu_linear.linear(x, w)
    return (time.perf_counter() - t) / calls * 1e6


def on_thread(fn):
    out = []
    th = threading.Thread(target=lambda: out.append(fn()))
    th.start()
    th.join()
    return out[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", nargs="?", default=None)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--probe", action="store_true", help="time one OpenMP region per call (see above)")
    args = p.parse_args(argv)
    if args.probe:  # before anything else runs a region on the main thread
        first = on_thread(region_us)
        main_us = region_us()
        print(
            json.dumps(
                {"thread_before_main_us": first, "main_us": main_us, "thread_after_main_us": on_thread(region_us)}
            )
        )
        return
    model = modegpt_rt.load(args.path, tokenizer=False)
    main_ms, thread_ms = [], []
    for _ in range(args.pairs):
        main_ms.append(decode_ms(model, args.steps))
        thread_ms.append(on_thread(lambda: decode_ms(model, args.steps)))
    print(
        json.dumps(
            {"backend": model.backend, "threads": torch.get_num_threads(), "main_ms": main_ms, "thread_ms": thread_ms}
        )
    )


if __name__ == "__main__":
    main()
