"""The C++ skinny product alone: float32 against bfloat16 weight rows, streamed from memory.

    python -m modegpt_rt.bench.skinny_linear [--shape 3072x576] [--rows 1,8] [--mb 400] [--json OUT]

Cycles through enough copies of one weight shape (`--mb` of float32 in all, well beyond the caches) that
every product reads its weights from DRAM, as a decode step does, and reports the median time per
product, the weight bytes read per second and the arithmetic rate, for each input row count, weight
dtype and thread count (1 and the torch default). Rounds alternate the dtypes so bandwidth drift hits
both alike. `cpu_linear.linear` chooses per call between the C++ kernel and MKL (float32 above MAX_ROWS rows;
bfloat16 widened to float32 above BF16_MAX_ROWS, or BF16_LARGE_MAX_ROWS for large matrices), so these are
the times a decode step sees; `--widened` adds bfloat16 weights widened and multiplied by MKL at every row
count, the alternative those thresholds are set against.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from modegpt_rt.bench.machine import write_result
from modegpt_rt.kernels import cpu_linear


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="3072x576", help="N x K of the weight (rows x inputs)")
    p.add_argument("--rows", default="1,8", help="input rows M")
    p.add_argument("--mb", type=int, default=400, help="float32 megabytes of weight copies cycled through")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", default=f"1,{torch.get_num_threads()}")
    p.add_argument("--widened", action="store_true", help="also time F.linear(x, w_bf16.float())")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not cpu_linear.available():
        raise SystemExit("the C++ extension _cpu_linear is not built")
    N, K = (int(v) for v in args.shape.lower().split("x"))
    copies = max(2, args.mb * 2**20 // (4 * N * K))
    g = torch.Generator().manual_seed(0)
    weights = {torch.float32: [torch.randn(N, K, generator=g) for _ in range(copies)]}
    weights[torch.bfloat16] = [w.bfloat16() for w in weights[torch.float32]]
    rows = []
    default_threads = torch.get_num_threads()
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for M in (int(m) for m in args.rows.split(",")):
            x = torch.randn(M, K, generator=g)
            ways = {"float32": (weights[torch.float32], cpu_linear.linear)}
            ways["bfloat16"] = (weights[torch.bfloat16], cpu_linear.linear)
            if args.widened:
                ways["bfloat16 widened"] = (
                    weights[torch.bfloat16],
                    lambda x, w: torch.nn.functional.linear(x, w.float()),
                )
            times = {name: [] for name in ways}
            for _ in range(args.rounds):
                for name, (ws, fn) in ways.items():
                    t0 = time.perf_counter()
                    for w in ws:
                        fn(x, w)
                    times[name].append((time.perf_counter() - t0) / len(ws))
            for name, ts in times.items():
                t = statistics.median(ts)
                dt = ways[name][0][0].dtype
                row = {
                    "threads": threads,
                    "rows": M,
                    "weight_dtype": name,
                    "ms": t * 1e3,
                    "weight_gb_s": N * K * (2 if dt == torch.bfloat16 else 4) / t / 1e9,
                    "gflop_s": 2 * M * N * K / t / 1e9,
                }
                rows.append(row)
                print(
                    f"threads {threads}  M {M}  {row['weight_dtype']:<16} {row['ms']:7.3f} ms  "
                    f"{row['weight_gb_s']:5.1f} GB/s of weights  {row['gflop_s']:5.0f} GFLOP/s"
                )
    torch.set_num_threads(default_threads)
    if args.json:
        write_result(args.json, "skinny_linear", "skinny_linear", argv, shape=[N, K], copies=copies, results=rows)


if __name__ == "__main__":
    main()
