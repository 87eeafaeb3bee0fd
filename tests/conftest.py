import os

import torch

# Triton kernels are tested under the interpreter where no GPU is present; set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from modegpt_rt.config import ModelConfig

if "MODEGPT_RT_CACHE" not in os.environ:  # tokenizers converted from GGUF go to a cache of this run, not ~/.cache
    import tempfile

    os.environ["MODEGPT_RT_CACHE"] = tempfile.mkdtemp(prefix="modegpt_rt_test_cache_")

DATA_AVAILABLE = True
try:
    from modegpt_rt.data import find_data_dir

    find_data_dir()
except FileNotFoundError:
    DATA_AVAILABLE = False


@torch.no_grad()
def round_matrices_to_bf16(model):
    """Round a float32 model's matrices to the values bfloat16 storage keeps (the reference for
    `store_weights(torch.bfloat16)`, which must compute exactly what this model computes)."""
    for p in model.parameters():
        if p.dim() == 2:
            p.copy_(p.bfloat16())


def tiny_hf_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=10,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A random tiny LLaMA (GQA 6/2, head_dim 10) saved as an HF safetensors folder."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_hf_config()).eval()
    with torch.no_grad():  # make norms non-trivial so they are actually tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("tiny_hf")
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def smollm2_path():
    from modegpt_rt.checkpoint import default_model_path

    try:
        return default_model_path()
    except FileNotFoundError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    import modegpt_rt

    torch.manual_seed(0)
    return modegpt_rt.load(smollm2_path, backend="torch")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_path):
    from transformers import AutoModelForCausalLM

    d, f = os.path.split(smollm2_path)
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()


def random_config(**kw) -> ModelConfig:
    base = dict(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture
def serve():
    """Start `modegpt_rt.server.make_server(model, port=0, **kw)` on a thread; shut down after the test."""
    import threading

    from modegpt_rt.server import make_server

    servers = []

    def start(model, **kw):
        srv = make_server(model, port=0, **kw)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()
