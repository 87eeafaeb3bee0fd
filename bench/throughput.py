"""Generation throughput: modegpt_rt (dense and compressed) and dense transformers, side by side.

    modegpt bench throughput [PATH...] --batch 1,8 --prompt 128 --new 128 --hf-baseline --json OUT

tok/s = batch · new tokens / wall time including prefill (the issue's metric); decode tok/s
excludes the prefill. Each configuration runs `--repeats` times after a warm-up; medians are reported.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from modegpt_rt.bench.machine import describe

import modegpt_rt


def _prompts(batch, length, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (batch, length), generator=g).tolist()


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_runtime(model, batch, prompt, new, repeats):
    prompts = _prompts(batch, prompt, model.config.vocab_size)
    model.generate(prompts, max_new_tokens=4, temperature=0, ignore_eos=True)  # warm-up
    runs = []
    for _ in range(repeats):
        _sync(model.device)
        t0 = time.perf_counter()
        res = model.generate(prompts, max_new_tokens=new, temperature=0, ignore_eos=True)
        _sync(model.device)
        wall = time.perf_counter() - t0
        assert all(len(r.token_ids) == new for r in res)
        prefill = res[0].stats["prefill_seconds"]
        runs.append({"wall": wall, "prefill": prefill})
    return runs


def time_transformers(path, batch, prompt, new, repeats, device, dtype):

    from transformers import AutoModelForCausalLM

    p = Path(path)
    if p.is_file():
        hf = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype)
    hf = hf.to(device).eval()
    ids = torch.tensor(_prompts(batch, prompt, hf.config.vocab_size), device=device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        hf.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
        runs = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            hf(ids)  # prefill alone, for the prefill column
            _sync(device)
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = hf.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
            _sync(device)
            wall = time.perf_counter() - t0
            assert out.shape[1] == prompt + new
            runs.append({"wall": wall, "prefill": prefill})
    return runs


def summarize(runs, batch, new):
    wall = statistics.median(r["wall"] for r in runs)
    prefill = statistics.median(r["prefill"] for r in runs)
    return {
        "tok_s": batch * new / wall,
        "decode_tok_s": batch * (new - 1) / max(wall - prefill, 1e-9),
        "wall_s": wall,
        "prefill_s": prefill,
        "runs": runs,
    }


def _label(model):
    comp = model.config.compression or {}
    rate = comp.get("target_rate", 0.0)
    return rate, ("dense" if not comp else f"{rate:.0%} {comp.get('allocation', '')}".strip())


def _dense_source(path):
    """The dense model a checkpoint was compressed from (its config's `compression.source_model`), or `path`
    itself when it is dense (None: the default model)."""
    cfg = Path(path) / "config.json" if path is not None else None
    if cfg is not None and cfg.is_file():
        try:
            conf = json.loads(cfg.read_text())
        except (OSError, ValueError):
            conf = {}
        comp = conf.get("compression") if isinstance(conf, dict) else None
        if comp:
            return comp.get("source_model") or None
    return path


def _check_options(args, paths):
    try:
        batches = [int(b) for b in str(args.batch).split(",")]
    except ValueError:
        raise ValueError(f"--batch {args.batch!r}: give comma-separated positive integers, like 1,8") from None
    for name, v, low in (("--batch", min(batches), 1), ("--prompt", args.prompt, 1), ("--new", args.new, 2)):
        if v < low:
            raise ValueError(f"{name} must be at least {low}, got {v}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    for p in paths:
        if p is not None and not Path(p).exists():
            raise FileNotFoundError(f"{p}: no such checkpoint, folder or file")
    return batches


def main(args):
    dtype = getattr(torch, args.dtype)
    paths = args.paths or [None]
    batches = _check_options(args, paths)  # all of them before the first model is timed
    results = []
    print(f"{'model':<28} {'impl':<18} {'batch':>5} {'tok/s':>8} {'decode tok/s':>12} {'prefill s':>9}")

    def report(row):
        results.append(row)
        print(
            f"{row['label']:<28} {row['impl']:<18} {row['batch']:>5} {row['tok_s']:>8.1f} "
            f"{row['decode_tok_s']:>12.1f} {row['prefill_s']:>9.3f}",
            flush=True,
        )

    if args.hf_baseline:
        base = _dense_source(paths[0]) or modegpt_rt.default_model_path()  # dense, even if paths[0] is not
        for b in batches:
            s = summarize(
                time_transformers(base, b, args.prompt, args.new, args.repeats, args.device, dtype), b, args.new
            )
            report(
                {
                    "model": str(base),
                    "label": "dense",
                    "rate": 0.0,
                    "impl": "transformers",
                    "batch": b,
                    "prompt": args.prompt,
                    "new": args.new,
                    **s,
                }
            )
    bf16_weights = getattr(args, "bf16_weights", False)
    weight_dtype = torch.bfloat16 if bf16_weights else None
    for path in paths:
        model = modegpt_rt.load(
            path, device=args.device, dtype=dtype, backend=args.backend, tokenizer=False, weight_dtype=weight_dtype
        )
        rate, label = _label(model)
        for b in batches:
            s = summarize(time_runtime(model, b, args.prompt, args.new, args.repeats), b, args.new)
            report(
                {
                    "model": str(path or modegpt_rt.default_model_path()),
                    "label": label,
                    "rate": rate,
                    "impl": f"modegpt_rt/{model.backend}" + (", bf16 weights" if model.weight_dtype != dtype else ""),
                    "batch": b,
                    "prompt": args.prompt,
                    "new": args.new,
                    "params": model.config.total_params(),
                    **s,
                }
            )
        del model
    out = {
        "kind": "throughput",
        "machine": describe(),
        "command": "modegpt " + " ".join(sys.argv[1:]),
        "dtype": args.dtype,
        "weight_dtype": "bfloat16" if bf16_weights else args.dtype,
        "device": args.device,
        "results": results,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return out
