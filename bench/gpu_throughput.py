"""The paper's GPU throughput protocol with random weights (throughput does not depend on values).

    python -m modegpt_rt.bench.gpu_throughput --json bench/results/gpu_throughput.json
        [--batch 1,16,64,256] [--prompt 256] [--new 256] [--models dense,paper30,5,10,20,40] [--hf-baseline]
        [--cuda-graph on|off|both] [--align auto|on|off|both] [--glue triton|torch|both] [--multiples M,P,V]
        [--ranks FILE] [--hf-compile] [--decode-tiles default,BLOCK_N:WARPS:STAGES,sweep:FILE]

LLaMA-2-7B shape, fp16. Models: dense; the paper's 30% layer ranks
(shared/bench/llama2-ranks-30pct.json: φ_l = 1 − rank_l / hidden applied to every module of
layer l); uniform 5/10/20/40%. All through modegpt_rt (the same code path for dense), and dense
through transformers (sdpa, static cache; eager unless --hf-compile lets transformers compile its
decode step, which costs minutes per batch size) in the same run. Batch sizes are the outer loop, in
the order given, and the JSON is rewritten after every row, so a run cut short keeps what it measured.
`--tiny` runs a small config on CPU to check the script itself where no GPU is lent.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from modegpt_rt.bench.machine import describe
from modegpt_rt.compressor.widths import Multiples, widths_for_sparsity

from modegpt_rt.config import ModelConfig
from modegpt_rt.model import Model

LLAMA2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    head_dim=128,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=16,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_id=2,
)


def find_ranks_file() -> Path:
    from modegpt_rt.data import find_data_dir

    return find_data_dir().parent / "bench" / "llama2-ranks-30pct.json"


def sparsities(name: str, cfg: ModelConfig, ranks_file: Path | None = None):
    L = cfg.num_hidden_layers
    if name == "dense":
        return [0.0] * L
    if name == "paper30":
        ranks = json.loads((ranks_file or find_ranks_file()).read_text())["llama-2-7b"]["layer_ranks"]
        if len(ranks) != L:  # --tiny: stretch the paper's profile over fewer layers
            ranks = [ranks[int(i * len(ranks) / L)] for i in range(L)]
        return [1 - r / 4096 for r in ranks]
    return [float(name) / 100] * L


def random_model(cfg: ModelConfig, device, dtype, align: bool = False) -> Model:
    model = Model(cfg, device=device, dtype=dtype, backend="auto")
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g) if p.dim() > 1 else p.fill_(1.0)
        for layer in model.layers:
            layer.freq_idx = torch.arange(layer.d_qk // 2, dtype=torch.int32, device=device).repeat(layer.n_kv, 1)
    if align:  # as modegpt_rt.load does on a GPU
        model.align_widths()
    return model


def parse_tiles(spec: str) -> list[dict | None]:
    """--decode-tiles: `default` (decode_config's choice, None), `BLOCK_N:WARPS:STAGES`, or `sweep:FILE`, the
    configuration of a `bench.triton_kernels --sweep` JSON with the least total time over its swept shapes
    (among those that ran on every shape)."""
    tiles = []
    for item in spec.split(","):
        if item == "default":
            tiles.append(None)
        elif item.startswith("sweep:"):
            doc = json.loads(Path(item[len("sweep:") :]).read_text())
            sweeps = (doc.get("decode_sweep") if isinstance(doc, dict) else None) or {}
            total: dict[tuple, list[float]] = {}
            for rows in sweeps.values():
                for r in rows:
                    if "median_ms" in r:
                        total.setdefault((r["BLOCK_N"], r["num_warps"], r["num_stages"]), []).append(r["median_ms"])
            complete = {k: sum(v) for k, v in total.items() if len(v) == len(sweeps)}
            if not complete:
                raise ValueError(f"--decode-tiles {item}: no configuration ran on every swept shape")
            tiles.append(dict(zip(("BLOCK_N", "num_warps", "num_stages"), min(complete, key=complete.get))))
        else:
            try:
                block_n, warps, stages = (int(x) for x in item.split(":"))
            except ValueError:
                msg = f"--decode-tiles: {item!r} is not default, BLOCK_N:WARPS:STAGES or sweep:FILE"
                raise ValueError(msg) from None
            tiles.append({"BLOCK_N": block_n, "num_warps": warps, "num_stages": stages})
    return tiles


@contextlib.contextmanager
def decode_tiles(tiles: dict | None):
    """Every Triton decode launch inside uses these tiles instead of decode_config's (None: unchanged)."""
    if tiles is None:
        yield
        return
    from modegpt_rt.kernels import triton_attention

    chosen = triton_attention.decode_config

    def forced(*a, **k):
        return {**chosen(*a, **k), **tiles}

    triton_attention.decode_config = forced
    try:
        yield
    finally:
        triton_attention.decode_config = chosen


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_generate(model, batch, prompt, new, repeats, cuda_graph=None):
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt)).tolist()
    kw = dict(temperature=0, ignore_eos=True, cuda_graph=cuda_graph)
    # warm-up at the timed shapes: Triton compiles per launch configuration and specialises integer
    # arguments (strides) on divisibility, so a shorter warm-up (a smaller cache) would leave compiles
    # inside the timed runs
    model.generate(ids, max_new_tokens=new, **kw)
    walls = []
    for _ in range(repeats):
        _sync(model.device)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new, **kw)
        _sync(model.device)
        walls.append(time.perf_counter() - t0)
    return walls


def time_transformers(cfg_kw, batch, prompt, new, repeats, device, dtype, compile=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(**{k: v for k, v in cfg_kw.items()}, attn_implementation="sdpa")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the target dtype: no float32 copy of 7B weights on the way
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(hf_cfg).to(dtype).eval()
    finally:
        torch.set_default_dtype(default)
    ids = torch.randint(3, cfg_kw["vocab_size"], (batch, prompt), device=device)
    kw = dict(
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        cache_implementation="static",
        disable_compile=not compile,
    )
    walls = []
    with torch.no_grad():
        hf.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            hf.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
            _sync(device)
            walls.append(time.perf_counter() - t0)
    del hf
    return walls


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="1,16,64,256")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--models", default="dense,paper30,5,10,20,40")
    p.add_argument("--hf-baseline", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--cuda-graph",
        choices=["on", "off", "both"],
        default="on",
        help="decode step replayed from a CUDA graph (on, the runtime's default), eagerly (off), or both to see"
        " what the graph pays (CPU: always off)",
    )
    p.add_argument(
        "--align",
        choices=["auto", "on", "off", "both"],
        default="auto",
        help="zero-pad layer widths to hardware-friendly multiples as modegpt_rt.load does on a GPU"
        " (auto: on a GPU); both: each compressed model unpadded and padded",
    )
    p.add_argument(
        "--glue",
        choices=["triton", "torch", "both"],
        default="triton",
        help="residual add + RMSNorm and SiLU·up of the Triton backend's step: the fused Triton kernels (the"
        " runtime's default), plain torch ops, or both to see what the fusion pays",
    )
    p.add_argument(
        "--multiples",
        help="MLP,PAIRS,V: compressed widths chosen at these multiples within the same budget, as"
        " `modegpt compress --multiples` does (default: any width; padding is --align's business)",
    )
    p.add_argument(
        "--ranks", type=Path, help="layer ranks JSON for paper30 (default: shared/bench/llama2-ranks-30pct.json)"
    )
    p.add_argument(
        "--hf-compile", action="store_true", help="let transformers compile its decode step (default: eager)"
    )
    p.add_argument(
        "--decode-tiles",
        default="default",
        help="Triton decode launch tiles to time, comma-separated: default (decode_config's), BLOCK_N:WARPS:STAGES,"
        " or sweep:FILE (the fastest over the shapes a `bench.triton_kernels --sweep` JSON swept)",
    )
    p.add_argument("--tiny", action="store_true", help="small config on CPU (checks the script, not a result)")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    if args.tiny:
        shape, device, dtype = TINY, "cpu", torch.float32
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_throughput: no CUDA device; run on a GPU machine (or --tiny to check the script)")
        shape, device, dtype = LLAMA2_7B, "cuda", torch.float16
    base = ModelConfig(**shape)
    multiples = Multiples.parse(args.multiples)
    try:
        tile_choices = parse_tiles(args.decode_tiles)
    except (OSError, ValueError) as e:
        p.error(str(e))
    rows = []
    batches = [int(b) for b in args.batch.split(",")]

    def record(label, impl, b, walls, params):
        wall = statistics.median(walls)
        rows.append(
            {
                "label": label,
                "impl": impl,
                "batch": b,
                "prompt": args.prompt,
                "new": args.new,
                "tok_s": b * args.new / wall,
                "wall_s": wall,
                "walls": walls,
                "params": params,
                "rate": 0.0 if label == "dense" else (0.3 if label == "paper30" else float(label) / 100),
            }
        )
        print(f"{label:>8} {impl:<22} batch {b:>4}: {rows[-1]['tok_s']:10.1f} tok/s", flush=True)

    graphs = {"on": [True], "off": [False], "both": [True, False]}[args.cuda_graph] if device == "cuda" else [False]
    hf_impl = "transformers" + ("+compile" if args.hf_compile else "")
    align_mode = ("on" if device == "cuda" else "off") if args.align == "auto" else args.align
    aligns = {"on": [True], "off": [False], "both": [False, True]}[align_mode]

    def save():
        out = {
            "kind": "throughput",
            "device": device,
            "dtype": str(dtype).replace("torch.", ""),
            "machine": describe(),
            "command": "python -m modegpt_rt.bench.gpu_throughput " + " ".join(sys.argv[1:]),
            "tiny": args.tiny,
            "results": rows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))

    def free():
        if device == "cuda":
            torch.cuda.empty_cache()

    for b in batches:
        if args.hf_baseline:
            try:
                walls = time_transformers(shape, b, args.prompt, args.new, args.repeats, device, dtype, args.hf_compile)
                record("dense", hf_impl, b, walls, base.total_params())
            except torch.OutOfMemoryError:
                print(f"transformers batch {b}: out of memory")
            free()
            save()
        for name, align in itertools.product(args.models.split(","), aligns):
            phi = sparsities(name, base, args.ranks)
            cfg = base.with_layers(widths_for_sparsity(base, phi, phi, multiples))
            model = random_model(cfg, device, dtype, align)
            padded = model.config.layers != cfg.layers
            if align and not padded and len(aligns) > 1:  # nothing to pad: the unpadded row is this model
                del model
                continue
            glues = {"both": ["triton", "torch"]}.get(args.glue, [args.glue]) if model.backend == "triton" else [None]
            tile_runs = tile_choices if model.backend == "triton" else [None]
            for graph, glue, tiles in itertools.product(graphs, glues, tile_runs):
                if glue is not None:
                    model.glue = glue
                try:
                    with decode_tiles(tiles):
                        walls = time_generate(model, b, args.prompt, args.new, args.repeats, graph)
                except torch.OutOfMemoryError:
                    print(f"{name} batch {b}: out of memory")
                    free()
                    continue
                impl = f"modegpt_rt/{model.backend}" + ("+graph" if graph else "") + ("+aligned" if padded else "")
                impl += ("+torchglue" if glue == "torch" else "") + (
                    f"+multiples{args.multiples}" if args.multiples else ""
                )
                if tiles is not None:
                    impl += "+tiles{BLOCK_N}:{num_warps}:{num_stages}".format(**tiles)
                record(name, impl, b, walls, cfg.total_params())
                rows[-1]["params_run"] = model.config.total_params()  # with the zero padding
                rows[-1]["decode_tiles"] = tiles
                save()
            del model
            free()
    save()
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
