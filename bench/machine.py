"""A description of the machine for result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import torch


def add_run_args(p, batch: str = "1,8", rounds: int = 5, new: str | None = None):
    """The options the CPU generation benches share: --batch (comma list), --prompt, --new (an int, or the
    `new` spec string given), --rounds, --threads, --json."""
    p.add_argument("--batch", default=batch)
    p.add_argument("--prompt", type=int, default=128)
    if new is None:
        p.add_argument("--new", type=int, default=128)
    else:
        p.add_argument("--new", default=new, help="per-prompt limits spread over LO:HI")
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)


def interleaved_rounds(runs: dict, new_tokens: int, rounds: int, what: str = "") -> dict:
    """Side-by-side timing: each of `runs` (name -> a call that generates and returns its token-id lists) once
    as warm-up, then every run once per round, so slow phases of a shared machine hit all alike. Returns
    name -> tok/s of each round (`new_tokens` per call / wall time); stops with an error if the runs' tokens
    differ (`what` names the case in the message)."""
    for fn in runs.values():  # warm-up: C++ plans, the allocator
        fn()
    times, tokens = {name: [] for name in runs}, {}
    for _ in range(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            tokens[name] = fn()
            times[name].append(new_tokens / (time.perf_counter() - t0))
    if any(t != next(iter(tokens.values())) for t in tokens.values()):
        raise SystemExit(f"{what}: {', '.join(runs)} gave different tokens")
    return times


def write_run(args, argv, kind: str, module: str, **fields) -> None:
    """Write a bench's result JSON to `args.json` (if given): what ran (`kind`, the command line of `module`),
    the machine, the options of `add_run_args`, then `fields`."""
    if args.json:
        run = {k: getattr(args, k) for k in ("threads", "prompt", "new", "rounds")}
        write_result(args.json, kind, module, argv, **run, **fields)


def write_result(path, kind: str, module: str, argv, **fields) -> None:
    """Write a result JSON: `kind`, the command line of `module` (`argv`, or the process's own), the machine,
    then `fields`."""
    out = {
        "kind": kind,
        "command": f"python -m modegpt_rt.bench.{module} " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": describe(),
        **fields,
    }
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def describe() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        try:
            info["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
        except OSError:
            pass
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info
