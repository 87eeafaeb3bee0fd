"""The C++ skinny product at 8 input rows, one weight row at a time against three at a time, shape by shape.

    python -m modegpt_rt.bench.rows3_shapes [--shapes 3072x576,576x1536,...] [--rounds 3] [--json OUT]

For each N x K weight shape (float32, copies cycled through 128 MB so they come from DRAM), times
`cpu_linear.linear` on 8 rows with the three-row blocks never used and always used
(`set_rows3_min_k(1 << 30)` / `(0)`), alternating the two settings round by round; medians. The default rule
(kernels/csrc/linear.cpp: rows of at least 1024) comes from these shapes: SmolLM2's projections and the
down projections of its compressed layers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from modegpt_rt.bench.machine import write_result
from modegpt_rt.kernels import _cpu_linear, cpu_linear

SHAPES = "3072x576,2128x576,960x576,576x576,576x1536,576x1064,576x864"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=SHAPES, help="comma-separated NxK weight shapes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mb", type=int, default=128, help="megabytes of weight copies cycled through")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    default = _cpu_linear.get_rows3_min_k()
    rows = []
    try:
        for shape in args.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            copies = [torch.randn(n, k) for _ in range(max(1, (args.mb << 20) // (n * k * 4)))]
            x = torch.randn(8, k)
            times = {"one_row": [], "three_rows": []}
            for _ in range(args.rounds):
                for name, setting in (("one_row", 1 << 30), ("three_rows", 0)):
                    _cpu_linear.set_rows3_min_k(setting)
                    cpu_linear.linear(x, copies[0])
                    t0 = time.perf_counter()
                    for w in copies:
                        cpu_linear.linear(x, w)
                    times[name].append((time.perf_counter() - t0) / len(copies))
            gflops = {name: 2 * 8 * n * k / statistics.median(t) / 1e9 for name, t in times.items()}
            ratio = gflops["three_rows"] / gflops["one_row"]
            rows.append({"N": n, "K": k, "gflops": gflops, "three_over_one": ratio, "seconds": times})
            one, three = gflops["one_row"], gflops["three_rows"]
            print(f"{shape:>10}: one row {one:6.1f}  three rows {three:6.1f} GFLOP/s  {ratio:.2f}x")
    finally:
        _cpu_linear.set_rows3_min_k(default)
    if args.json:
        fields = dict(threads=args.threads, default_min_k=default, results=rows)
        write_result(args.json, "rows3_shapes", "rows3_shapes", argv, **fields)


if __name__ == "__main__":
    main()
