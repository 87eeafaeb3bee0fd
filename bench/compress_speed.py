"""How long `compress` takes, and how much memory it holds, on a model shape with random weights.

    python -m modegpt_rt.bench.compress_speed --shape llama2-7b --layers 4 --device cuda --json OUT.json
        [--samples 128] [--seqlen 2048] [--rate 0.3] [--max-layer-sparsity 0.5] [--attn-ratio 0.5]
        [--refit all] [--compute-dtype auto] [--offload]

The time of a compression depends on the shape, the calibration size and the options, not on the weights'
values, so a random dense model (float32) and random calibration tokens stand in for a real one. `--layers`
keeps the first N layers of the shape, so that a large model's per-layer time can be measured inside one
device call; the JSON gives the per-layer time (compression minus allocation, over the layers) and says so
when it is extrapolated to the whole depth. Defaults: the demo's settings (`make demo`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
from modegpt_rt.bench.gpu_throughput import LLAMA2_7B, TINY, random_model
from modegpt_rt.bench.machine import write_result
from modegpt_rt.compressor.compress import CompressOptions, compress

from modegpt_rt.config import ModelConfig

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)
SHAPES = {"llama2-7b": LLAMA2_7B, "smollm2-135m": SMOLLM2_135M, "tiny": TINY}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    p.add_argument("--layers", type=int, default=None, help="keep the first N layers (default: all)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--offload", action="store_true", help="keep the layers in CPU memory (`compress --offload`)")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--rate", type=float, default=0.3)
    p.add_argument("--max-layer-sparsity", type=float, default=0.5)
    p.add_argument("--attn-ratio", type=float, default=0.5)
    p.add_argument("--refit", choices=["none", "mlp", "all"], default="all")
    p.add_argument("--compute-dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    shape = dict(SHAPES[args.shape])
    full_depth = shape["num_hidden_layers"]
    if args.layers is not None:
        if not 1 <= args.layers <= full_depth:
            p.error(f"--layers must be in [1, {full_depth}] for {args.shape}")
        shape["num_hidden_layers"] = args.layers
    shape["max_position_embeddings"] = max(shape["max_position_embeddings"], args.seqlen)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here")
    cfg = ModelConfig(**shape)
    if args.offload and device.type == "cpu":
        p.error("--offload needs a GPU --device")
    model = random_model(cfg, "cpu" if args.offload else device, torch.float32)
    model.set_backend("torch")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.samples, args.seqlen), generator=g)
    opts = CompressOptions(
        rate=args.rate,
        max_layer_sparsity=args.max_layer_sparsity,
        attn_ratio=args.attn_ratio,
        refit=args.refit,
        compute_dtype=args.compute_dtype,
    )
    t0 = time.perf_counter()
    report = compress(model, tokens, opts, progress=True, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    per_layer = (report["wall_seconds"] - report["allocation_seconds"]) / cfg.num_hidden_layers
    row = {
        "shape": args.shape,
        "layers": cfg.num_hidden_layers,
        "of_layers": full_depth,
        "calibration": [args.samples, args.seqlen],
        "options": {k: v for k, v in dataclasses.asdict(opts).items() if k != "multiples"},
        "device": report["device"],
        "offload": report["offload"],
        "compute_dtype": report["compute_dtype"],
        "wall_seconds": round(wall, 1),
        "allocation_seconds": report["allocation_seconds"],
        "seconds_per_layer": round(per_layer, 2),
        "peak_rss_gib": report["peak_rss_gib"],
        "peak_device_gib": report["peak_device_gib"],
        "achieved_rate": report["achieved_rate"],
    }
    if cfg.num_hidden_layers < full_depth:
        row["extrapolated_full_depth_seconds"] = round(report["allocation_seconds"] + per_layer * full_depth, 1)
        row["note"] = (
            f"measured on the first {cfg.num_hidden_layers} of {full_depth} layers; the whole depth is "
            "extrapolated from the per-layer time (the allocation pass grows with depth too)"
        )
    write_result(args.json, "compress_speed", "compress_speed", argv, results=[row])
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
