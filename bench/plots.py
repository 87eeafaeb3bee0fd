"""PNG plots made from result JSON files (never from memory).

- throughput JSON (`modegpt bench throughput --json`): tok/s vs batch, tok/s vs compression rate;
- quality JSON (`python -m modegpt_rt.bench.quality --json`): perplexity and accuracy vs rate;
- a checkpoint's config.json: per-layer widths / sparsity chosen by the allocation (paper Fig. 8).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rate_series(rows: list[dict]) -> tuple[dict, dict]:
    """modegpt_rt rows grouped by (batch, runtime variant) as (rate, tok/s, label) points, and the dense
    model's tok/s for each group that has one."""
    # a dense model has nothing to pad: its row stands for the "+aligned" runtime at that batch too
    by_batch = defaultdict(list)
    dense = {}
    impls = {r["impl"] for r in rows}
    for r in rows:
        if not r["impl"].startswith("modegpt_rt"):
            continue
        keys = [(r["batch"], r["impl"])]
        if r["label"] == "dense" and r["impl"] + "+aligned" in impls:
            keys.append((r["batch"], r["impl"] + "+aligned"))
        for key in keys:
            by_batch[key].append((r["rate"], r["tok_s"], r["label"]))
            if r["label"] == "dense":
                dense[key] = r["tok_s"]
    for b, impl in [k for k, pts in by_batch.items() if {p[2] for p in pts} == {"dense"}]:
        if (b, impl + "+aligned") in by_batch:  # no compressed model ran unpadded at this batch
            del by_batch[(b, impl)]
    return by_batch, dense


def plot_throughput(res: dict, out_dir: Path, stem: str) -> list[Path]:
    plt = _plt()
    rows = res["results"]
    series = defaultdict(list)
    for r in rows:
        series[(r["label"], r["impl"])].append((r["batch"], r["tok_s"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for (label, impl), pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{label} ({impl})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens/s (new tokens / wall time incl. prefill)")
    ax.set_title(f"throughput, {res.get('device', 'cpu')} {res.get('dtype', '')}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    outs = [out_dir / f"{stem}_vs_batch.png"]
    fig.tight_layout()
    fig.savefig(outs[0], dpi=120)
    plt.close(fig)

    # one line per batch size (and per runtime variant, e.g. with/without CUDA graph), as a multiple of the
    # dense model's throughput at that batch where the run has it: the speed-up compression buys
    by_batch, dense = _rate_series(rows)
    several = len({impl for _, impl in by_batch}) > 1
    relative = bool(by_batch) and all(key in dense for key in by_batch)
    if by_batch:
        fig, ax = plt.subplots(figsize=(6, 4))
        for (b, impl), pts in sorted(by_batch.items()):
            pts.sort()
            scale = dense[(b, impl)] if relative else 1.0
            label = f"batch {b}" + (f" ({impl.split('/', 1)[-1]})" if several else "")
            uniform = [p for p in pts if p[2] != "paper30"]
            (line,) = ax.plot([100 * p[0] for p in uniform], [p[1] / scale for p in uniform], marker="o", label=label)
            for p in pts:
                if p[2] == "paper30":  # the paper's per-layer ranks: a star off the uniform line
                    ax.plot(100 * p[0], p[1] / scale, marker="*", ms=11, color=line.get_color())
        if relative:
            ax.axhline(1.0, ls="--", lw=0.8, color="gray")
            ax.set_ylabel("throughput / dense at the same batch")
            star = any(p[2] == "paper30" for pts in by_batch.values() for p in pts)
            ax.set_title(
                "modegpt_rt speed-up vs compression rate" + (" (star: paper's 30% ranks)" if star else ""), fontsize=9
            )
        else:
            hf = [r for r in rows if r["impl"] == "transformers"]
            for r in hf:
                ax.axhline(r["tok_s"], ls="--", lw=0.8, color="gray")
                ax.text(0, r["tok_s"], f"transformers b{r['batch']}", fontsize=7, va="bottom")
            ax.set_ylabel("tokens/s")
            ax.set_title("modegpt_rt throughput vs compression rate")
        ax.set_xlabel("compression rate (%)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        outs.append(out_dir / f"{stem}_vs_rate.png")
        fig.savefig(outs[-1], dpi=120)
        plt.close(fig)
    return outs


def _quality_series(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by their `series` (the method); rows without one (dense at rate 0) join every series."""
    named = {r["series"] for r in rows if r.get("series")}
    shared = [r for r in rows if not r.get("series")]
    if not named:
        return {"": sorted(rows, key=lambda r: r["rate"])}
    return {
        n: sorted(shared + [r for r in rows if r.get("series") == n], key=lambda r: r["rate"]) for n in sorted(named)
    }


def plot_quality(res: dict, out_dir: Path, stem: str) -> list[Path]:
    """Perplexity and zero-shot accuracy vs rate: one line per series (method); with a single series,
    also each task's accuracy."""
    plt = _plt()
    groups = _quality_series(res["rows"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    markers = "osD^v<>"
    for k, (name, rows) in enumerate(groups.items()):
        m = markers[k % len(markers)]
        pts = [(100 * r["rate"], r["ppl"]) for r in rows if "ppl" in r]
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker=m, label=name or None)
        zs = [r for r in rows if "zeroshot" in r]
        rates = [100 * r["rate"] for r in zs]
        if len(groups) == 1:
            for t in sorted({t for r in zs for t in r["zeroshot"]}):
                axes[1].plot(rates, [100 * r["zeroshot"][t] for r in zs], marker=".", label=t)
        if zs:
            label = "average" + (f" ({name})" if name else "")
            style = dict(color="k", lw=2) if len(groups) == 1 else dict(lw=2)
            axes[1].plot(rates, [100 * r["average"] for r in zs], marker=m, label=label, **style)
    axes[0].set_xlabel("compression rate (%)")
    axes[0].set_ylabel("WikiText-2 perplexity")
    axes[0].grid(alpha=0.3)
    if len(groups) > 1:
        axes[0].legend(fontsize=7)
    axes[1].set_xlabel("compression rate (%)")
    axes[1].set_ylabel("zero-shot accuracy (%)")
    axes[1].legend(fontsize=7)
    axes[1].grid(alpha=0.3)
    fig.suptitle(res.get("title", "quality vs compression rate"))
    fig.tight_layout()
    out = out_dir / f"{stem}.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return [out]


def plot_widths(cfg: dict, out_dir: Path, stem: str) -> list[Path]:
    plt = _plt()
    layers = cfg["layers"]
    comp = cfg.get("compression") or {}
    x = list(range(len(layers)))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, [1 - w["k_mlp"] / cfg["intermediate_size"] for w in layers], marker="o", label="MLP (1 - k/d_int)")
    ax.plot(x, [1 - w["d_qk"] / cfg["head_dim"] for w in layers], marker="s", label="key/query (1 - d_qk/d_h)")
    ax.plot(x, [1 - w["d_v"] / cfg["head_dim"] for w in layers], marker="^", label="value (1 - d_v/d_h)")
    ax.set_xlabel("layer")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)
    ax.set_title(f"per-layer sparsity, {comp.get('allocation', '?')} allocation, rate {comp.get('target_rate', 0):.0%}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = out_dir / f"{stem}_widths.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return [out]


def interleaved_as_throughput(res: dict) -> dict:
    """An interleaved run (`bench.interleaved`: every model once per round, medians over rounds) as a
    throughput result: one modegpt_rt row per model, weight dtype and batch, labelled by its rate, or by its
    checkpoint's folder name where two models share a rate. Runs from before `--weights` are float32."""
    paths_at = defaultdict(set)
    for r in res["results"]:
        paths_at[r["rate"]].add(r["path"])
    rows = []
    for r in res["results"]:
        if len(paths_at[r["rate"]]) > 1:
            label = Path(r["path"]).name
        else:
            label = "dense" if not r["rate"] else f"{100 * r['rate']:g}%"
        dtype = r.get("weight_dtype", "float32")
        impl = "modegpt_rt/cpu, interleaved" + ("" if dtype == "float32" else f", {dtype} weights")
        impl += "" if r.get("huge_pages", True) else ", 4 KB pages"
        rows.append({"label": label, "impl": impl, "batch": r["batch"], "tok_s": r["tok_s"], "rate": r["rate"]})
    return {"kind": "throughput", "device": "cpu", "dtype": "float32", "results": rows}


def plot_interleaved(res: dict, out_dir: Path, stem: str) -> list[Path]:
    return plot_throughput(interleaved_as_throughput(res), out_dir, stem)


def plot_files(paths, out_dir="bench/results") -> list[Path]:
    out_dir = Path(out_dir)
    jobs = []
    for p in map(Path, paths):  # read and recognise every input before writing anything
        if p.is_dir():
            p = p / "config.json"
        try:
            res = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{p}: not a JSON file ({e})") from None
        stem = p.parent.name if p.name == "config.json" else p.stem
        if not isinstance(res, dict):
            kind = None
        elif res.get("kind") == "throughput" and isinstance(res.get("results"), list):
            kind = plot_throughput
        elif res.get("kind") == "interleaved_throughput" and isinstance(res.get("results"), list):
            kind = plot_interleaved
        elif res.get("kind") == "quality" and isinstance(res.get("rows"), list):
            kind = plot_quality
        elif "layers" in res and "intermediate_size" in res:
            kind = plot_widths
        else:
            kind = None
        if kind is None:
            raise ValueError(f"{p}: not a throughput/quality result or a checkpoint config.json")
        jobs.append((kind, res, stem, p))
    out_dir.mkdir(parents=True, exist_ok=True)
    outs = []
    for kind, res, stem, p in jobs:
        try:
            outs += kind(res, out_dir, stem)
        except (KeyError, TypeError, IndexError) as e:
            raise ValueError(f"{p}: a malformed {res.get('kind', 'config')} file ({type(e).__name__}: {e})") from None
    return outs
