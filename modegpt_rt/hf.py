"""transformers integration: after `import modegpt_rt`,
`AutoModelForCausalLM.from_pretrained(checkpoint_dir)` returns a model whose forward and
`generate` run on modegpt_rt (no remote code).

The config class is registered at import; the model class (`modegpt_rt.hf_model`, a
`PreTrainedModel`) is registered through a stand-in that imports it on first use, because
importing transformers' `PreTrainedModel` and `GenerationMixin` costs about 2.4 s, which every
`modegpt` command and `import modegpt_rt` would otherwise pay without needing them.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from modegpt_rt.config import MODEL_TYPE


class ModegptConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, **kwargs):
        # our RoPE fields are read by modegpt_rt.load from config.json; keep them out of
        # transformers' RoPE standardisation, which warns about the unknown layout
        self.modegpt_rope_scaling = kwargs.pop("rope_scaling", None)
        super().__init__(**kwargs)


def model_class():
    """The real `ModegptForCausalLM`, imported (and registered in place of the stand-in) on first use."""
    from modegpt_rt.hf_model import ModegptForCausalLM

    AutoModelForCausalLM.register(ModegptConfig, ModegptForCausalLM, exist_ok=True)
    return ModegptForCausalLM


class _LoadOnUse(type):
    def __getattr__(cls, name):  # from_pretrained, _from_config, ...: whatever the Auto class asks for
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(model_class(), name)


class _ModegptForCausalLM(metaclass=_LoadOnUse):
    """Stand-in for `modegpt_rt.hf_model.ModegptForCausalLM` in the Auto mapping: it carries the names the
    mapping reads and hands every other attribute to the real class."""

    config_class = ModegptConfig


_ModegptForCausalLM.__name__ = _ModegptForCausalLM.__qualname__ = "ModegptForCausalLM"


def __getattr__(name):  # `from modegpt_rt.hf import ModegptForCausalLM` still gives the real class
    if name == "ModegptForCausalLM":
        return model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


AutoConfig.register(MODEL_TYPE, ModegptConfig, exist_ok=True)
AutoModelForCausalLM.register(ModegptConfig, _ModegptForCausalLM, exist_ok=True)
