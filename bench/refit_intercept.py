"""Would an intercept (a bias) on the refit output/down projections lower the refit's error?

    python -m modegpt_rt.bench.refit_intercept --samples 16 --json bench/results/refit_intercept_smollm2.json

Compresses SmolLM2 at 30% in the demo setting (refit on every calibration window) and, at each refit, also
solves the least-squares problem with a constant column added (the intercept) from the same statistics plus
column sums. Reports each refit's residual ‖A W − Y‖² / ‖Y‖² without and with the intercept. The compressed
model itself is the usual one: the probe only watches. Eleventh session: a median 0.017% lower (at most
0.31%), so the checkpoint format did not get a bias tensor.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from modegpt_rt.compressor import compress as C
from modegpt_rt.compressor.compress import CompressOptions

import modegpt_rt
from modegpt_rt import data


class _Probe:
    """Wraps the compressor's statistics so each refit also sees Σa, Σy, Σ‖y‖² and the token count."""

    def __init__(self):
        self.rows, self.last, self.idx = [], None, None
        self._add, self._mlp, self._refit = C._Cross.add, C.compress_mlp, C.refit_projection

    def install(self):
        probe = self

        def add(cross, a, b):
            probe._add(cross, a, b)
            a2, b2 = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
            if not hasattr(cross, "n"):
                cross.sa, cross.sy, cross.yy, cross.n = 0.0, 0.0, 0.0, 0
            cross.sa = cross.sa + a2.sum(0)
            cross.sy = cross.sy + b2.sum(0)
            cross.yy += float((b2**2).sum())
            cross.n += a2.shape[0]
            probe.last = cross

        def compress_mlp(*args, **kw):
            new, probe.idx = probe._mlp(*args, **kw)
            return new, probe.idx

        C._Cross.add, C.compress_mlp, C.refit_projection = add, compress_mlp, self.refit

    def uninstall(self):
        C._Cross.add, C.compress_mlp, C.refit_projection = self._add, self._mlp, self._refit

    @staticmethod
    def _residual(gram, cross, W, yy):
        return yy - 2 * float((W * cross).sum()) + float((W * (gram @ W)).sum())

    def refit(self, gram, cross, ridge=1e-6, prior=None, pull=0.0):
        W = self._refit(gram, cross, ridge, prior, pull)
        X = self.last
        mlp = cross.shape[0] != X.C.shape[0]  # the MLP's cross rows are the kept channels
        sa = X.sa[self.idx] if mlp else X.sa
        n = gram.shape[0]
        G1 = torch.zeros(n + 1, n + 1, dtype=torch.float64)
        G1[:n, :n], G1[:n, n], G1[n, :n], G1[n, n] = gram, sa, sa, X.n
        C1 = torch.cat([cross, X.sy[None]], 0)
        W1 = self._refit(G1, C1, ridge)
        self.rows.append(
            {
                "refit": len(self.rows),  # in order: each layer's attention (once refit), then its MLP
                "module": "mlp" if mlp else "attn",
                "residual": self._residual(gram, cross, W, X.yy) / X.yy,
                "residual_with_intercept": self._residual(G1, C1, W1, X.yy) / X.yy,
            }
        )
        return W


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=16, help="calibration windows of 2048 (all refit)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    model = modegpt_rt.load(None, backend="torch")
    calib = data.calibration_windows(
        data.tokenize(model.tokenizer, data.read_text("wikitext2", "valid")), args.samples, 2048, 0
    )
    opts = CompressOptions(rate=0.3, max_layer_sparsity=0.5, attn_ratio=0.5, refit="all", refit_samples=0)
    probe = _Probe()
    probe.install()
    try:
        C.compress(model, calib, opts, progress=True)
    finally:
        probe.uninstall()
    gains = [(r["residual"] - r["residual_with_intercept"]) / r["residual"] for r in probe.rows if r["residual"] > 1e-6]
    out = {"samples": args.samples, "rate": 0.3, "rows": probe.rows, "median_relative_gain": statistics.median(gains)}
    out["max_relative_gain"] = max(gains)
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
