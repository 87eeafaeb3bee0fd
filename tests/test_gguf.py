"""GGUF reading: the direct reader (one parse with the `gguf` package) against transformers' reader on tiny
files written here, its fallback to transformers, and damaged or foreign files."""

import dataclasses

import numpy as np
import pytest
import torch
from modegpt_rt.bench.dequant_speed import random_tensor

import modegpt_rt
from modegpt_rt import checkpoint as ck
from modegpt_rt import ggml_blocks
from modegpt_rt.checkpoint import CheckpointError
from modegpt_rt.config import ConfigError

gguf = pytest.importorskip("gguf")


def write_tiny_gguf(
    path,
    *,
    layers=2,
    d=32,
    ff=48,
    heads=4,
    kv_heads=2,
    vocab=64,
    tied=True,
    arch="llama",
    extra=(),
    vocab_key=True,
    quant=None,
):
    """A tiny LLaMA GGUF; `quant` (a ggml block type) stores the embedding and the q/k/v, gate and up
    projections, whose rows hold `d` elements, in that type (`d` a multiple of its block: 32, or 256 for the
    K-quants, which the `gguf` package cannot quantize and so get random quants with small finite scales)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(d // heads)
    if vocab_key:
        w.add_vocab_size(vocab)
    else:  # older files: the vocabulary size is the token list's length
        w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, value in extra:
        w.add_float32(key, value)
    rng = np.random.default_rng(0)
    hd = d // heads

    def tensor(name, shape, dtype=np.float32, rows_of_d=False):
        values = rng.standard_normal(shape).astype(dtype)
        if quant is not None and rows_of_d and quant.name.endswith("_K"):
            w.add_tensor(name, random_tensor(quant.name, *shape, rng), raw_dtype=quant)
        elif quant is not None and rows_of_d:
            w.add_tensor(name, gguf.quants.quantize(values.astype(np.float32), quant), raw_dtype=quant)
        else:
            w.add_tensor(name, values)

    tensor("token_embd.weight", (vocab, d), rows_of_d=True)
    tensor("output_norm.weight", (d,))
    if not tied:
        tensor("output.weight", (vocab, d), np.float16)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", (d,))
        tensor(f"blk.{i}.ffn_norm.weight", (d,))
        tensor(f"blk.{i}.attn_q.weight", (heads * hd, d), np.float16, rows_of_d=True)
        tensor(f"blk.{i}.attn_k.weight", (kv_heads * hd, d), rows_of_d=True)
        tensor(f"blk.{i}.attn_v.weight", (kv_heads * hd, d), rows_of_d=True)
        tensor(f"blk.{i}.attn_output.weight", (d, heads * hd))
        tensor(f"blk.{i}.ffn_gate.weight", (ff, d), rows_of_d=True)
        tensor(f"blk.{i}.ffn_up.weight", (ff, d), np.float16, rows_of_d=True)
        tensor(f"blk.{i}.ffn_down.weight", (d, ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _through_transformers(path, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(ck, "_read_gguf_direct", lambda p: None)
        return ck.read_checkpoint(path)


def _no_default_rope(config):
    # transformers 5 reports plain RoPE as rope_scaling {"rope_type": "default", ...}; the direct reader as None
    kind = (config.rope_scaling or {}).get("rope_type", "default")
    assert kind == "default"
    return dataclasses.replace(config, rope_scaling=None)


@pytest.mark.parametrize("tied,heads,kv_heads", [(True, 4, 2), (False, 6, 3), (True, 4, 4)])
def test_gguf_direct_reader_equals_transformers(tmp_path, monkeypatch, tied, heads, kv_heads):
    # q/k rows un-permuted from llama.cpp's interleaved pairs per head (GQA: k per KV head), float16 and float32
    # tensors, tied and untied heads: the same config and bit-identical tensors as transformers' reader
    path = write_tiny_gguf(tmp_path / "tiny.gguf", d=8 * heads, heads=heads, kv_heads=kv_heads, tied=tied)
    direct = ck._read_gguf_direct(path)
    assert direct is not None
    config, tensors = direct
    ref_config, ref_tensors = _through_transformers(path, monkeypatch)
    assert _no_default_rope(config) == _no_default_rope(ref_config)
    assert config.tie_word_embeddings is tied and ("lm_head.weight" in tensors) is not tied
    assert tensors.keys() == ref_tensors.keys()
    for name, t in tensors.items():
        assert t.dtype == ref_tensors[name].dtype and torch.equal(t, ref_tensors[name]), name
    # and the runtime serves it: the same logits from either reader
    ids = torch.tensor([[1, 5, 9, 3]])
    model = ck.build_model(config, tensors, backend="torch")
    ref = ck.build_model(ref_config, ref_tensors, backend="torch")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("quant", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K", "BF16"])
def test_gguf_block_types_read_directly_equal_transformers(tmp_path, monkeypatch, quant):
    # block types our own dequantizer reads (`modegpt_rt.ggml_blocks`), in a whole file: the same tensors,
    # bit for bit, as transformers' reader, which dequantizes with the `gguf` package
    kind = gguf.GGMLQuantizationType[quant]
    d = max(32, ggml_blocks.BLOCK_VALUES[quant])
    path = write_tiny_gguf(tmp_path / "q.gguf", quant=kind, d=d)
    _, parsed = ck._parse_gguf(path)
    assert sum(t.tensor_type == kind for t in parsed) == 11  # the embedding and five matrices per layer
    config, tensors = ck._read_gguf_direct(path)
    _, ref_tensors = _through_transformers(path, monkeypatch)
    assert tensors.keys() == ref_tensors.keys()
    for name, t in tensors.items():
        assert t.dtype == ref_tensors[name].dtype and torch.equal(t, ref_tensors[name]), name


def _special_halves(rng, n):
    """n float16 scales as bytes: random normals with zeros, subnormals, the largest half, ±Inf and NaN mixed in."""
    h = rng.standard_normal(n).astype(np.float16)
    specials = np.array([0.0, -0.0, 6e-8, -3e-5, 65504.0, np.inf, -np.inf, np.nan], dtype=np.float16)
    h[: len(specials)] = specials
    rng.shuffle(h)
    return h.view(np.uint8).reshape(n, 2)


@pytest.mark.parametrize("kind", sorted(ggml_blocks.BLOCK_BYTES))
def test_gguf_block_dequantizer_matches_the_gguf_package_bit_for_bit(kind, monkeypatch):
    # random bytes with awkward float16 scales: our whole-tensor torch dequantizer against the package's numpy one
    size = ggml_blocks.BLOCK_BYTES[kind]
    rng = np.random.default_rng(7)
    per_row = {"BF16": 96, "Q4_K": 2, "Q5_K": 2, "Q6_K": 2}.get(kind, 3)  # blocks per row: 96, 512 or 96 values
    data = rng.integers(0, 256, size=(40, size * per_row), dtype=np.uint8)
    blocks = data.reshape(-1, size)
    for at in ggml_blocks.SCALE_OFFSETS[kind]:
        blocks[:, at : at + 2] = _special_halves(rng, len(blocks))
    if kind == "BF16":  # random bytes hold NaNs and infinities already; add zeros and a subnormal
        blocks[:4] = np.array([[0, 0], [0, 128], [1, 0], [128, 127]], dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):  # Inf scales times zero quants
        ref = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind])
    got = ggml_blocks.dequantize(data, kind).reshape(ref.shape).numpy()
    assert got.dtype == np.float32
    signed = ggml_blocks.dequantize(data.view(np.int8), kind).reshape(ref.shape).numpy()  # the same bytes
    assert np.array_equal(signed.view(np.uint32), got.view(np.uint32))
    monkeypatch.setitem(
        ggml_blocks.CHUNK_VALUES, kind, 7 * ggml_blocks.BLOCK_VALUES[kind]
    )  # many chunks, the last one short
    chunked = ggml_blocks.dequantize(data, kind).reshape(ref.shape).numpy()
    assert np.array_equal(np.isnan(chunked), np.isnan(got))  # a NaN's sign and payload may vary with the loop
    assert np.array_equal(chunked[~np.isnan(got)].view(np.uint32), got[~np.isnan(got)].view(np.uint32))
    nan = np.isnan(ref)
    assert nan.any() and np.array_equal(nan, np.isnan(got))
    assert np.array_equal(ref[~nan].view(np.uint32), got[~nan].view(np.uint32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_finite_check_finds_every_nan_and_inf(dtype):
    rng = torch.Generator().manual_seed(0)
    assert ck._all_finite(torch.randn(17, 33, generator=rng).to(dtype))
    assert ck._all_finite(torch.empty(0, 5, dtype=dtype)) and ck._all_finite(torch.tensor(3.0, dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for at in (0, 100, 17 * 33 - 1):
            x = torch.randn(17, 33, generator=rng).to(dtype)
            x.view(-1)[at] = bad
            assert not ck._all_finite(x), (bad, at)
            assert not ck._all_finite(x.t())  # a non-contiguous view too


def test_gguf_with_metadata_the_direct_reader_does_not_know_goes_to_transformers(tmp_path):
    path = write_tiny_gguf(tmp_path / "scaled.gguf", extra=[("llama.rope.scaling.factor", 8.0)])
    assert ck._read_gguf_direct(path) is None


def test_damaged_or_foreign_gguf_is_refused_clearly(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        modegpt_rt.load(cut)
    foreign = write_tiny_gguf(tmp_path / "foreign.gguf", arch="gpt2")
    assert ck._read_gguf_direct(foreign) is None  # not LLaMA: transformers' reader decides, and we refuse it
    with pytest.raises((CheckpointError, ConfigError)):
        modegpt_rt.load(foreign)


@pytest.mark.parametrize("kw", [dict(tied=False), dict(vocab_key=False, extra=[("llama.custom", 0.5)])])
def test_gguf_header_parser_agrees_with_the_gguf_package(tmp_path, kw):
    """Our one-pass header parser (`_parse_gguf`) reads the same metadata (numbers, strings, string and number
    arrays) and the same tensor names, shapes, types and bytes as the `gguf` package's reader."""
    path = write_tiny_gguf(tmp_path / "t.gguf", **kw)
    fields, tensors = ck._parse_gguf(path)
    reader = gguf.GGUFReader(str(path))
    assert fields == {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert [(t.name, t.shape, t.tensor_type) for t in tensors] == [
        (t.name, tuple(int(n) for n in t.shape), t.tensor_type) for t in reader.tensors
    ]
    for ours, theirs in zip(tensors, reader.tensors):
        assert ours.data.tobytes() == theirs.data.tobytes(), ours.name


def test_gguf_cut_or_garbled_anywhere_is_refused_clearly(tmp_path):
    """A GGUF cut short at any point of its header or data, or with a garbled type code, gets a CheckpointError
    naming the file, never another exception."""
    data = write_tiny_gguf(tmp_path / "t.gguf").read_bytes()
    _, tensors = ck._parse_gguf(tmp_path / "t.gguf")
    header_end = len(data) - sum(t.data.nbytes for t in tensors)
    for n in sorted({3, 10, 30, 100, header_end // 2, header_end - 1, header_end + 5, len(data) - 1}):
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match=f"cut{n}.gguf"):
            modegpt_rt.load(cut)
    garbled = bytearray(data)
    at = data.index(b"general.architecture") + len("general.architecture")
    garbled[at : at + 4] = (77).to_bytes(4, "little")  # the field's value type: no such type
    (tmp_path / "garbled.gguf").write_bytes(bytes(garbled))
    with pytest.raises(CheckpointError, match="unknown metadata type 77"):
        modegpt_rt.load(tmp_path / "garbled.gguf")
    huge = bytearray(data)
    huge[16:24] = (2**62).to_bytes(8, "little")  # the field count
    (tmp_path / "huge.gguf").write_bytes(bytes(huge))
    with pytest.raises(CheckpointError, match="cannot fit in the file"):
        modegpt_rt.load(tmp_path / "huge.gguf")


def _raw_gguf(fields, tensors, align=32):
    """A GGUF written byte by byte, so that it can break the rules GGUFWriter keeps: `fields` as (key, value)
    with ints as uint32, floats as float32, strings; `tensors` as (name, ggml dims, type, data bytes, offset or
    None for back to back)."""
    import struct

    def string(text):
        b = text.encode()
        return struct.pack("<Q", len(b)) + b

    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(fields))
    for key, v in fields:
        kind, payload = (
            (8, string(v))
            if isinstance(v, str)
            else (6, struct.pack("<f", v))
            if isinstance(v, float)
            else (4, struct.pack("<I", v))
        )
        out += string(key) + struct.pack("<I", kind) + payload
    blobs, at = b"", 0
    for name, dims, kind, data, offset in tensors:
        out += string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", kind, at if offset is None else offset)
        blobs += data + b"\0" * (-len(data) % align)
        at += len(data) + (-len(data) % align)
    return out + b"\0" * (-len(out) % align) + blobs


def _llama_fields(layers=1, d=8, heads=2, context=64, **replace):
    fields = {
        "general.architecture": "llama",
        "llama.block_count": layers,
        "llama.context_length": context,
        "llama.embedding_length": d,
        "llama.feed_forward_length": 16,
        "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": heads,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.vocab_size": 16,
    }
    fields.update(replace)
    return list(fields.items())


def _llama_tensors(d=8, q_rows=8, kind=0):
    def t(name, *dims):
        return (name, dims, kind, np.ones(int(np.prod(dims)), "<f8" if kind == 28 else "<f4").tobytes(), None)

    return [
        t("token_embd.weight", d, 16),
        t("output_norm.weight", d),
        t("blk.0.attn_norm.weight", d),
        t("blk.0.ffn_norm.weight", d),
        t("blk.0.attn_q.weight", d, q_rows),
        t("blk.0.attn_k.weight", d, d),
        t("blk.0.attn_v.weight", d, d),
        t("blk.0.attn_output.weight", d, d),
        t("blk.0.ffn_gate.weight", d, 16),
        t("blk.0.ffn_up.weight", d, 16),
        t("blk.0.ffn_down.weight", 16, d),
    ]


def test_gguf_breaking_llama_cpp_rules_is_refused_naming_the_file(tmp_path):
    """What llama.cpp refuses we refuse too, and what the `gguf` package cannot read gets a CheckpointError or
    ConfigError that names the file: repeated keys or tensors, a bad alignment, tensors not stored back to
    back, a garbled layer count or context, a type gguf cannot dequantize, q rows that are no rotary pairs."""
    good = tmp_path / "good.gguf"
    good.write_bytes(_raw_gguf(_llama_fields(), _llama_tensors()))
    assert modegpt_rt.load(good, tokenizer=False).config.num_hidden_layers == 1
    moved = _llama_tensors()
    moved[1] = (*moved[1][:4], 64)  # output_norm stored after a gap
    cases = {
        "key": (_llama_fields() + [("llama.block_count", 1)], _llama_tensors(), "appears twice"),
        "tensor": (_llama_fields(), _llama_tensors() + _llama_tensors()[2:3], "appears twice"),
        "align": (_llama_fields(**{"general.alignment": 24}), _llama_tensors(), "power of two"),
        "offset": (_llama_fields(), moved, "data offset 64"),
        "layers": (_llama_fields(layers=2**31), _llama_tensors(), "block_count=2147483648 does not fit"),
        "context": (_llama_fields(context=2**31), _llama_tensors(), "must be below 2\\*\\*31"),
        "f64": (_llama_fields(), _llama_tensors(kind=28), "token_embd.weight \\(F64"),
        "rows": (_llama_fields(heads=4), _llama_tensors(q_rows=12), "12 rows are not whole rotary pairs of 4 heads"),
    }
    for name, (fields, tensors, message) in cases.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(_raw_gguf(fields, tensors))
        with pytest.raises((CheckpointError, ConfigError), match=message) as e:
            modegpt_rt.load(path, tokenizer=False)
        assert f"{name}.gguf" in str(e.value), name


def test_gguf_without_vocab_size_key_counts_the_token_list(tmp_path):
    path = write_tiny_gguf(tmp_path / "old.gguf", vocab=70, vocab_key=False)
    config, tensors = ck._read_gguf_direct(path)
    assert config.vocab_size == 70 and tensors["model.embed_tokens.weight"].shape == (70, 32)


def test_tokenizer_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    for off in ("off", "0", "", "none"):
        monkeypatch.setenv("MODEGPT_RT_CACHE", off)
        assert ck.tokenizer_cache_dir() is None
    monkeypatch.setenv("MODEGPT_RT_CACHE", str(tmp_path / "c"))
    assert ck.tokenizer_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MODEGPT_RT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ck.tokenizer_cache_dir() == tmp_path / "xdg" / "modegpt_rt"
