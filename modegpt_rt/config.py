"""Model configuration: the base model's fields plus every layer's own widths.

A dense model is the special case where every width is full, so dense and
compressed models go through exactly the same code path.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from typing import Any

FORMAT_VERSION = 1
MODEL_TYPE = "modegpt_llama"


class ConfigError(ValueError):
    """A config that cannot describe a model we can serve."""


def _positive(v) -> bool:
    """A finite number > 0 (not a bool)."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and 0 < v < float("inf")


@dataclass(frozen=True)
class LayerWidths:
    """Widths of one transformer layer after compression.

    k_mlp: intermediate MLP channels kept; d_qk: per-head query/key width (even:
    whole rotary pairs); d_v: per-head value width.
    """

    k_mlp: int
    d_qk: int
    d_v: int


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    hidden_act: str = "silu"
    layers: tuple[LayerWidths, ...] = ()
    compression: dict | None = None

    def __post_init__(self):
        if not self.layers:
            full = LayerWidths(self.intermediate_size, self.head_dim, self.head_dim)
            object.__setattr__(self, "layers", tuple(full for _ in range(self.num_hidden_layers)))
        layers = []
        for i, w in enumerate(self.layers):
            if not isinstance(w, LayerWidths):
                if not isinstance(w, dict) or set(w) != {"k_mlp", "d_qk", "d_v"}:
                    raise ConfigError(f"layer {i}: widths must be {{k_mlp, d_qk, d_v}}, got {w!r}")
                w = LayerWidths(**w)
            layers.append(w)
        object.__setattr__(self, "layers", tuple(layers))
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        for name in sizes + ("num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ConfigError(f"{name}={v!r} must be a positive integer")
        if self.max_position_embeddings >= 2**31:  # positions and cache lengths are int32 in the kernels
            raise ConfigError(f"max_position_embeddings={self.max_position_embeddings} must be below 2**31")
        for name in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, name)
            if not _positive(v):
                raise ConfigError(f"{name}={v!r} must be a positive number")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported (only 'silu', as in LLaMA)")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if len(self.layers) != self.num_hidden_layers:
            raise ConfigError(f"{len(self.layers)} layer widths given for num_hidden_layers={self.num_hidden_layers}")
        for i, w in enumerate(self.layers):
            if not all(is_int(x) for x in (w.k_mlp, w.d_qk, w.d_v)):
                raise ConfigError(f"layer {i}: widths must be integers, got {w}")
            if not 1 <= w.k_mlp <= self.intermediate_size:
                raise ConfigError(f"layer {i}: k_mlp={w.k_mlp} outside [1, {self.intermediate_size}]")
            if w.d_qk % 2 or not 2 <= w.d_qk <= self.head_dim:
                raise ConfigError(f"layer {i}: d_qk={w.d_qk} must be even and in [2, {self.head_dim}]")
            if not 1 <= w.d_v <= self.head_dim:
                raise ConfigError(f"layer {i}: d_v={w.d_v} outside [1, {self.head_dim}]")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            ids = v if isinstance(v, (list, tuple)) else [] if v is None else [v]
            if not all(is_int(t) and 0 <= t < self.vocab_size for t in ids):
                raise ConfigError(f"{name}={v!r} must be a token id (or a list of them) in [0, {self.vocab_size})")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"tie_word_embeddings={self.tie_word_embeddings!r} must be true or false")
        if self.compression is not None and not isinstance(self.compression, dict):
            raise ConfigError(f"'compression' must be an object or null, got {type(self.compression).__name__}")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise ConfigError(f"rope scaling must be an object or null, got {self.rope_scaling!r}")
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ("default", "linear", "llama3"):
                raise ConfigError(f"rope scaling type {kind!r} is not supported (default, linear, llama3)")
            need = {"linear": ["factor"], "default": []}.get(
                kind, ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
            )
            bad = [k for k in need if not _positive(self.rope_scaling.get(k))]
            if bad:
                raise ConfigError(f"rope scaling {kind!r} needs positive finite {', '.join(bad)}")

    # ----------------------------------------------------------- derived sizes
    @property
    def group_size(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def is_dense(self) -> bool:
        return all(w == LayerWidths(self.intermediate_size, self.head_dim, self.head_dim) for w in self.layers)

    def layer_params(self, i: int) -> int:
        """Weights of layer i's projections (norms excluded; they are never compressed)."""
        w, d = self.layers[i], self.hidden_size
        h, hkv = self.num_attention_heads, self.num_key_value_heads
        attn = d * (h * w.d_qk + hkv * w.d_qk + hkv * w.d_v) + h * w.d_v * d
        return attn + 3 * d * w.k_mlp

    def block_params(self) -> int:
        """All transformer-block parameters, norms included."""
        norms = 2 * self.hidden_size * self.num_hidden_layers
        return sum(self.layer_params(i) for i in range(self.num_hidden_layers)) + norms

    def total_params(self) -> int:
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else emb
        return self.block_params() + emb + head + self.hidden_size

    def with_layers(self, layers, compression: dict | None = None) -> ModelConfig:
        return dataclasses.replace(self, layers=tuple(layers), compression=compression)

    def dense(self) -> ModelConfig:
        return dataclasses.replace(self, layers=(), compression=None)

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    # --------------------------------------------------------------- json i/o
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = [dataclasses.asdict(w) for w in self.layers]
        return {
            "model_type": MODEL_TYPE,
            "architectures": ["ModegptForCausalLM"],
            "format_version": FORMAT_VERSION,
            **d,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        if d.get("model_type") != MODEL_TYPE:
            raise ConfigError(f"model_type={d.get('model_type')!r}; expected {MODEL_TYPE!r}")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ConfigError(f"checkpoint format_version={version}; this modegpt_rt reads {FORMAT_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in d and f.default is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"config.json lacks required fields: {', '.join(missing)}")
        if not isinstance(d.get("layers", []), list):
            raise ConfigError("config 'layers' must be a list of per-layer widths")
        if d.get("rope_scaling") is not None and not isinstance(d["rope_scaling"], dict):
            raise ConfigError("config 'rope_scaling' must be an object or null")
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path) -> ModelConfig:
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d)


SUPPORTED_HF_TYPES = ("llama", "mistral")


def from_hf_config(hf: Any) -> ModelConfig:
    """Build a dense ModelConfig from a transformers LlamaConfig-like object or dict."""
    get = hf.get if isinstance(hf, dict) else (lambda k, default=None: getattr(hf, k, default))
    model_type = get("model_type")
    if model_type not in SUPPORTED_HF_TYPES:
        raise ConfigError(
            f"unsupported architecture model_type={model_type!r}; modegpt_rt handles LLaMA-family "
            f"models ({', '.join(SUPPORTED_HF_TYPES)})"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if get(flag, False):
            raise ConfigError(f"{flag}=True is not supported (LLaMA-family models have no projection biases)")
    heads, hidden = get("num_attention_heads"), get("hidden_size")
    # derived only from valid sizes; `validate` names a missing or bad one (before head_dim)
    per_head = hidden // heads if all(_positive(x) and isinstance(x, int) for x in (heads, hidden)) else None
    rope = get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"rope_parameters must be an object, got {rope!r}")
    theta = rope.get("rope_theta", get("rope_theta", 10000.0))
    scaling = get("rope_scaling")
    if rope and rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    context = get("max_position_embeddings", 2048)
    window = get("sliding_window")
    if _positive(window) and _positive(context) and window < context:
        # no sliding-window attention here: full attention is exact up to the window, so that is the context
        warnings.warn(
            f"sliding_window={window}: modegpt_rt attends to every position, which is exact only within the "
            f"window; the context is limited to {window} tokens (max_position_embeddings was {context})",
            stacklevel=2,
        )
        context = int(window)
    return ModelConfig(
        vocab_size=get("vocab_size"),
        hidden_size=hidden,
        intermediate_size=get("intermediate_size"),
        num_hidden_layers=get("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=get("num_key_value_heads") or heads,
        head_dim=get("head_dim") or per_head,
        rms_norm_eps=_as_float(get("rms_norm_eps", 1e-5)),
        rope_theta=_as_float(theta),
        rope_scaling=scaling,
        max_position_embeddings=context,
        tie_word_embeddings=get("tie_word_embeddings", False),
        bos_token_id=get("bos_token_id"),
        eos_token_id=get("eos_token_id"),
        hidden_act=get("hidden_act", "silu"),
    )


def _as_float(v):
    """A number as float; anything else as it is, for `validate` to name."""
    return float(v) if _positive(v) else v
