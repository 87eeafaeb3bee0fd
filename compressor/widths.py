"""From per-module sparsities to integer layer widths that keep the global parameter budget."""

from __future__ import annotations

from dataclasses import dataclass

from modegpt_rt.config import LayerWidths, ModelConfig


@dataclass(frozen=True)
class Multiples:
    """Width granularity: MLP channels, rotary pairs (d_qk = 2·pairs), value dims."""

    mlp: int = 1
    pairs: int = 1
    v: int = 1

    @classmethod
    def parse(cls, spec: str | None) -> Multiples:
        """'64,8,16' -> Multiples(64, 8, 16); None/'' -> all 1."""
        if not spec:
            return cls()
        try:
            mlp, pairs, v = (int(x) for x in spec.split(","))
        except ValueError:
            raise ValueError(f"--multiples expects MLP,PAIRS,V (e.g. 64,8,16), got {spec!r}") from None
        if min(mlp, pairs, v) < 1:
            raise ValueError(f"--multiples must be positive, got {spec!r}")
        return cls(mlp, pairs, v)


def _module_specs(config: ModelConfig):
    """(full width, parameter cost per unit of width) for MLP channels, rotary pairs and value dims."""
    d, h, hkv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    return {
        "mlp": (config.intermediate_size, 3 * d),
        "pairs": (config.head_dim // 2, 2 * d * (h + hkv)),
        "v": (config.head_dim, d * (h + hkv)),
    }


def widths_for_sparsity(config: ModelConfig, attn_sparsity, mlp_sparsity, multiples: Multiples = Multiples()):
    """Integer widths per layer closest to the sparsities, rounded to `multiples`, with the total kept
    parameters of the projections as close as the granularity allows to the real-valued budget."""
    specs = _module_specs(config)
    entries = []  # [layer, module, target width, chosen width, unit, full, cost]
    for i in range(config.num_hidden_layers):
        for mod, phi in (("mlp", mlp_sparsity[i]), ("pairs", attn_sparsity[i]), ("v", attn_sparsity[i])):
            full, cost = specs[mod]
            unit = min(getattr(multiples, mod), full)
            target = (1.0 - float(phi)) * full
            w = min(full, max(unit, unit * round(target / unit)))
            if full - target < 0.5 * (full - (full // unit) * unit or unit):
                w = full
            entries.append([i, mod, target, w, unit, full, cost])
    budget = sum(e[2] * e[6] for e in entries)

    def step_down(e):
        return e[3] - e[4] if e[3] != e[5] or e[5] % e[4] == 0 else (e[5] // e[4]) * e[4]

    def step_up(e):
        return min(e[5], e[3] + e[4])

    for _ in range(10 * len(entries)):
        kept = sum(e[3] * e[6] for e in entries)
        delta = kept - budget
        if delta > 0:
            cands = [e for e in entries if step_down(e) >= e[4]]
            if not cands:
                break
            e = max(cands, key=lambda e: (e[3] - e[2]) / e[4])
            new = step_down(e)
        else:
            cands = [e for e in entries if e[3] < e[5]]
            if not cands:
                break
            e = max(cands, key=lambda e: (e[2] - e[3]) / e[4])
            new = step_up(e)
        if abs(kept + (new - e[3]) * e[6] - budget) >= abs(delta):
            break
        e[3] = new
    chosen = {(e[0], e[1]): e[3] for e in entries}
    return [
        LayerWidths(k_mlp=chosen[(i, "mlp")], d_qk=2 * chosen[(i, "pairs")], d_v=chosen[(i, "v")])
        for i in range(config.num_hidden_layers)
    ]
