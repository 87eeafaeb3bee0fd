"""The runtime and checkpoint contract on tiny random models."""

import functools
import json
import re
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from conftest import round_matrices_to_bf16, tiny_hf_config
from modegpt_rt.compressor.compress import CompressOptions, compress

import modegpt_rt
from modegpt_rt.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from modegpt_rt.config import ConfigError
from modegpt_rt.generate import _generate_static


def _hf_logits(path, ids):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits


def test_hf_folder_matches_transformers(tiny_hf_dir):
    model = modegpt_rt.load(tiny_hf_dir, backend="torch")
    ids = torch.randint(0, 97, (3, 40))
    assert (model(ids).logits - _hf_logits(tiny_hf_dir, ids)).abs().max() < 1e-5


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_cached_steps_match_full_forward_ragged(tiny_hf_dir, backend):
    model = modegpt_rt.load(tiny_hf_dir, backend="torch")
    if backend == "cpu":
        from modegpt_rt.kernels import cpu

        if not cpu.available():
            pytest.fail(f"C++ kernel not built: {cpu.load_error()}")
        model.set_backend("cpu")
    torch.manual_seed(1)
    lens = [7, 12, 3]
    seqs = [torch.randint(0, 97, (n + 5,)) for n in lens]
    cache = model.new_cache(3, 40)
    batch = torch.zeros(3, max(lens), dtype=torch.long)
    for i, n in enumerate(lens):
        batch[i, :n] = seqs[i][:n]
    first = model.step(batch, cache, torch.tensor(lens, dtype=torch.int32))
    outs = [first]
    for t in range(5):
        nxt = torch.stack([seqs[i][lens[i] + t] for i in range(3)])[:, None]
        outs.append(model.step(nxt, cache, torch.ones(3, dtype=torch.int32)))
    for i, n in enumerate(lens):
        full = model(seqs[i][None]).logits[0]
        for t in range(6):
            assert torch.allclose(outs[t][i], full[n - 1 + t], atol=1e-4), (i, t)


def test_rate_zero_reproduces_logits_and_roundtrips(tiny_hf_dir, tmp_path):
    model = modegpt_rt.load(tiny_hf_dir, backend="torch")
    ids = torch.randint(0, 97, (2, 30))
    before = model(ids).logits
    calib = torch.randint(0, 97, (4, 32))
    compress(model, calib, CompressOptions(rate=0.0, refit="none"), progress=False)
    assert (model(ids).logits - before).abs().max() < 1e-5
    save_checkpoint(model, tmp_path / "ckpt")
    again = modegpt_rt.load(tmp_path / "ckpt", backend="torch")
    assert (again(ids).logits - before).abs().max() < 1e-5


@pytest.mark.parametrize(
    "opts",
    [
        dict(rate=0.3, refit="none"),
        dict(rate=0.4, allocation="uniform"),
        dict(rate=0.3, split=True),
        dict(rate=0.25, value_method="b1"),
        dict(rate=0.3, multiples="16,2,4"),
        dict(rate=0.3, allocation="uniform", refit="mlp"),
        dict(rate=0.3, refit="all"),
        dict(rate=0.3, refit="all", refit_samples=3),
        dict(rate=0.3, attn_ratio=0.0, max_layer_sparsity=0.4),
        dict(rate=0.2, allocation="uniform", attn_ratio=2.0),
    ],
)
def test_compress_writes_valid_variable_rank_checkpoint(tiny_hf_dir, tmp_path, opts):
    from modegpt_rt.compressor.widths import Multiples

    opts = dict(opts)
    if "multiples" in opts:
        opts["multiples"] = Multiples.parse(opts["multiples"])
    model = modegpt_rt.load(tiny_hf_dir, backend="torch")
    dense_params = model.config.total_params()
    ids = torch.randint(0, 97, (2, 24))
    dense_logits = model(ids).logits
    calib = torch.randint(0, 97, (8, 32))
    report = compress(model, calib, CompressOptions(**opts, bi_samples=4), progress=False)
    assert report["achieved_rate"] == pytest.approx(opts["rate"], abs=0.06)
    assert model.config.total_params() < dense_params
    assert all(w.d_qk % 2 == 0 for w in model.config.layers)
    out = save_checkpoint(model, tmp_path / "c")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["compression"]["target_rate"] == opts["rate"] and len(cfg["layers"]) == 3
    loaded = modegpt_rt.load(out, backend="torch")
    logits = loaded(ids).logits
    assert torch.allclose(logits, model(ids).logits, atol=1e-5)
    assert torch.isfinite(logits).all() and not torch.allclose(logits, dense_logits, atol=1e-3)


def test_compress_rejects_bad_options(tiny_hf_dir):
    model = modegpt_rt.load(tiny_hf_dir, backend="torch")
    bads = (dict(rate=-0.1), dict(rate=0.96), dict(rate=0.3, allocation="nope"), dict(rate=0.2, ridge=0))
    bads += (dict(rate=0.2, refit="some"), dict(rate=0.2, refit="mlp", refit_samples=-1))
    bads += (dict(rate=0.2, refit_prior=-0.1), dict(rate=0.2, refit_prior=float("nan")))
    bads += (dict(rate=0.2, attn_ratio=-1), dict(rate=0.3, split=True, attn_ratio=0.5))
    bads += (dict(rate=0.8, allocation="uniform", attn_ratio=0.0),)  # the MLP alone would need 0.8 · 4/3 > 0.95
    bads += (dict(rate=0.95), dict(rate=0.3, eps=0.0), dict(rate=0.3, eps=-0.01), dict(rate=0.3, bi_samples=0))
    bads += (dict(rate=0.5, max_layer_sparsity=0.97), dict(rate=0.3, max_layer_sparsity=0.0))
    bads += (dict(rate=0.3, ridge=float("nan")), dict(rate=0.3, ridge=float("inf")))
    for bad in bads:
        with pytest.raises(ValueError):
            compress(model, torch.randint(0, 97, (2, 8)), CompressOptions(**bad), progress=False)


@pytest.mark.parametrize(
    "opts",
    [
        dict(rate=0.3),
        dict(rate=0.3, allocation="sensitivity", compute_dtype="bfloat16", bi_samples=2, probe_tokens=64),
        dict(rate=0.3, split=True, refit="mlp", refit_samples=7, max_layer_sparsity=0.6),
    ],
    ids=["global-refit-all", "sensitivity-bf16", "split-refit-mlp"],
)
def test_compress_names_the_device_of_every_tensor(tiny_hf_dir, opts):
    """`compress --device cuda` runs where the model is: every tensor the compressor makes names its device
    (the model's, or the host's for the allocation's bookkeeping). Under a `meta` default device, any factory
    call that forgot it makes a tensor without data and the run fails; with none forgotten the weights are
    bit for bit those of a plain run."""
    calib = torch.randint(0, 97, (8, 48), generator=torch.Generator().manual_seed(3))
    plain = modegpt_rt.load(tiny_hf_dir, backend="torch")
    compress(plain, calib, CompressOptions(**opts), progress=False)
    strict = modegpt_rt.load(tiny_hf_dir, backend="torch")
    with torch.device("meta"):
        compress(strict, calib, CompressOptions(**opts), progress=False)
    assert strict.config.layers == plain.config.layers != strict.config.dense().layers
    for (name, a), b in zip(plain.state_dict().items(), strict.state_dict().values()):
        assert b.device.type == "cpu" and torch.equal(a, b), name


def test_offloaded_compression_moves_one_layer_at_a_time(tiny_hf_dir, monkeypatch):
    """`compress(device=...)` on a model kept elsewhere (`--offload`): the schedule of moves, forced on this
    one-device machine. The shell (embedding, norm, LM head, RoPE tables) moves out and back once; each layer
    moves to the compute device twice (Block Influence, then its compression), never while another layer is
    there, and back after each turn; the weights are those of a plain run. Sensitivity allocation, which runs
    the rest of the model for each trial, is refused with offloading unless its table is reused."""
    from modegpt_rt.compressor import compress as compress_mod

    from modegpt_rt.model import Layer, Model

    calib = torch.randint(0, 97, (8, 48), generator=torch.Generator().manual_seed(3))
    plain = modegpt_rt.load(tiny_hf_dir, backend="torch")
    compress(plain, calib, CompressOptions(rate=0.3), progress=False)

    model = modegpt_rt.load(tiny_hf_dir, backend="torch")
    index = {id(layer): i for i, layer in enumerate(model.layers)}
    events = []
    layer_to, model_to = Layer.to, Model.to

    def record_layer(self, *a, **k):
        events.append(("layer", index[id(self)]))
        return layer_to(self, *a, **k)

    def record_model(self, *a, **k):
        events.append(("shell", len(self.layers)))
        return model_to(self, *a, **k)

    monkeypatch.setattr(Layer, "to", record_layer)
    monkeypatch.setattr(Model, "to", record_model)
    monkeypatch.setattr(compress_mod, "_offloaded", functools.partial(compress_mod._offloaded, always=True))
    compress(model, calib, CompressOptions(rate=0.3), progress=False, device="cpu")
    L = len(model.layers)
    turns = [("layer", i) for i in range(L) for _ in range(2)]  # to the device, back
    assert events == [("shell", 0)] + turns + turns + [("shell", 0)]
    for (name, a), b in zip(plain.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name

    monkeypatch.undo()
    fresh = modegpt_rt.load(tiny_hf_dir, backend="torch")
    with pytest.raises(ValueError, match="sensitivity-from"):
        compress(fresh, calib, CompressOptions(rate=0.3, allocation="sensitivity"), progress=False, device="cuda")
    assert fresh.config.is_dense


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compresses on a CUDA device")
def test_compress_on_cuda_matches_the_cpu(tiny_hf_dir):
    """The same compression on a CUDA device (float32 passes) picks the same widths and kept channels and gives
    the CPU run's logits up to float32 rounding."""
    calib = torch.randint(0, 97, (8, 48), generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, 97, (2, 30))
    models = {}
    for dev in ("cpu", "cuda"):
        m = modegpt_rt.load(tiny_hf_dir, device=dev, backend="torch", align=False)
        report = compress(m, calib, CompressOptions(rate=0.3, compute_dtype="float32"), progress=False)
        assert report["device"].startswith(dev) and (report["peak_device_gib"] is None) == (dev == "cpu")
        models[dev] = m
    cpu, gpu = models["cpu"], models["cuda"]
    assert gpu.config.layers == cpu.config.layers
    for a, b in zip(cpu.layers, gpu.layers):
        assert torch.equal(a.freq_idx, b.freq_idx.cpu())
    want = cpu(ids).logits
    assert (gpu(ids.cuda()).logits.cpu() - want).abs().max() < 1e-3 * want.abs().max()
    offloaded = modegpt_rt.load(tiny_hf_dir, backend="torch")  # on the CPU; each layer visits the GPU
    report = compress(offloaded, calib, CompressOptions(rate=0.3, compute_dtype="float32"), False, device="cuda")
    assert report["offload"] and report["device"].startswith("cuda") and offloaded.device.type == "cpu"
    assert all(p.device.type == "cpu" for p in offloaded.parameters())
    assert offloaded.config.layers == cpu.config.layers
    assert (offloaded(ids).logits - gpu(ids.cuda()).logits.cpu()).abs().max() < 1e-5 * want.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compresses on a CUDA device")
def test_compress_cli_on_cuda_tied_model_generated_calibration(tmp_path):
    """The command line on a GPU, on a model with tied embeddings (as SmolLM2): data-free calibration sampled on
    the device (the torch backend's `generate` there must not record a CUDA graph), with and without
    --offload, each checkpoint saved and loaded back on the CPU."""
    from modegpt_rt.kernels import has_native_bfloat16
    from transformers import LlamaForCausalLM

    from modegpt_rt import cli

    torch.manual_seed(0)
    src = tmp_path / "tied"
    LlamaForCausalLM(tiny_hf_config(tie_word_embeddings=True)).eval().save_pretrained(src, safe_serialization=True)
    ref = modegpt_rt.load(src, backend="torch")
    on_gpu = modegpt_rt.load(src, device="cuda", backend="torch")
    prompts = [[5, 6, 7], [8, 9]]
    want = [r.token_ids for r in ref.generate(prompts, max_new_tokens=5, temperature=0, ignore_eos=True)]
    assert [r.token_ids for r in on_gpu.generate(prompts, max_new_tokens=5, temperature=0, ignore_eos=True)] == want
    argv = ["compress", "--model", str(src), "--rate", "0.3", "--calib", "generated", "--samples", "8"]
    argv += ["--seqlen", "48", "--device", "cuda", "--quiet"]
    for extra in ([], ["--offload"]):
        out = tmp_path / f"ck{len(extra)}"
        assert cli.main(argv + extra + ["--out", str(out)]) == 0
        back = modegpt_rt.load(out)
        report = back.config.compression
        assert report["device"].startswith("cuda") and report["offload"] == bool(extra)
        assert report["compute_dtype"] == ("bfloat16" if has_native_bfloat16("cuda") else "float32")
        assert back.config.tie_word_embeddings and back.lm_head is back.embed
        assert back.config.layers != back.config.dense().layers
        assert torch.isfinite(back(torch.tensor([[5, 6, 7, 8]])).logits).all()


def test_attn_ratio_splits_each_layer_budget(tiny_hf_dir):
    """attn_ratio 0 leaves attention dense and takes each layer's share from the MLP; ratio 2 makes the
    attention sparsity twice the MLP's. The parameters removed per layer match the layer's sparsity."""
    from modegpt_rt.compressor.compress import plan_sparsity, split_layer_sparsity

    attn, mlp = split_layer_sparsity([0.1, 0.3], 0.0, attn_params=100, mlp_params=300)
    assert attn == [0.0, 0.0] and mlp == pytest.approx([0.1 * 4 / 3, 0.3 * 4 / 3])
    attn, mlp = split_layer_sparsity([0.3], 2.0, attn_params=100, mlp_params=300)
    assert attn[0] == pytest.approx(2 * mlp[0]) and attn[0] * 100 + mlp[0] * 300 == pytest.approx(0.3 * 400)
    model = modegpt_rt.load(tiny_hf_dir, backend="torch")
    calib = torch.randint(0, 97, (4, 16))
    opts = dict(rate=0.3, attn_ratio=0.0, max_layer_sparsity=0.4, bi_samples=2)
    attn, mlp, info = plan_sparsity(model, calib, CompressOptions(**opts))
    assert attn == [0.0] * 3 and min(mlp) > 0 and info["attn_ratio"] == 0.0
    compress(model, calib, CompressOptions(**opts, refit="none"), progress=False)
    full = model.config.dense().layers[0]
    assert all((w.d_qk, w.d_v) == (full.d_qk, full.d_v) and w.k_mlp < full.k_mlp for w in model.config.layers)


@pytest.mark.parametrize(
    "opts",
    [
        dict(rate=0.3, max_layer_sparsity=0.5, attn_ratio=0.5, bi_samples=2),
        dict(rate=0.25, allocation="sensitivity", max_layer_sparsity=0.6, bi_samples=2, probe_tokens=48),
    ],
    ids=["global", "sensitivity"],
)
def test_compress_plan_gives_the_widths_of_the_compression_and_changes_nothing(tiny_hf_dir, tmp_path, opts):
    """`plan_only`: the allocation alone. The model keeps every weight, and the plan's widths, sparsities and
    rates are those the compression with the same options and calibration then gives; a sensitivity plan's
    JSON is a table --sensitivity-from takes."""
    calib = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(3))
    model = modegpt_rt.load(tiny_hf_dir, backend="torch")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = compress(model, calib, CompressOptions(**opts), progress=False, plan_only=True)
    assert plan["plan"] is True and model.config.is_dense
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    report = compress(model, calib, CompressOptions(**opts), progress=False)
    assert [asdict(w) for w in model.config.layers] == plan["widths"]
    for key in ("attn_sparsity", "mlp_sparsity", "achieved_rate", "removed_model_params", "params_compressed"):
        assert plan[key] == report[key], key
    assert plan["sensitivity"] == report["sensitivity"] and plan["eps"] == report["eps"]
    if opts.get("allocation") == "sensitivity":
        (tmp_path / "plan.json").write_text(json.dumps(plan))
        again = modegpt_rt.load(tiny_hf_dir, backend="torch")
        reused = CompressOptions(**opts, sensitivity_from=str(tmp_path / "plan.json"))
        assert compress(again, calib, reused, progress=False, plan_only=True)["widths"] == plan["widths"]


def test_compress_cli_plan_prints_the_widths_and_writes_no_checkpoint(tiny_hf_dir, tmp_path, capsys):
    from modegpt_rt import cli

    common = ["compress", "--model", str(tiny_hf_dir), "--rate", "0.3", "--calib", "generated", "--samples", "4"]
    common += ["--seqlen", "32", "--bi-samples", "2", "--quiet"]
    assert cli.main(common + ["--plan", "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert "plan only: nothing compressed, no checkpoint written" in out and plan["plan"] is True
    assert f"removed {plan['achieved_rate']:.2%} of block projection parameters" in out
    for i, w in enumerate(plan["widths"]):
        assert re.search(rf"^\s+{i}\s+{w['k_mlp']}\s+{w['d_qk']}\s+{w['d_v']}\s", out, re.M), i
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]
    # the same command compressing: the plan's widths, and --json keeps the report
    assert cli.main(common + ["--out", str(tmp_path / "c"), "--json", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    written = json.loads((tmp_path / "c" / "config.json").read_text())
    assert (
        written["compression"] == report
        and [{k: layer[k] for k in ("k_mlp", "d_qk", "d_v")} for layer in written["layers"]] == plan["widths"]
    )
    capsys.readouterr()
    for argv, fragment in [
        (common + ["--plan", "--out", str(tmp_path / "x")], "--plan writes no checkpoint"),
        (common, "--out is required"),
        (common + ["--out", str(tmp_path / "x"), "--json", str(tmp_path / "x" / "config.json")], "inside --out"),
        (common + ["--out", str(tmp_path / "x"), "--json", str(tmp_path / "x")], "inside --out"),
    ]:
        assert cli.main(argv) == 2, argv
        assert fragment in capsys.readouterr().err, argv
    assert not (tmp_path / "x").exists()


def test_sensitivity_allocation_end_to_end(tiny_hf_dir, tmp_path, monkeypatch):
    """--allocation sensitivity: every module's trial costs are KL divergences (≥ 0 up to float32 noise,
    > 0 at the highest level), the plan is the cost allocation of those costs, the compressed model
    meets the rate, and a saved checkpoint's table gives the same plan again without measuring."""
    from modegpt_rt.compressor import compress as compress_mod
    from modegpt_rt.compressor.algorithms import allocate_by_cost, refine_costs
    from modegpt_rt.compressor.compress import SENSITIVITY_LEVELS, trial_layer

    model = modegpt_rt.load(tiny_hf_dir, backend="torch")
    calib = torch.randint(0, 97, (4, 24))
    opts = CompressOptions(rate=0.3, allocation="sensitivity", max_layer_sparsity=0.6, bi_samples=2, probe_tokens=48)
    report = compress(model, calib, opts, progress=False)
    sens = report["sensitivity"]
    L = len(model.layers)
    costs = torch.tensor(sens["attn_kl"] + sens["mlp_kl"])
    assert costs.shape == (2 * L, len(SENSITIVITY_LEVELS)) and torch.isfinite(costs).all()
    assert torch.all(costs > -1e-6) and torch.all(costs[:, -1] > 1e-7)
    assert sens["probe_tokens"] == 48 and sens["module_cap"] == 0.6
    cfg = model.config.dense()
    mlp_p = 3 * cfg.hidden_size * cfg.intermediate_size
    params = [cfg.layer_params(0) - mlp_p] * L + [mlp_p] * L
    phi = allocate_by_cost(*refine_costs(SENSITIVITY_LEVELS, costs), params, 0.3, 0.6)
    plan = report["attn_sparsity"] + report["mlp_sparsity"]
    assert plan == pytest.approx(phi.tolist())
    assert report["achieved_rate"] == pytest.approx(0.3, abs=0.03)
    # reuse: the checkpoint's table, no measurement
    path = save_checkpoint(model, tmp_path / "s")
    monkeypatch.setattr(compress_mod, "measure_sensitivity", lambda *a, **k: pytest.fail("measured again"))
    again = modegpt_rt.load(tiny_hf_dir, backend="torch")
    rep2 = compress(again, calib, CompressOptions(**{**opts.__dict__, "sensitivity_from": str(path)}), progress=False)
    assert rep2["attn_sparsity"] + rep2["mlp_sparsity"] == pytest.approx(plan)
    dense = modegpt_rt.load(tiny_hf_dir, backend="torch")
    (tmp_path / "bad.json").write_text('{"sensitivity": {"levels": [0.2], "attn_kl": [[1]], "mlp_kl": [[1]]}}')
    with pytest.raises(ValueError, match="layers"):
        compress(dense, calib, CompressOptions(**{**opts.__dict__, "sensitivity_from": str(tmp_path / "bad.json")}))
    for levels, kl in (([0.0, 0.4], [1, 2]), ([0.4, 0.2], [1, 2]), ([0.2, 0.4], [1, float("nan")])):
        table = {"levels": levels, "attn_kl": [kl] * L, "mlp_kl": [kl] * L}
        (tmp_path / "bad.json").write_text(json.dumps({"sensitivity": table}))
        with pytest.raises(ValueError, match="levels must increase|non-finite"):
            compress(dense, calib, CompressOptions(**{**opts.__dict__, "sensitivity_from": str(tmp_path / "bad.json")}))
    with pytest.raises(ValueError, match="no sensitivity table"):
        compress(dense, calib, CompressOptions(**{**opts.__dict__, "sensitivity_from": tiny_hf_dir}))
    with pytest.raises(ValueError, match="needs --allocation sensitivity"):
        compress(dense, calib, CompressOptions(rate=0.3, sensitivity_from=str(path)))
    # a trial compresses only its module, at the asked width
    t = trial_layer(dense.layers[0], dense.config, "mlp", 0.5, None, torch.eye(cfg.intermediate_size).double(), opts)
    assert t.k_mlp == round(0.5 * cfg.intermediate_size) and (t.d_qk, t.d_v) == (cfg.head_dim, cfg.head_dim)
    assert torch.equal(t.wqkv, dense.layers[0].wqkv) and dense.layers[0].k_mlp == cfg.intermediate_size
    with pytest.raises(ValueError, match="sensitivity"):
        compress(dense, calib, CompressOptions(rate=0.3, allocation="sensitivity", attn_ratio=0.5), progress=False)


@pytest.mark.parametrize("refit", ["mlp", "all"])
def test_refit_rate_zero_keeps_dense(tiny_hf_dir, refit):
    """At rate 0 the least-squares refit targets are the dense outputs themselves: weights come back unchanged."""
    model = modegpt_rt.load(tiny_hf_dir, backend="torch")
    ids = torch.randint(0, 97, (2, 30))
    before = model(ids).logits
    compress(model, torch.randint(0, 97, (2, 8)), CompressOptions(rate=0.0, refit=refit), progress=False)
    assert (model(ids).logits - before).abs().max() < 1e-5  # nothing compressed, nothing refit (2 × 8 tokens would
    # not determine the weights: a refit from them moved the logits by 0.3)


def test_compress_bfloat16_products_keep_statistics_in_float32(tiny_hf_dir, monkeypatch):
    """--compute-dtype bfloat16: the passes' products run in bfloat16 (the model differs from the float32
    run's, and is as close to dense), the statistics do not (a product under autocast is the float32 one,
    bit for bit) except Nyström's channel statistics where they are not the refit's Gram, the report says
    which dtype ran, and auto follows the CPU's bfloat16 support."""
    from modegpt_rt.compressor import compress as comp

    x = torch.randn(64, 40)
    ref = comp._Stats(40)
    ref.add(x)
    cross = comp._Cross(40, 40)
    cross.add(x, x)
    with comp._products_in(torch.bfloat16, "cpu"):
        st = comp._Stats(40)
        st.add(x)
        cr = comp._Cross(40, 40)
        cr.add(x, x)
    assert torch.equal(st.C, ref.C) and torch.equal(cr.C, cross.C)
    exact = x.double().T @ x.double()
    assert torch.allclose(st.C, exact, rtol=1e-5, atol=1e-5)
    half = comp._Stats(40, product_dtype=torch.bfloat16)  # Nyström's statistics in bfloat16 passes
    half.add(x)
    assert not torch.equal(half.C, ref.C) and torch.allclose(half.C, exact, rtol=0, atol=0.02 * exact.abs().max())
    ids = torch.randint(0, 97, (2, 24))
    calib = torch.randint(0, 97, (8, 32))
    dense = modegpt_rt.load(tiny_hf_dir, backend="torch")(ids).logits
    made = []  # (width, product dtype) of every statistic gathered

    class Spy(comp._Stats):
        def __init__(self, dim, blocks=4, product_dtype=torch.float32, device="cpu"):
            super().__init__(dim, blocks, product_dtype, device)
            made.append((dim, product_dtype))

    monkeypatch.setattr(comp, "_Stats", Spy)
    for refit_samples in (0, 4):  # refit on every window (Nyström's statistics double as the Gram) or on 4
        err = {}
        for dtype in ("float32", "bfloat16"):
            made.clear()
            model = modegpt_rt.load(tiny_hf_dir, backend="torch")
            inter = model.config.intermediate_size
            opts = dict(rate=0.3, allocation="uniform", bi_samples=4, refit_samples=refit_samples)
            report = compress(model, calib, CompressOptions(**opts, compute_dtype=dtype), progress=False)
            assert report["compute_dtype"] == dtype
            assert all(t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point())
            err[dtype] = (model(ids).logits - dense).pow(2).mean().sqrt().item()
            # only Nyström's channel statistics may be bfloat16 products, and only when they are not the Gram
            half = dtype == "bfloat16" and refit_samples == 4
            assert {d for w, d in made if w == inter} == {torch.bfloat16 if half else torch.float32}, made
            assert {d for w, d in made if w != inter} == {torch.float32}, made
        # a different model (the products were bfloat16), as close to dense as the float32 one
        assert err["bfloat16"] != err["float32"] and err["bfloat16"] < 1.2 * err["float32"], (refit_samples, err)
    monkeypatch.setattr("modegpt_rt.kernels.cpu_has_native_bfloat16", lambda: False)
    assert comp.compute_dtype(CompressOptions(rate=0.3, compute_dtype="auto"), "cpu") == torch.float32
    monkeypatch.setattr("modegpt_rt.kernels.cpu_has_native_bfloat16", lambda: True)
    assert comp.compute_dtype(CompressOptions(rate=0.3, compute_dtype="auto"), "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="compute dtype"):
        CompressOptions(rate=0.3, compute_dtype="float16").validate()


def _mlp_input_and_kept_activations(m, calib):
    """One-layer model: the residual after the (compressed) attention, and the kept MLP channels' activations."""
    from modegpt_rt.model import rms_norm

    layer = m.layers[0]
    emb = torch.nn.functional.embedding(calib, m.embed)
    mid = emb + m.attention_block(layer, emb)
    gu = torch.nn.functional.linear(rms_norm(mid, layer.mlp_norm, m.config.rms_norm_eps), layer.w_gate_up)
    return mid, (torch.nn.functional.silu(gu[..., : layer.k_mlp]) * gu[..., layer.k_mlp :]).reshape(-1, layer.k_mlp)


def test_refit_lowers_calibration_error_to_dense_stream(tmp_path):
    """The refit down projection is the least-squares fit to the dense model's residual stream: on the
    calibration tokens of a one-layer model it lands closer to the dense output than Nyström's local fit
    (same kept channels, same compressed attention), and it equals the brute-force least-squares solution."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(3)
    LlamaForCausalLM(tiny_hf_config(num_hidden_layers=1)).save_pretrained(tmp_path, safe_serialization=True)
    calib = torch.randint(0, 97, (6, 32))
    target = modegpt_rt.load(tmp_path, backend="torch").hidden_states(calib).double()
    errs, models = {}, {}
    for refit in ("none", "mlp"):
        m = modegpt_rt.load(tmp_path, backend="torch")
        compress(m, calib, CompressOptions(rate=0.4, allocation="uniform", refit=refit), progress=False)
        errs[refit] = (m.hidden_states(calib).double() - target).pow(2).sum().item()
        models[refit] = m
    assert errs["mlp"] < 0.9 * errs["none"], errs
    # brute force: activations of the kept channels on the compressed attention's output
    m = models["mlp"]
    layer = m.layers[0]
    mid, act = _mlp_input_and_kept_activations(m, calib)
    W = torch.linalg.lstsq(act.double(), (target - mid.double()).reshape(act.shape[0], -1)).solution
    assert torch.allclose(layer.w_down.double().T, W, atol=1e-3 * W.abs().max().item())
    # refit on the first 2 windows only: the least-squares solution over those tokens
    m = modegpt_rt.load(tmp_path, backend="torch")
    opts = CompressOptions(rate=0.4, allocation="uniform", refit="mlp", refit_samples=2, micro_batch=4)
    compress(m, calib, opts, progress=False)
    n = 2 * calib.shape[1]
    W2 = torch.linalg.lstsq(act[:n].double(), (target - mid.double())[:2].reshape(n, -1)).solution
    assert torch.allclose(m.layers[0].w_down.double().T, W2, atol=1e-3 * W2.abs().max().item())
    assert not torch.allclose(W2, W, atol=1e-2 * W.abs().max().item())


def test_refit_prior_pulls_toward_local_solution(tmp_path):
    """--refit-prior μ: the down projection solves (AᵀA + μ·s·I) W = AᵀY + μ·s·W_local (s = mean diag AᵀA), so it
    lies between the plain refit and the paper's local Nyström fit, and a huge μ gives the local fit back."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(5)
    LlamaForCausalLM(tiny_hf_config(num_hidden_layers=1)).save_pretrained(tmp_path, safe_serialization=True)
    calib = torch.randint(0, 97, (6, 32))
    target = modegpt_rt.load(tmp_path, backend="torch").hidden_states(calib).double()
    models, errs = {}, {}
    for name, refit, mu in (("none", "none", 0.0), ("plain", "mlp", 0.0), ("prior", "mlp", 0.5), ("huge", "mlp", 1e9)):
        m = modegpt_rt.load(tmp_path, backend="torch")
        compress(m, calib, CompressOptions(rate=0.4, allocation="uniform", refit=refit, refit_prior=mu), progress=False)
        models[name] = m
        errs[name] = (m.hidden_states(calib).double() - target).pow(2).sum().item()
    assert errs["plain"] < errs["prior"] < errs["none"], errs
    local = models["none"].layers[0].w_down.double().T
    assert torch.allclose(models["huge"].layers[0].w_down.double().T, local, atol=1e-6 * local.abs().max().item())
    layer = models["prior"].layers[0]
    mid, act = _mlp_input_and_kept_activations(models["prior"], calib)
    act = act.double()
    G = act.T @ act
    s = G.diagonal().mean()
    rhs = act.T @ (target - mid.double()).reshape(act.shape[0], -1) + 0.5 * s * local
    W = torch.linalg.solve(G + (0.5 + 1e-6) * s * torch.eye(G.shape[0], dtype=G.dtype), rhs)
    assert torch.allclose(layer.w_down.double().T, W, atol=1e-3 * W.abs().max().item())


def _compressed_ckpt(tiny_hf_dir, tmp_path):
    model = modegpt_rt.load(tiny_hf_dir, backend="torch")
    compress(model, torch.randint(0, 97, (4, 16)), CompressOptions(rate=0.3, bi_samples=2), progress=False)
    return save_checkpoint(model, tmp_path / "c")


def test_checkpoint_validation_names_tensor_and_shapes(tiny_hf_dir, tmp_path):
    out = _compressed_ckpt(tiny_hf_dir, tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg["layers"][1]["d_v"] -= 1
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model.layers.1.self_attn.v_proj.weight has shape"):
        read_checkpoint(out)
    from safetensors.torch import load_file

    from modegpt_rt.checkpoint import validate_tensors

    cfg["layers"][1]["d_v"] += 1
    config = modegpt_rt.config.ModelConfig.from_dict(cfg)
    tensors = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    for dtype, msg in [(torch.float8_e4m3fn, "must be float32, float16"), (torch.int32, "must be float32, float16")]:
        with pytest.raises(CheckpointError, match=f"{name} {msg}"):
            validate_tensors({**tensors, name: tensors[name].to(dtype)}, config, "x")
    bad = tensors[name].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=f"{name} contains NaN"):
        validate_tensors({**tensors, name: bad}, config, "x")


def test_truncated_weights_give_clear_error(tiny_hf_dir, tmp_path):
    out = _compressed_ckpt(tiny_hf_dir, tmp_path)
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(out)


def test_bad_config_and_paths(tiny_hf_dir, tmp_path):
    with pytest.raises(FileNotFoundError):
        modegpt_rt.load(tmp_path / "missing")
    (tmp_path / "opt").mkdir()
    (tmp_path / "opt" / "config.json").write_text(json.dumps({"model_type": "opt"}))
    with pytest.raises(ConfigError, match="unsupported architecture"):
        modegpt_rt.load(tmp_path / "opt")
    (tmp_path / "pickled").mkdir()
    cfg = json.loads((tiny_hf_dir / "config.json").read_text())
    (tmp_path / "pickled" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="only safetensors"):
        modegpt_rt.load(tmp_path / "pickled")


def test_malformed_config_and_index_give_clear_errors(tiny_hf_dir, tmp_path):
    model = modegpt_rt.load(tiny_hf_dir, backend="torch")
    good = json.loads((save_checkpoint(model, tmp_path / "c") / "config.json").read_text())

    def edit(**kw):
        d = json.loads(json.dumps(good))
        for k, v in kw.items():
            if k == "layer0":
                d["layers"][0] = v
            elif v is None:
                d.pop(k)
            else:
                d[k] = v
        return d

    cases = [
        (edit(layer0={"k_mlp": 80, "d_qk": 10}), "widths must be"),
        (edit(num_key_value_heads=0), "positive integer"),
        (edit(layer0={"k_mlp": 16.0, "d_qk": 10, "d_v": 10}), "must be integers"),
        (edit(rms_norm_eps=-1), "positive number"),
        (edit(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
        (edit(layers={"a": 1}), "must be a list"),
        ([1, 2], "JSON object"),
        (edit(rope_scaling={"rope_type": "linear", "factor": 0}), "positive finite factor"),
        (edit(rope_scaling={"rope_type": "linear", "factor": float("nan")}), "positive finite factor"),
        (edit(eos_token_id={"a": 1}), "eos_token_id"),
        (edit(eos_token_id=10**9), "eos_token_id"),
        (edit(bos_token_id="x"), "bos_token_id"),
        (edit(compression="x"), "'compression' must be an object"),
        (edit(tie_word_embeddings="false"), "true or false"),
    ]
    for cfg, msg in cases:
        (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ConfigError, match=msg):
            modegpt_rt.load(tmp_path / "c")
    # a dense HF folder: missing or null fields are named, never a TypeError from the arithmetic on them
    hf_good = json.loads((tiny_hf_dir / "config.json").read_text())
    (tmp_path / "hf").mkdir()
    for name in ("model.safetensors", "generation_config.json"):
        if (tiny_hf_dir / name).exists():
            (tmp_path / "hf" / name).write_bytes((tiny_hf_dir / name).read_bytes())
    hf_cases = [
        ({"hidden_size": None, "head_dim": None}, "hidden_size=None"),
        ({"num_attention_heads": 0}, "num_attention_heads=0"),
        ({"rms_norm_eps": None}, "rms_norm_eps=None"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": None}}, "rope_theta=None"),
        ({"rope_parameters": [1]}, "rope_parameters must be an object"),
        ({"tie_word_embeddings": "false"}, "true or false"),
    ]
    for change, msg in hf_cases:
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**hf_good, **change}))
        with pytest.raises(ConfigError, match=msg):
            modegpt_rt.load(tmp_path / "hf")
    # no sliding-window attention here: such a model's context is its window, where full attention is exact
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**hf_good, "model_type": "mistral", "sliding_window": 16}))
    with pytest.warns(UserWarning, match="limited to 16 tokens"):
        windowed = modegpt_rt.load(tmp_path / "hf", tokenizer=False)
    assert windowed.config.max_position_embeddings == 16
    (tmp_path / "c" / "config.json").write_text(json.dumps(good))
    for index in ("{not json", json.dumps({"metadata": {}}), json.dumps({"weight_map": {"x": "../model.safetensors"}})):
        (tmp_path / "c" / "model.safetensors.index.json").write_text(index)
        with pytest.raises(CheckpointError, match="not a valid safetensors index"):
            modegpt_rt.load(tmp_path / "c")


def test_save_is_atomic_and_refuses_existing(tiny_hf_dir, tmp_path, monkeypatch):
    model = modegpt_rt.load(tiny_hf_dir, backend="torch")
    out = save_checkpoint(model, tmp_path / "c")
    with pytest.raises(FileExistsError):
        save_checkpoint(model, out)
    before = (out / "model.safetensors").read_bytes()

    class Boom(Exception):
        pass

    class BadTokenizer:
        def save_pretrained(self, path):
            raise Boom()

    with pytest.raises(Boom):
        save_checkpoint(model, out, tokenizer=BadTokenizer(), overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before  # the old checkpoint is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temp dirs left behind
    import os
    import shutil

    umask = os.umask(0o022)
    try:  # a normal folder's permissions, not mkdtemp's private 0700
        fresh = save_checkpoint(model, tmp_path / "d")
        assert fresh.stat().st_mode & 0o777 == 0o755 and (fresh / "config.json").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)
    shutil.rmtree(fresh)
    _fail_replace_call(monkeypatch, 2)  # the old checkpoint moved aside, then the new one fails to move in
    with pytest.raises(OSError, match="disk gone"):
        save_checkpoint(model, out, overwrite=True)
    monkeypatch.undo()
    assert (out / "model.safetensors").read_bytes() == before  # put back
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def _fail_replace_call(monkeypatch, nth: int):
    """From now on the nth call of os.replace raises OSError("disk gone"); the others rename."""
    import os

    real, calls = os.replace, []

    def replace(a, b):
        calls.append(a)
        if len(calls) == nth:
            raise OSError("disk gone")
        return real(a, b)

    monkeypatch.setattr(os, "replace", replace)


def test_overwrite_keeps_other_files_and_a_killed_save_is_cleared(tiny_hf_dir, tmp_path, monkeypatch):
    """--overwrite replaces a checkpoint's config and weights but keeps what a user put beside them, also when
    the swap fails; what a killed save left (scratch folders, the old checkpoint moved aside) is cleared or
    put back by the next save, while a running save's scratch folder is left alone."""
    import os
    import shutil

    model = modegpt_rt.load(tiny_hf_dir, backend="torch")
    out = save_checkpoint(model, tmp_path / "c", max_shard_bytes=2000)
    (out / "eval.json").write_text("{}")
    (out / "runs").mkdir()
    (out / "runs" / "log.txt").write_text("mine")
    real = os.replace
    _fail_replace_call(monkeypatch, 3)  # eval.json and runs/ move into the new folder, the old one not aside
    with pytest.raises(OSError, match="disk gone"):
        save_checkpoint(model, out, overwrite=True)
    monkeypatch.undo()
    assert (out / "eval.json").exists() and (out / "runs" / "log.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["c"]
    save_checkpoint(model, out, overwrite=True)  # one file now: the old shards go, the user's files stay
    names = {p.name for p in out.iterdir()}
    assert {"eval.json", "runs", "model.safetensors", "config.json"} <= names and not any(out.glob("model-*"))
    assert (out / "runs" / "log.txt").read_text() == "mine"
    assert modegpt_rt.load(out, backend="torch").config == model.config

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)  # a process that has exited
    (tmp_path / f".c.tmp-{dead}-x1").mkdir()
    (tmp_path / f".c.tmp-{dead}-x1" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / f".c.tmp-{os.getpid()}-x2").mkdir()  # a save still running: not ours to clear
    (out / f".c.tmp-{dead}-x3").mkdir()  # save_pretrained's scratch folder sits inside the checkpoint
    save_checkpoint(model, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["c", f".c.tmp-{os.getpid()}-x2"])
    assert not (out / f".c.tmp-{dead}-x3").exists()
    shutil.rmtree(tmp_path / f".c.tmp-{os.getpid()}-x2")
    # killed between moving the old checkpoint aside and moving the new one in: the next save puts it back
    aside = tmp_path / f".c.old-{dead}-x4"
    aside.mkdir()
    real(out, aside / "old")
    with pytest.warns(UserWarning, match="put back the checkpoint"):
        with pytest.raises(FileExistsError):
            save_checkpoint(model, out)  # no --overwrite: the restored checkpoint is refused, not replaced
    assert (out / "runs" / "log.txt").read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["c"]


def test_cli_sigterm_unwinds_like_ctrl_c(monkeypatch, capsys):
    """SIGTERM raises where Ctrl-C would, so `finally` blocks (a save's cleanup) run; exit status 143, and
    the previous handler is back afterwards."""
    import os
    import signal
    import time

    from modegpt_rt import cli

    cleaned = []

    def killed(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the handler's exception ends the sleep
        finally:
            cleaned.append(True)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "cmd_info", killed)
    assert cli.main(["info", "x"]) == 143
    assert cleaned == [True] and "terminated" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before


def test_save_update_keeps_the_folders_other_files(tiny_hf_dir, tmp_path):
    """`update=True` (what the transformers wrapper's save_pretrained uses) replaces config and weights inside
    an existing folder, removes stale shards, and keeps every other file (a tokenizer saved beside it)."""
    from transformers import AutoModelForCausalLM

    model = modegpt_rt.load(tiny_hf_dir, backend="torch")
    out = save_checkpoint(model, tmp_path / "c", max_shard_bytes=2000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    (out / "notes.txt").write_text("mine")
    (out / "model-extra.bin").write_bytes(b"not ours")
    before = {p.name for p in out.iterdir()}
    hf = AutoModelForCausalLM.from_pretrained(out)
    hf.save_pretrained(out)  # into the folder it was read from
    after = {p.name for p in out.iterdir()}
    assert after == (before - set(shards) - {"model.safetensors.index.json"}) | {"model.safetensors"}
    assert (out / "notes.txt").read_text() == "mine" and (out / "model-extra.bin").read_bytes() == b"not ours"
    again = modegpt_rt.load(out, backend="torch")  # the same weights
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(again(ids).logits, model(ids).logits)
    hf.save_pretrained(tmp_path / "new" / "deeper")  # created if missing
    assert (tmp_path / "new" / "deeper" / "config.json").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        save_checkpoint(model, tmp_path / "file", update=True)
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no temp folder left inside


def test_generation_config_eos_ids_stop_generation(tiny_hf_dir, tmp_path):
    """End-of-turn ids named only in generation_config.json stop generation, and survive compression."""
    import shutil

    folder = tmp_path / "chat"
    shutil.copytree(tiny_hf_dir, folder)
    model = modegpt_rt.load(folder, tokenizer=False)
    for prompt in ([5, 6, 7], [8, 9], [10], [11, 12, 13], [14]):  # one whose greedy run starts without EOS (2)
        free = model.generate([prompt], max_new_tokens=12, temperature=0)[0].token_ids
        k = next((i for i in range(1, len(free)) if free[i] not in free[:i] and 2 not in free[: i + 1]), None)
        if k is not None:
            break
    else:
        pytest.fail("no prompt found whose greedy tokens allow the test")
    turn_end = free[k]  # make a later greedy token an end-of-turn token
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, turn_end]}))
    model = modegpt_rt.load(folder, tokenizer=False)
    assert model.config.eos_ids == [2, turn_end]
    res = model.generate([prompt], max_new_tokens=12, temperature=0)[0]
    assert res.finish_reason == "eos" and res.token_ids == free[:k]
    compress(model, torch.randint(0, 97, (2, 16)), CompressOptions(rate=0.2, refit="none"), progress=False)
    save_checkpoint(model, tmp_path / "out")
    assert read_checkpoint(tmp_path / "out")[0].eos_ids == [2, turn_end]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 97]}))
    with pytest.raises(CheckpointError, match="below 97"):
        modegpt_rt.load(folder, tokenizer=False)
    (folder / "generation_config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        modegpt_rt.load(folder, tokenizer=False)


def test_generate_validates_input(tiny_hf_dir):
    model = modegpt_rt.load(tiny_hf_dir, backend="torch")
    for kwargs in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            model.generate([[1, 2, 3]], **{"max_new_tokens": 4, **kwargs})
    with pytest.raises(ValueError, match="empty"):
        model.generate([[]], max_new_tokens=4)
    with pytest.raises(ValueError, match="not valid UTF-8"):  # bytes that are not UTF-8, as argv decodes them
        model.generate(["ab\udcff"], max_new_tokens=4)
    # model(input_ids) checks what it is given as generate does
    for ids, msg in [
        (torch.zeros(1, 0, dtype=torch.long), "empty"),
        (torch.tensor([[5, 97]]), "token id 97 outside"),
        (torch.tensor([[-5, 3]]), "token id -5 outside"),
        (torch.tensor([[1.0, 2.0]]), "integer token ids"),
        ([[1, 2]], "tensor"),
    ]:
        with pytest.raises(ValueError, match=msg):
            model(ids)
    with pytest.raises(ValueError, match="context"):
        model.generate([[1] * 120], max_new_tokens=20)


def test_generate_sampling_is_seeded_and_batched(tiny_hf_dir):
    model = modegpt_rt.load(tiny_hf_dir, backend="torch")
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]
    a = model.generate(prompts, max_new_tokens=6, temperature=0.8, top_k=20, top_p=0.9, seed=3, ignore_eos=True)
    b = model.generate(prompts, max_new_tokens=6, temperature=0.8, top_k=20, top_p=0.9, seed=3, ignore_eos=True)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert all(len(r.token_ids) == 6 and r.finish_reason == "length" for r in a)
    greedy_batch = model.generate(prompts, max_new_tokens=6, temperature=0, ignore_eos=True)
    for p, r in zip(prompts, greedy_batch):
        alone = model.generate([p], max_new_tokens=6, temperature=0, ignore_eos=True)[0]
        assert alone.token_ids == r.token_ids
    stop_at = greedy_batch[0].token_ids[2]
    stopped = model.generate([prompts[0]], max_new_tokens=6, temperature=0, stop=[stop_at], ignore_eos=True)[0]
    assert stopped.finish_reason == "stop" and stop_at not in stopped.token_ids
    # a NumPy integer is a token id like any other; what is neither a string nor a token id is refused
    as_numpy = model.generate([prompts[0]], 6, temperature=0, stop=np.int64(stop_at), ignore_eos=True)[0]
    assert as_numpy.token_ids == stopped.token_ids and as_numpy.finish_reason == "stop"
    for bad in ([1.5], [-3], [True], [torch.tensor(stop_at)]):
        with pytest.raises(ValueError, match="stop must hold strings and non-negative integer token ids"):
            model.generate([prompts[0]], max_new_tokens=6, temperature=0, stop=bad)


def test_generate_per_prompt_limits_and_on_finish(tiny_hf_dir):
    """A list of max_new_tokens gives each prompt its own limit, with the tokens it would get alone; on_finish
    reports each sequence once, the moment it ends, with the result that is returned."""
    model = modegpt_rt.load(tiny_hf_dir, backend="torch")
    prompts, limits = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]], [2, 7, 4]
    seen = []
    res = model.generate(
        prompts, limits, temperature=0, ignore_eos=True, on_finish=lambda i, r: seen.append((i, r, len(seen)))
    )
    for p, m, r in zip(prompts, limits, res):
        alone = model.generate([p], max_new_tokens=m, temperature=0, ignore_eos=True)[0]
        assert r.token_ids == alone.token_ids and len(r.token_ids) == m and r.finish_reason == "length"
    assert [i for i, _, _ in seen] == [0, 2, 1]  # in the order they ended
    assert all(res[i] is r for i, r, _ in seen)
    with pytest.raises(ValueError, match="2 max_new_tokens limits for 3 prompts"):
        model.generate(prompts, [2, 3], temperature=0)
    with pytest.raises(ValueError, match="positive integer"):
        model.generate(prompts, [2, 0, 1], temperature=0)
    # each fits the context of 128 alone, not together: fine when ended rows leave the batch (no CUDA graph),
    # and a clear error for the fixed batch a CUDA graph replays
    apart = [[1] * 120, [1]]
    both = model.generate(apart, [2, 100], temperature=0, ignore_eos=True)
    for p, m, r in zip(apart, [2, 100], both):
        assert r.token_ids == model.generate([p], max_new_tokens=m, temperature=0, ignore_eos=True)[0].token_ids
    with pytest.raises(ValueError, match="separate calls"):
        _generate_static(model, apart, [2, 100], (0, None, None, None), (None, True), None, None, None, False)


def test_generate_steps_only_the_rows_still_running(tiny_hf_dir):
    """Without a CUDA graph a sequence that ended leaves generate's batch: each decode step computes only the
    rows still running (limits 2, 7, 4: three rows, then two, then one), with the tokens of the fixed batch."""
    model = modegpt_rt.load(tiny_hf_dir, backend="torch")
    prompts, limits = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]], [2, 7, 4]
    rows, step = [], model.step
    model.step = lambda ids, cache, lens: rows.append(ids.shape[0]) or step(ids, cache, lens)
    res = model.generate(prompts, limits, temperature=0, ignore_eos=True)
    assert rows == [3] + [3] + [2] * 2 + [1] * 3  # prefill, then decode steps (none after the last token)
    rows.clear()
    fixed = _generate_static(model, prompts, limits, (0, None, None, None), (None, True), None, None, None, False)
    assert rows == [3] * 7 and [r.token_ids for r in fixed] == [r.token_ids for r in res]


def test_model_to_another_dtype_chooses_its_backend_again(tiny_hf_dir):
    """The C++ fast path reads float32 weights: after .to(float64 / bfloat16) the model must not use it
    (it returned NaN tokens, or crashed the process, before). Rope tables stay float32 or more."""
    model = modegpt_rt.load(tiny_hf_dir, backend="auto")
    ids = [[5, 6, 7], [8, 9, 10, 11]]
    ref = model.generate(ids, max_new_tokens=6, temperature=0, ignore_eos=True)
    full = model(torch.tensor([[5, 6, 7, 8]])).logits
    model.to(torch.float64)
    assert model.backend == ("cpu" if modegpt_rt.kernels.cpu_linear.available() else model.backend)
    assert model.cos.dtype == torch.float64 and not model._fused
    again = model.generate(ids, max_new_tokens=6, temperature=0, ignore_eos=True)
    assert [r.token_ids for r in again] == [r.token_ids for r in ref]
    model.to(torch.bfloat16)
    assert model.backend == "torch" and model.cos.dtype == torch.float32
    low = model(torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(low).all() and (low.float() - full).abs().max() < 0.1 * full.abs().max()
    model.generate(ids, max_new_tokens=3, temperature=0, ignore_eos=True)
    model.float()
    assert model._fused == modegpt_rt.kernels.cpu_linear.available()
    assert [r.token_ids for r in model.generate(ids, max_new_tokens=6, temperature=0, ignore_eos=True)][0]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_bf16_weights_compute_the_rounded_float32_model(tiny_hf_dir, backend):
    """`load(weight_dtype=bfloat16)`: matrices stored in bfloat16, norms, activations and cache in float32;
    the outputs are those of the float32 model whose matrices hold the rounded values (forward, prefill,
    decode and greedy tokens), on the C++ path and the torch one."""
    from modegpt_rt.kernels import cpu_linear

    if backend == "cpu" and not cpu_linear.available():
        pytest.skip("C++ extension not built")
    model = modegpt_rt.load(tiny_hf_dir, backend=backend, weight_dtype=torch.bfloat16)
    ref = modegpt_rt.load(tiny_hf_dir, backend=backend)
    full = modegpt_rt.load(tiny_hf_dir, backend=backend)
    round_matrices_to_bf16(ref)
    assert model.dtype == torch.float32 and model.weight_dtype == torch.bfloat16
    assert model.layers[1].wqkv.dtype == torch.bfloat16 and model.lm_head.dtype == torch.bfloat16
    assert model.layers[1].mlp_norm.dtype == torch.float32 and model.new_cache(1, 4).k[0].dtype == torch.float32
    assert model._fused == (backend == "cpu")
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    got, want = model(ids).logits, ref(ids).logits
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5)
    assert (got - full(ids).logits).abs().max() > 1e-4  # the rounding is real: not the float32 model
    caches = [model.new_cache(2, 16), ref.new_cache(2, 16)]
    lens = torch.tensor([5, 3], dtype=torch.int32)
    assert torch.allclose(model.step(ids, caches[0], lens.clone()), ref.step(ids, caches[1], lens.clone()), atol=1e-5)
    for t in range(4):
        step = ids[:, t : t + 1]
        assert torch.allclose(model.step(step, caches[0]), ref.step(step, caches[1]), atol=1e-5)
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    a = model.generate(prompts, max_new_tokens=8, temperature=0, ignore_eos=True)
    b = ref.generate(prompts, max_new_tokens=8, temperature=0, ignore_eos=True)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    model.float()  # one dtype for everything again
    assert model.weight_dtype == torch.float32 and model._fused == (backend == "cpu")


def test_decode_plan_follows_weights_changed_mid_cache(tiny_hf_dir):
    """The C++ plan points into the weights: `.float()` swaps the storage of the same Parameter objects
    (bfloat16 -> float32), which an identity check missed (stale pointers into freed memory); the plan
    must be rebuilt and the steps go on matching the reference."""
    from modegpt_rt.kernels import cpu_linear

    if not cpu_linear.available():
        pytest.skip("C++ extension not built")
    model = modegpt_rt.load(tiny_hf_dir, weight_dtype=torch.bfloat16)
    ref = modegpt_rt.load(tiny_hf_dir)
    round_matrices_to_bf16(ref)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    caches = [model.new_cache(2, 16), ref.new_cache(2, 16)]
    model.step(ids, caches[0]), ref.step(ids, caches[1])
    model.step(ids[:, :1], caches[0]), ref.step(ids[:, :1], caches[1])
    plan = caches[0].plan[1]
    wqkv = model.layers[0].wqkv
    model.float()
    assert model.layers[0].wqkv is wqkv and wqkv.dtype == torch.float32  # same object, new storage
    for t in range(1, 4):
        got, want = model.step(ids[:, t : t + 1], caches[0]), ref.step(ids[:, t : t + 1], caches[1])
        assert torch.allclose(got, want, atol=1e-5)
    assert caches[0].plan[1] is not plan


def test_cache_from_before_align_widths_is_refused(tiny_hf_dir, tmp_path):
    """align_widths() after new_cache(): the C++ step wrote past the narrower cache (NaN, then a crash)."""
    path = _compressed_ckpt(tiny_hf_dir, tmp_path)
    model = modegpt_rt.load(path, tokenizer=False)
    cache = model.new_cache(1, 16)
    model.step(torch.tensor([[5, 6, 7]]), cache)
    assert model.align_widths(mlp=64, pairs=8, v=8)
    for backend in ("cpu", "torch"):
        model.set_backend(backend)
        with pytest.raises(ValueError, match="cache"):
            model.step(torch.tensor([[8]]), cache)
    fresh = model.new_cache(1, 16)
    assert torch.isfinite(model.step(torch.tensor([[5, 6, 7]]), fresh)).all()


def test_bf16_weights_bad_combinations(tiny_hf_dir):
    with pytest.raises(ValueError, match="bfloat16, not torch.float16"):
        modegpt_rt.load(tiny_hf_dir, weight_dtype=torch.float16)
    with pytest.raises(ValueError, match="float32 compute on a CPU"):
        modegpt_rt.load(tiny_hf_dir, dtype=torch.float64, weight_dtype=torch.bfloat16)
    same = modegpt_rt.load(tiny_hf_dir, dtype=torch.bfloat16, weight_dtype=torch.bfloat16)  # nothing to split
    assert same.dtype == same.weight_dtype == torch.bfloat16
    from modegpt_rt.config import from_hf_config
    from modegpt_rt.model import Model

    tied = Model(from_hf_config(tiny_hf_config(tie_word_embeddings=True)))
    tied.store_weights(torch.bfloat16)
    assert tied.lm_head is tied.embed and tied.embed.dtype == torch.bfloat16
    narrow = modegpt_rt.load(tiny_hf_dir, weight_dtype=torch.bfloat16)
    calib = torch.zeros(1, 8, dtype=torch.long)
    from modegpt_rt.compressor.compress import block_influence_scores, measure_sensitivity

    for call in (
        lambda: compress(narrow, calib, CompressOptions(rate=0.2), progress=False),
        lambda: block_influence_scores(narrow, calib, 1),
        lambda: measure_sensitivity(narrow, calib, CompressOptions(rate=0.2), progress=False),
    ):
        with pytest.raises(ValueError, match="float32 model"):
            call()


def test_cli_bf16_weights_flag(tiny_hf_dir, tmp_path, monkeypatch, capsys):
    """`--bf16-weights` reaches the model in the commands that take it (generate, bench, eval ppl)."""
    import json

    from modegpt_rt import cli

    for extra in ([], ["--bf16-weights"]):
        out = tmp_path / f"bench{len(extra)}.json"
        cli.main(
            ["bench", "throughput", str(tiny_hf_dir), "--batch", "1", "--prompt", "4", "--new", "3"]
            + ["--repeats", "1", "--json", str(out)]
            + extra
        )
        res = json.loads(out.read_text())
        assert res["weight_dtype"] == ("bfloat16" if extra else "float32")
        assert res["results"][0]["impl"].endswith("bf16 weights") == bool(extra)

    seen = []

    def fake_load(*args, **kw):
        seen.append((kw.get("weight_dtype"), kw.get("dtype")))
        raise KeyboardInterrupt  # stop right after loading

    monkeypatch.setattr(modegpt_rt, "load", fake_load)
    for argv in (["generate", "x"], ["serve"], ["eval", "ppl"], ["eval", "zeroshot", "--tasks", "piqa"]):
        assert cli.main(argv + ["--bf16-weights"]) == 130  # Ctrl-C: a one-line message, no traceback
    # float32 arithmetic, the point of --bf16-weights: eval zeroshot's --dtype auto resolves to it
    assert seen == [(torch.bfloat16, None), (torch.bfloat16, torch.float32)] + [(torch.bfloat16, torch.float32)] * 2
    for argv in (["serve"], ["eval", "ppl"], ["eval", "zeroshot"]):  # everything bfloat16 is another thing
        assert cli.main(argv + ["--dtype", "bfloat16", "--bf16-weights"]) == 2
        assert "pass one of them" in capsys.readouterr().err
    for argv in (["eval", "ppl"], ["eval", "zeroshot"]):  # evaluation on a device: checked before loading
        assert cli.main(argv + ["--device", "tpu:9"]) == 2
        assert "--device 'tpu:9'" in capsys.readouterr().err
        if not torch.cuda.is_available():
            assert cli.main(argv + ["--device", "cuda"]) == 2
            assert "no CUDA device" in capsys.readouterr().err
    assert len(seen) == 4  # refused before any load


def test_transformers_auto_classes_load_checkpoint(tiny_hf_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = _compressed_ckpt(tiny_hf_dir, tmp_path)
    ours = modegpt_rt.load(out, backend="torch")
    hf = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(3, 97, (2, 10))
    assert torch.allclose(hf(ids).logits, ours(ids).logits, atol=1e-5)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    gen = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert gen.shape == (2, 15)
    own = ours.generate([ids[0].tolist(), ids[1, 4:].tolist()], max_new_tokens=5, temperature=0, ignore_eos=True)
    eos = set(ours.config.eos_ids)
    for i in range(2):
        hf_new = gen[i, 10:].tolist()
        n = next((j for j, t in enumerate(hf_new) if t in eos), 5)
        assert hf_new[:n] == own[i].token_ids[:n]
    auto = AutoModelForCausalLM.from_pretrained(out, device_map="auto")  # one device: the GPU if any
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    hf.save_pretrained(tmp_path / "resaved")  # a modegpt checkpoint again, loadable both ways
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")(ids).logits, hf(ids).logits)


def test_transformers_generate_keeps_the_runtime_cache(tiny_hf_dir, tmp_path, monkeypatch):
    """transformers' generate carries the runtime's KV cache (`state`): after the prompt each step runs one new
    token per sequence, the cache grows when full, and greedy and beam search give the tokens of a run that
    recomputes every sequence (use_cache=False) and of modegpt_rt's own generate."""
    from transformers import AutoModelForCausalLM

    import modegpt_rt.hf_model as hf_model

    if not hf_model._state_is_a_cache():
        pytest.skip("transformers before 5: generate recomputes the sequences (no runtime cache)")
    hf = AutoModelForCausalLM.from_pretrained(_compressed_ckpt(tiny_hf_dir, tmp_path))
    monkeypatch.setattr(hf_model, "CACHE_ROOM", 3)  # 3 free positions at first: the cache must grow
    shapes, step = [], hf.runtime.step

    def spy(ids, cache, lens=None, last_only=True):
        shapes.append((*ids.shape, cache.capacity, last_only))
        return step(ids, cache, lens, last_only)

    hf.runtime.step = spy
    ids = torch.randint(3, 97, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :1] = 0
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
    greedy = hf.generate(**kw, do_sample=False)
    # the prompt (the LM head on its last position only), then one token a step
    assert shapes == [(3, 9, 12, True)] + [(3, 1, c, True) for c in [12] * 3 + [24] * 8]
    shapes.clear()
    assert torch.equal(hf.generate(**kw, do_sample=False, use_cache=False), greedy)
    assert [s[:2] for s in shapes] == [(3, 9 + j) for j in range(12)]  # without the cache: every sequence again
    prompts = [ids[i][mask[i].bool()].tolist() for i in range(3)]
    own = hf.runtime.generate(prompts, max_new_tokens=12, temperature=0, ignore_eos=True)
    assert [r.token_ids for r in own] == greedy[:, 9:].tolist()
    beams = dict(kw, do_sample=False, num_beams=3, num_return_sequences=2)
    assert torch.equal(hf.generate(**beams), hf.generate(**beams, use_cache=False))
    hf.config.use_cache = False  # the model's config turns it off too
    shapes.clear()
    assert torch.equal(hf.generate(**kw, do_sample=False), greedy) and len(shapes) == 12
    out = hf(ids, attention_mask=mask)
    assert out.state is None and out.hidden_states is None and out.attentions is None  # transformers' fields
    right = mask.flip(1)  # right padding: position T-1 is a pad in rows 1 and 2
    for m in (None, mask, right):
        full = hf(ids, attention_mask=m).logits
        for keep in (1, 3):
            assert torch.allclose(hf(ids, attention_mask=m, logits_to_keep=keep).logits, full[:, -keep:], atol=1e-5)


def test_import_registers_the_auto_classes_without_loading_transformers_models():
    """`import modegpt_rt` registers the config and a stand-in model class; transformers' PreTrainedModel (about
    2.4 s to import) is loaded only when the Auto class is used, and the stand-in is then replaced by the real
    class."""
    code = (
        "import sys, modegpt_rt\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "from modegpt_rt.hf import ModegptConfig\n"
        "assert 'transformers.modeling_utils' not in sys.modules, 'PreTrainedModel imported by modegpt_rt'\n"
        "from modegpt_rt.config import MODEL_TYPE\n"
        "assert AutoConfig.for_model(MODEL_TYPE).__class__ is ModegptConfig\n"
        "cls = AutoModelForCausalLM._model_mapping[ModegptConfig]\n"
        "assert cls.__name__ == 'ModegptForCausalLM' and cls.config_class is ModegptConfig\n"
        "assert cls.from_pretrained.__self__.__module__ == 'modegpt_rt.hf_model'\n"
        "assert AutoModelForCausalLM._model_mapping[ModegptConfig].__module__ == 'modegpt_rt.hf_model'\n"
        "from modegpt_rt.hf import ModegptForCausalLM\n"
        "assert issubclass(ModegptForCausalLM, __import__('transformers').PreTrainedModel)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_tensor_prompts_cli_bounds_and_missing_tokenizer(tiny_hf_dir, capsys):
    from modegpt_rt import cli

    model = modegpt_rt.load(tiny_hf_dir, backend="torch", tokenizer=False)
    want = model.generate([[5, 6, 7], [8, 9, 10]], max_new_tokens=3, temperature=0, ignore_eos=True)
    got = model.generate(torch.tensor([[5, 6, 7], [8, 9, 10]]), max_new_tokens=3, temperature=0, ignore_eos=True)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    one = model.generate(torch.tensor([5, 6, 7]), max_new_tokens=3, temperature=0, ignore_eos=True)
    assert one[0].token_ids == want[0].token_ids
    with pytest.raises(ValueError, match="integer token ids"):
        model.generate(torch.rand(1, 3), max_new_tokens=3)
    for argv in (["--threads", "0", "info", "x"], ["eval", "ppl", "--limit", "0"], ["eval", "ppl", "--seqlen", "1"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert "must be at least" in capsys.readouterr().err
    assert cli.main(["eval", "ppl", str(tiny_hf_dir), "--seqlen", "16", "--limit", "1"]) == 2  # no tokenizer files
    assert "needs a tokenizer" in capsys.readouterr().err
    assert cli.main(["generate", str(tiny_hf_dir), "hi"]) == 2  # the command line has no way to pass token ids
    assert "save the source model's tokenizer beside the weights" in capsys.readouterr().err


def test_generate_and_load_refuse_bad_input_clearly(tiny_hf_dir, tmp_path, capsys, monkeypatch):
    """Token ids are checked (type and vocabulary) before they reach the embedding; sampling settings must be
    finite numbers; a tokenizer that is there but broken is reported at load and again by a string prompt;
    the CLI checks its generation settings and the serving device and port before it loads a model."""
    import shutil
    import warnings

    from modegpt_rt import cli

    model = modegpt_rt.load(tiny_hf_dir, backend="torch", tokenizer=False)
    V = model.config.vocab_size
    for prompts, fragment in [
        ([[1, V]], "outside the vocabulary"),
        ([[1, -5]], "outside the vocabulary"),
        ([[1.7, 2.2]], "must be integers"),
        ([[True, 2]], "must be integers"),
        (b"hello", "got bytes"),
        (5, "got int"),
        ({"a": 1}, "got dict"),
        ([None], "prompt 0 must be"),
        ("text", "loaded with tokenizer=False"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            model.generate(prompts, max_new_tokens=2)
    import numpy as np

    assert model.generate([np.array([5, 6]).tolist(), list(np.array([5, 6]))], max_new_tokens=2, temperature=0)
    for kw, fragment in [
        ({"temperature": None}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 0.5, "top_p": float("nan")}, "top_p"),
        ({"top_k": 2.5}, "top_k"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -1}, "seed"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            model.generate([[5, 6]], max_new_tokens=2, **kw)

    broken = tmp_path / "broken"
    shutil.copytree(tiny_hf_dir, broken)
    (broken / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    with pytest.warns(UserWarning, match="no usable tokenizer"):
        m = modegpt_rt.load(broken, backend="torch")
    with pytest.raises(ValueError, match="no usable tokenizer"):
        m.generate("hi", max_new_tokens=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no tokenizer files at all: no warning, the reason comes on use
        assert modegpt_rt.load(tiny_hf_dir, backend="torch").tokenizer is None
    with pytest.raises(modegpt_rt.CheckpointError, match="empty model path"):
        modegpt_rt.load("")

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(modegpt_rt, "load", no_load)
    for argv, fragment in [
        (["generate", "x", "hi", "--temperature", "nan"], "temperature"),
        (["generate", "x", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
        (["generate", "x", "hi", "--top-p", "2"], "top_p"),
        (["generate", "x", ""], "prompt is empty"),
        (["serve", "x", "--port", "99999"], "--port"),
        (["serve", "x", "--device", "nonsense"], "--device"),
    ]:
        assert cli.main(argv) == 2, argv
        assert fragment in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["serve", "x", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_cli_serve_reports_a_taken_port(tiny_hf_dir, capsys):
    import socket

    from modegpt_rt import cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert cli.main(["serve", str(tiny_hf_dir), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_generated_calibration_is_seeded_sampling_from_the_model(tiny_hf_dir):
    from modegpt_rt import data

    model = modegpt_rt.load(tiny_hf_dir, backend="torch", tokenizer=False)
    with torch.no_grad():
        model.lm_head.mul_(30.0)  # a peaked next-token distribution, so sampling from it is recognisable
    a = data.generated_calibration(model, 5, 12, seed=3, batch_size=2, progress=False)
    assert a.shape == (5, 12) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < model.config.vocab_size
    assert torch.equal(a, data.generated_calibration(model, 5, 12, seed=3, batch_size=2, progress=False))
    assert not torch.equal(a, data.generated_calibration(model, 5, 12, seed=4, batch_size=2, progress=False))
    assert model.backend == "torch"  # restored after generating with the C++ decode step

    # each row continues its first token by sampling from the model: the sampled tokens are far
    # likelier under the model than uniformly random ones
    def mean_logp(x):
        return torch.log_softmax(model(x).logits[:, :-1].double(), -1).gather(2, x[:, 1:, None]).mean().item()

    rand = torch.randint(0, model.config.vocab_size, a.shape, generator=torch.Generator().manual_seed(0))
    assert mean_logp(a) > mean_logp(rand) + 1.0
    with pytest.raises(ValueError):
        data.generated_calibration(model, 0, 12)
    with pytest.raises(ValueError):
        data.generated_calibration(model, 2, model.config.max_position_embeddings + 1)


def test_decode_graph_static_step_matches_step(tiny_hf_dir):
    """The CUDA-graph decode step, run eagerly: static input buffer, the fill levels advanced by the step
    itself, warm-up steps undone. Same logits and caches as `Model.step` over ragged prompts, and it
    refuses to run past the cache's capacity."""
    from modegpt_rt.decode_graph import DecodeGraph

    model = modegpt_rt.load(tiny_hf_dir, backend="torch")
    lens = torch.tensor([5, 3], dtype=torch.int32)
    batch = torch.randint(3, 97, (2, 5))
    caches = [model.new_cache(2, 9), model.new_cache(2, 9)]
    first = [model.step(batch, c, lens) for c in caches]
    graph = DecodeGraph(model, caches[1], capture=False, warmup=2)
    assert torch.equal(caches[1].lens, lens + 0) and graph.room == 4
    ones = torch.ones(2, dtype=torch.int32)
    tok = first[0].argmax(-1)
    for _ in range(4):
        ref, got = model.step(tok[:, None], caches[0], ones), graph(tok)
        assert torch.allclose(ref, got, atol=1e-5)
        tok = ref.argmax(-1)
    assert torch.equal(caches[0].lens, caches[1].lens)
    for b, n in enumerate(caches[0].lens.tolist()):
        for i in range(len(model.layers)):
            assert torch.allclose(caches[0].k[i][b, :, :n], caches[1].k[i][b, :, :n], atol=1e-5)
            assert torch.allclose(caches[0].v[i][b, :, :n], caches[1].v[i][b, :, :n], atol=1e-5)
    with pytest.raises(ValueError, match="full"):
        graph(tok)


def test_decode_graph_needs_cuda(tiny_hf_dir):
    from modegpt_rt.decode_graph import DecodeGraph

    model = modegpt_rt.load(tiny_hf_dir, backend="torch")
    with pytest.raises(ValueError, match="CUDA"):
        DecodeGraph(model, model.new_cache(1, 4), capture=True)
    with pytest.raises(ValueError, match="CUDA"):
        model.generate([[5, 6, 7]], max_new_tokens=3, cuda_graph=True)
    out = model.generate([[5, 6, 7]], max_new_tokens=3, temperature=0, ignore_eos=True, cuda_graph=False)
    assert len(out[0].token_ids) == 3


def test_gpu_throughput_script_runs_tiny_on_cpu(tmp_path):
    """The GPU benchmark's own logic (models from the paper's ranks and uniform rates, rows, JSON) on a
    small config on CPU, where no GPU is lent; CUDA graphs are off on CPU whatever --cuda-graph says."""
    from modegpt_rt.bench import gpu_throughput

    out = tmp_path / "gt.json"
    args = ["--tiny", "--batch", "1,2", "--prompt", "6", "--new", "3", "--models", "dense,paper30,20"]
    gpu_throughput.main([*args, "--repeats", "1", "--cuda-graph", "both", "--json", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [(r["label"], r["batch"]) for r in rows] == [(m, b) for b in (1, 2) for m in ("dense", "paper30", "20")]
    assert all(r["tok_s"] > 0 and "graph" not in r["impl"] for r in rows)
    assert rows[1]["params"] < rows[0]["params"] and rows[1]["rate"] == 0.3


def test_compress_speed_script_runs_tiny(tmp_path):
    """The compression-time benchmark (random weights, the first N layers of a shape) on a small config: its
    row names what ran and extrapolates to the whole depth only when it kept fewer layers."""
    from modegpt_rt.bench import compress_speed

    out = tmp_path / "cs.json"
    compress_speed.main(["--shape", "tiny", "--layers", "2", "--samples", "16", "--seqlen", "48", "--json", str(out)])
    doc = json.loads(out.read_text())
    row = doc["results"][0]
    assert doc["kind"] == "compress_speed" and "--layers 2" in doc["command"]
    assert (row["layers"], row["of_layers"], row["device"], row["peak_device_gib"]) == (2, 4, "cpu", None)
    assert row["seconds_per_layer"] >= 0 and abs(row["achieved_rate"] - 0.3) < 0.02
    assert row["extrapolated_full_depth_seconds"] >= row["allocation_seconds"]
    with pytest.raises(SystemExit):
        compress_speed.main(["--shape", "tiny", "--layers", "9", "--json", str(out)])


def test_gpu_throughput_decode_tiles(tmp_path):
    """--decode-tiles: fixed tiles, and the configuration of a sweep JSON with the least total time over the
    shapes where it ran on every one; the context forces them on decode_config and restores it."""
    from modegpt_rt.bench import gpu_throughput
    from modegpt_rt.kernels import triton_attention

    def row(n, w, s, ms=None):
        return {"BLOCK_N": n, "num_warps": w, "num_stages": s, **({"median_ms": ms} if ms else {"error": "x"})}

    sweep = tmp_path / "sweep.json"  # 64:8:2 is fastest on shape a but failed on b; 32:4:2 wins on the sum
    a = [row(64, 8, 2, 0.5), row(32, 4, 2, 1.0), row(16, 4, 1, 0.9)]
    b = [row(64, 8, 2), row(32, 4, 2, 1.0), row(16, 4, 1, 1.2)]
    sweep.write_text(json.dumps({"decode_sweep": {"a": a, "b": b}}))
    got = gpu_throughput.parse_tiles(f"default,16:8:3,sweep:{sweep}")
    fixed, best = {"BLOCK_N": 16, "num_warps": 8, "num_stages": 3}, {"BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    assert got == [None, fixed, best]
    for bad in ("32:4", "fast"):
        with pytest.raises(ValueError, match="--decode-tiles"):
            gpu_throughput.parse_tiles(bad)
    for doc in ({"decode_sweep": {"a": a[:1], "b": b[:1]}}, [1, 2], {}):  # nothing usable: a clear error
        sweep.write_text(json.dumps(doc))
        with pytest.raises(ValueError, match="no configuration ran on every swept shape"):
            gpu_throughput.parse_tiles(f"sweep:{sweep}")
    args = (256, 32, 32, 96, 96, 512, torch.float16, "cpu")
    before = triton_attention.decode_config(*args)
    with gpu_throughput.decode_tiles({"BLOCK_N": 64, "num_warps": 8, "num_stages": 3}):
        forced = triton_attention.decode_config(*args)
    assert forced == {**before, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3} and forced != before
    assert triton_attention.decode_config(*args) == before


def test_align_widths_pads_exactly(tiny_hf_dir, tmp_path):
    """Zero-padding to hardware-friendly widths (what `load` does on a GPU) keeps the model's function:
    full-sequence logits, cached ragged steps and a saved-and-reloaded copy all match float64."""
    small = modegpt_rt.load(tiny_hf_dir, backend="torch")
    compress(small, torch.randint(0, 97, (4, 16)), CompressOptions(rate=0.3, bi_samples=2), progress=False)
    path = save_checkpoint(small, tmp_path / "c")
    ref = modegpt_rt.load(path, backend="torch", dtype=torch.float64)
    ours = modegpt_rt.load(path, backend="torch", dtype=torch.float64)
    before = [(layer.k_mlp, layer.d_qk, layer.d_v) for layer in ours.layers]
    assert ours.align_widths(mlp=16, pairs=2, v=4)
    after = [(layer.k_mlp, layer.d_qk, layer.d_v) for layer in ours.layers]
    assert after != before and all(a >= b for x, y in zip(after, before) for a, b in zip(x, y))
    full_k, full_d = ours.config.intermediate_size, ours.config.head_dim  # caps: widths never grow past these
    aligned = [
        (k % 16 == 0 or k == full_k) and (q % 4 == 0 or q == full_d) and (v % 4 == 0 or v == full_d)
        for k, q, v in after
    ]
    assert all(aligned), (before, after)
    assert [(w.k_mlp, w.d_qk, w.d_v) for w in ours.config.layers] == after
    for layer in ours.layers:  # padded pairs take frequencies their group does not use
        assert all(len(set(row)) == len(row) for row in layer.freq_idx.tolist())
    ids = torch.randint(0, 97, (2, 20))
    torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-10, atol=1e-10)
    lens = torch.tensor([5, 9], dtype=torch.int32)
    caches = [ref.new_cache(2, 16), ours.new_cache(2, 16)]
    assert caches[1].v[0].shape[-1] == ours.layers[0].d_v
    torch.testing.assert_close(ours.step(ids[:, :9], caches[1], lens), ref.step(ids[:, :9], caches[0], lens))
    for t in range(3):
        step = ids[:, 10 + t : 11 + t]
        ones = torch.ones(2, dtype=torch.int32)
        torch.testing.assert_close(ours.step(step, caches[1], ones), ref.step(step, caches[0], ones))
    again = modegpt_rt.load(save_checkpoint(ours, tmp_path / "aligned"), backend="torch", dtype=torch.float64)
    torch.testing.assert_close(again(ids).logits, ref(ids).logits, rtol=1e-10, atol=1e-10)
    assert not again.align_widths(mlp=16, pairs=2, v=4)  # already aligned: nothing to do
    with pytest.raises(ValueError, match="only widens"):
        w = ours.config.layers[0]
        ours.layers[0].pad_widths(ours.config, type(w)(w.k_mlp - 1, w.d_qk, w.d_v))
    # load(align=True) pads with the GPU defaults (8 pairs, 8 value dims: here capped by head_dim 10)
    full = modegpt_rt.load(path, backend="torch", dtype=torch.float64, align=True)
    assert all(layer.d_qk == 10 and layer.d_v in (8, 10) for layer in full.layers)
    torch.testing.assert_close(full(ids).logits, ref(ids).logits, rtol=1e-10, atol=1e-10)
    assert modegpt_rt.load(path, backend="torch").config.layers == small.config.layers  # CPU: off by default


def test_interleaved_bench_runs_both_weight_dtypes(tiny_hf_dir, tmp_path):
    from modegpt_rt.bench import interleaved

    out = tmp_path / "i.json"
    interleaved.main(
        [str(tiny_hf_dir), "--weights", "float32,bfloat16", "--batch", "1,2", "--prompt", "4", "--new", "3"]
        + ["--rounds", "1", "--threads", str(torch.get_num_threads()), "--json", str(out)]
    )
    rows = json.loads(out.read_text())["results"]
    assert [(r["batch"], r["weight_dtype"]) for r in rows] == [(b, w) for b in (1, 2) for w in ("float32", "bfloat16")]
    assert rows[0]["vs_first"] == 1.0 and all(r["tok_s"] > 0 for r in rows)
    interleaved.main(
        [str(tiny_hf_dir), "--huge-pages", "off,on", "--batch", "1", "--prompt", "4", "--new", "3"]
        + ["--rounds", "1", "--threads", str(torch.get_num_threads()), "--json", str(out)]
    )
    rows = json.loads(out.read_text())["results"]
    assert [(r["huge_pages"], r["name"].endswith("[4 KB pages]")) for r in rows] == [(False, True), (True, False)]
    with pytest.raises(SystemExit):
        interleaved.main([str(tiny_hf_dir), "--huge-pages", "yes"])


def test_output_checks_come_before_the_work_and_overwrite_replaces_checkpoints_only(
    tiny_hf_dir, tmp_path, monkeypatch, capsys
):
    """`--overwrite` replaces a modegpt checkpoint or an empty folder, never a file, a folder of other things,
    or the current folder; unwritable places and `--json` folders are refused before a model is loaded."""
    from modegpt_rt import cli
    from modegpt_rt.checkpoint import check_output_folder

    model = modegpt_rt.load(tiny_hf_dir, backend="torch")
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    check_output_folder(ckpt, overwrite=True)  # a checkpoint: fine
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty", overwrite=True)
    check_output_folder(tmp_path / "new" / "deeper")  # created on save
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    (tmp_path / "afile").write_text("keep")
    for target, fragment in [
        (tmp_path / "mine", "no modegpt checkpoint"),
        (tmp_path / "afile", "is a file"),
        (tmp_path / "afile" / "sub", "is a file"),
        (tmp_path / "ckpt", "exists"),  # without overwrite
    ]:
        with pytest.raises(OSError, match=fragment):
            check_output_folder(target, overwrite=target.name != "ckpt")
        with pytest.raises(OSError, match=fragment):
            save_checkpoint(model, target, overwrite=target.name != "ckpt")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and (tmp_path / "afile").read_text() == "keep"
    monkeypatch.chdir(ckpt)
    with pytest.raises(OSError, match="current folder"):
        check_output_folder(".", overwrite=True)

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(modegpt_rt, "load", no_load)
    for argv, fragment in [
        (["compress", "--rate", "0.3", "--out", str(tmp_path / "mine"), "--overwrite"], "no modegpt checkpoint"),
        (["compress", "--rate", "0.95", "--out", str(tmp_path / "x")], "outside [0, 0.95)"),
        (["compress", "--rate", "0.3", "--allocation", "uniform", "--split", "--out", str(tmp_path / "x")], "uniform"),
        (["compress", "--rate", "0.3", "--device", "gpu0", "--out", str(tmp_path / "x")], "--device 'gpu0'"),
        (["compress", "--rate", "0.3", "--offload", "--out", str(tmp_path / "x")], "drop it"),
        (["eval", "ppl", "--json", str(tmp_path / "mine")], "is a folder"),
        (["eval", "ppl", "--json", str(tmp_path / "afile" / "r.json")], "cannot write"),
    ]:
        assert cli.main(argv) == 2, argv
        assert fragment in capsys.readouterr().err, argv
    if not torch.cuda.is_available():
        assert cli.main(["compress", "--rate", "0.3", "--device", "cuda", "--out", str(tmp_path / "x")]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="uniform allocation"):
        CompressOptions(rate=0.3, allocation="uniform", eps=0.5).validate()


def test_compress_out_of_memory_names_what_to_change(tiny_hf_dir, tmp_path, monkeypatch, capsys):
    """Running out of memory mid-compression ends with one line that says what to change, and writes nothing."""
    from modegpt_rt.compressor import compress as compress_mod

    from modegpt_rt import cli

    errors = [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore torch text"),
        RuntimeError("cusolver error: CUSOLVER_STATUS_ALLOC_FAILED, when calling `cusolverDnCreate(handle)`"),
        RuntimeError("some other failure"),
    ]

    def fail(*a, **k):
        raise errors.pop(0)

    monkeypatch.setattr(compress_mod, "compress", fail)
    argv = ["compress", "--model", str(tiny_hf_dir), "--rate", "0.3", "--calib", "generated", "--samples", "2"]
    argv += ["--seqlen", "8", "--quiet", "--out", str(tmp_path / "x")]
    for first_line in ("CUDA out of memory. Tried to allocate 20.00 GiB", "cusolver error: CUSOLVER_STATUS_ALLOC"):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert f"memory ran out during compression ({first_line}" in err
        assert "fewer --samples or --refit-samples" in err and "more torch text" not in err
    assert cli.main(argv) == 2  # any other error is told as it is
    assert capsys.readouterr().err.strip().endswith("error: some other failure")
    assert not (tmp_path / "x").exists()


def test_compress_warns_when_the_calibration_is_too_small(tiny_hf_dir):
    model = modegpt_rt.load(tiny_hf_dir, backend="torch")
    width = model.config.intermediate_size
    with pytest.warns(UserWarning, match=f"only 64 calibration and 64 refit tokens for MLPs {width} wide"):
        compress(model, torch.randint(0, 97, (4, 16)), CompressOptions(rate=0.3, bi_samples=2), progress=False)
    model = modegpt_rt.load(tiny_hf_dir, backend="torch")
    with pytest.raises(ValueError, match="context of 128"):
        compress(model, torch.randint(0, 97, (1, 129)), CompressOptions(rate=0.3, bi_samples=1), progress=False)
    import warnings

    model = modegpt_rt.load(tiny_hf_dir, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compress(model, torch.randint(0, 97, (6, 64)), CompressOptions(rate=0.3, bi_samples=2), progress=False)


def test_bench_throughput_checks_options_first_and_baselines_the_dense_source(tiny_hf_dir, tmp_path, capsys):
    from types import SimpleNamespace

    from modegpt_rt.bench import throughput

    from modegpt_rt import cli

    ckpt = tmp_path / "c"
    assert (
        cli.main(
            ["compress", "--model", str(tiny_hf_dir), "--rate", "0.3", "--calib", "generated"]
            + ["--samples", "4", "--seqlen", "32", "--bi-samples", "2", "--quiet", "--out", str(ckpt)]
        )
        == 0
    )
    from modegpt_rt.compressor.compress import compute_dtype

    ran = json.loads((ckpt / "config.json").read_text())["compression"]["compute_dtype"]  # --compute-dtype auto
    assert ran == str(compute_dtype(CompressOptions(rate=0.3, compute_dtype="auto"), "cpu")).removeprefix("torch.")
    assert f"{ran} passes" in capsys.readouterr().out
    assert throughput._dense_source(str(ckpt)) == str(tiny_hf_dir)  # --hf-baseline times the dense source
    assert throughput._dense_source(str(tiny_hf_dir)) == str(tiny_hf_dir)
    ok = dict(batch="1,8", prompt=4, new=3, repeats=1)
    assert throughput._check_options(SimpleNamespace(**ok), [str(ckpt)]) == [1, 8]
    for bad, fragment in [
        ({"batch": "abc"}, "--batch"),
        ({"batch": "1,-1"}, "--batch"),
        ({"prompt": 0}, "--prompt"),
        ({"new": 1}, "--new"),
        ({"repeats": 0}, "--repeats"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            throughput._check_options(SimpleNamespace(**{**ok, **bad}), [str(ckpt)])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        throughput._check_options(SimpleNamespace(**ok), [str(ckpt), str(tmp_path / "nowhere")])


def test_text_sources_name_the_file_that_is_not_utf8_or_empty(tmp_path):
    from modegpt_rt import data

    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not UTF-8"):
        data.read_text(str(tmp_path / "latin1.txt"))
    with pytest.raises(ValueError, match="calibration text is empty"):
        data.calibration_windows(torch.zeros(0, dtype=torch.long), 1, 8)


def test_cli_info_shows_the_compression_and_join_needs_wikitext(tiny_hf_dir, tmp_path, capsys):
    from modegpt_rt import cli

    out = _compressed_ckpt(tiny_hf_dir, tmp_path)
    assert cli.main(["info", str(out)]) == 0
    assert "compressed: rate 0.3, allocation global" in capsys.readouterr().out
    (tmp_path / "t.txt").write_text("some text")
    assert cli.main(["eval", "ppl", "--data", str(tmp_path / "t.txt"), "--wikitext-join", "rows"]) == 2
    assert "--wikitext-join applies to --data wikitext2 only" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_continuous_batch_sequences_join_and_leave_with_the_tokens_they_get_alone(tiny_hf_dir, tmp_path, backend):
    """Sequences added to a running ContinuousBatch at different steps, more of them than it has rows, with
    their own limits, stop tokens and sampling settings, get the tokens they get from generate alone; rows
    are reused as sequences end, and the cache grows when a longer sequence arrives."""
    from modegpt_rt.generate import ContinuousBatch

    model = modegpt_rt.load(_compressed_ckpt(tiny_hf_dir, tmp_path), backend=backend)  # uneven widths per layer
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], list(range(20, 60)), [30, 31], [40, 41, 42, 43]]
    limits = [9, 4, 12, 70, 3, 5]
    alone = [model.generate([p], max_new_tokens=m, temperature=0, ignore_eos=True)[0] for p, m in zip(prompts, limits)]
    stop_tok = alone[5].token_ids[2]
    alone[5] = model.generate([prompts[5]], max_new_tokens=5, temperature=0, stop=[stop_tok], ignore_eos=True)[0]
    assert alone[5].finish_reason == "stop"

    batch = ContinuousBatch(model, max_batch=3, min_capacity=8)  # 8 positions first, then it must grow
    done, order, nxt = {}, [], 0
    gen = torch.Generator().manual_seed(0)
    batch.add([50, 51], 6, temperature=1.0, top_k=5, generator=gen, ignore_eos=True, index="sampled")
    for _ in range(200):
        if len(batch) < 3 and nxt < len(prompts):  # at most one joins per step
            batch.add(
                prompts[nxt],
                limits[nxt],
                temperature=0,
                stop=[stop_tok] if nxt == 5 else None,
                ignore_eos=True,
                index=nxt,
                on_finish=lambda i, r: (done.__setitem__(i, r), order.append(i)),
            )
            nxt += 1
        for seq in batch.step():
            done.setdefault(seq.index, seq.result)
        if not len(batch) and nxt == len(prompts):
            break
    assert set(done) == set(range(len(prompts))) | {"sampled"}
    for i, want in enumerate(alone):
        assert done[i].token_ids == want.token_ids and done[i].finish_reason == want.finish_reason
    assert len(done["sampled"].token_ids) == 6 and all(0 <= t < 97 for t in done["sampled"].token_ids)
    assert order.index(4) < order.index(3)  # a short sequence that came later left before the long one
    assert batch.cache.capacity >= len(prompts[3]) + limits[3] and batch.allocations >= 2
    with pytest.raises(ValueError, match="context"):
        batch.add([1] * 120, 20, temperature=0)
    for _ in range(3):
        batch.add([1, 2], 50, temperature=0)
    with pytest.raises(RuntimeError, match="full"):
        batch.add([1, 2], 5, temperature=0)


def test_continuous_batch_cancel_keeps_the_others_exact(tiny_hf_dir):
    """Cancelling running sequences (one added but not yet prefilled among them) leaves the others with the
    tokens they get alone; on_finish is not called for the cancelled ones."""
    from modegpt_rt.generate import ContinuousBatch

    model = modegpt_rt.load(tiny_hf_dir, backend="cpu")
    prompts = {"a": [5, 6, 7], "b": [8, 9, 10, 11], "c": [12], "d": [13, 14]}
    alone = {
        k: model.generate([p], max_new_tokens=6, temperature=0, ignore_eos=True)[0].token_ids
        for k, p in prompts.items()
    }
    batch, done = ContinuousBatch(model, max_batch=4), {}
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        batch.add(prompts["a"], [6])  # one sequence, one limit
    finish = done.__setitem__
    for k in "abc":
        batch.add(prompts[k], 6, temperature=0, ignore_eos=True, index=k, on_finish=lambda i, r: finish(i, r))
    batch.step()
    batch.add(prompts["d"], 6, temperature=0, ignore_eos=True, index="d", on_finish=lambda i, r: finish(i, r))
    assert batch.cancel(lambda i: i in ("a", "c")) == 2 and len(batch) == 2  # "d" is not prefilled yet
    while len(batch):
        batch.step()
    assert set(done) == {"b", "d"}
    assert done["b"].token_ids == alone["b"] and done["d"].token_ids == alone["d"]


def test_huge_pages_move_every_matrix_and_change_no_result(tiny_hf_dir, monkeypatch):
    """`Model.use_huge_pages` (what `load` does on a CPU): each layer's matrices land in one arena that starts
    on a 2 MB boundary, each on a 64-byte boundary, with its values, shape, dtype and the embedding tie kept;
    replacing a layer's weights frees its arena (the compressor does so layer by layer). The
    logits and tokens are those of the model on ordinary pages, also for a model whose C++ decode plan was
    built before the move and for bfloat16 weights. Where the system grants no huge pages nothing moves."""
    from modegpt_rt import hugepages

    plain = modegpt_rt.load(tiny_hf_dir, huge_pages=False)
    ids, x = [[5, 6, 7], [8, 9, 10, 11]], torch.tensor([[5, 6, 7, 8]])
    want = [r.token_ids for r in plain.generate(ids, max_new_tokens=8, temperature=0, ignore_eos=True)]
    want_logits = plain(x).logits

    def matrices(m):
        heads = [m.embed] if m.lm_head is m.embed else [m.embed, m.lm_head]
        return [t for layer in m.layers for t in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down)] + heads

    model = modegpt_rt.load(tiny_hf_dir, huge_pages=False)
    assert model.generate(ids, max_new_tokens=8, temperature=0, ignore_eos=True)[0].token_ids == want[0]
    monkeypatch.setattr(hugepages, "supported", lambda: True)  # the layout is checked on any Linux
    moved = model.use_huge_pages()
    mats = matrices(model)
    assert moved >= sum(t.numel() * t.element_size() for t in mats) and moved % 64 == 0
    for layer in model.layers:
        group = (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down)
        ptrs = sorted(t.data_ptr() for t in group)
        assert ptrs[0] % hugepages.HUGE_PAGE == 0 and all(p % 64 == 0 for p in ptrs)
        assert ptrs[-1] - ptrs[0] < sum(t.numel() * t.element_size() + 64 for t in group)  # one arena
    assert model.embed.data_ptr() % hugepages.HUGE_PAGE == 0
    assert model.lm_head is not model.embed and all(t.is_contiguous() for t in mats)  # an untied head moved too
    for a, b in zip(matrices(plain), mats):
        assert torch.equal(a, b) and a.dtype == b.dtype and a.data_ptr() != b.data_ptr()
    got = [r.token_ids for r in model.generate(ids, max_new_tokens=8, temperature=0, ignore_eos=True)]
    assert got == want and torch.equal(model(x).logits, want_logits)

    narrow = modegpt_rt.load(tiny_hf_dir, weight_dtype=torch.bfloat16, huge_pages=False)
    ref = [r.token_ids for r in narrow.generate(ids, max_new_tokens=8, temperature=0, ignore_eos=True)]
    assert narrow.use_huge_pages() > 0 and all(t.dtype == torch.bfloat16 for t in matrices(narrow))
    assert [r.token_ids for r in narrow.generate(ids, max_new_tokens=8, temperature=0, ignore_eos=True)] == ref

    from modegpt_rt.config import from_hf_config
    from modegpt_rt.model import Model

    tied = Model(from_hf_config(tiny_hf_config(tie_word_embeddings=True)))
    torch.nn.init.normal_(tied.embed)
    emb = tied.embed.clone()
    assert tied.use_huge_pages() > 0 and tied.lm_head is tied.embed and torch.equal(tied.embed, emb)

    # replacing all of a layer's weights, as the compressor does, frees that layer's arena (its mapping goes)
    import gc

    def mapped(addr):
        for line in open("/proc/self/maps"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return True
        return False

    layer, addr = model.layers[0], model.layers[0].wqkv.data_ptr()
    new = {n: t.clone() for n, t in layer.split_weights().items()}
    del mats, group, a, b  # this test's own references to the old weights
    layer.load_weights(model.config, model.config.layers[0], new, layer.freq_idx)
    assert [r.token_ids for r in model.generate(ids, max_new_tokens=8, temperature=0, ignore_eos=True)] == want
    gc.collect()
    assert not mapped(addr) and mapped(model.layers[1].wqkv.data_ptr())

    # load's default follows $MODEGPT_RT_HUGE_PAGES
    monkeypatch.setenv("MODEGPT_RT_HUGE_PAGES", "off")
    assert modegpt_rt.load(tiny_hf_dir).embed.data_ptr() % hugepages.HUGE_PAGE != 0  # not moved
    monkeypatch.setenv("MODEGPT_RT_HUGE_PAGES", "1")
    assert modegpt_rt.load(tiny_hf_dir).embed.data_ptr() % hugepages.HUGE_PAGE == 0

    monkeypatch.setattr(hugepages, "supported", lambda: False)
    untouched = modegpt_rt.load(tiny_hf_dir, huge_pages=False)
    before = [t.data_ptr() for t in matrices(untouched)]
    assert untouched.use_huge_pages() == 0 and [t.data_ptr() for t in matrices(untouched)] == before


def test_huge_page_support_reads_the_system_setting(tmp_path, monkeypatch):
    from modegpt_rt import hugepages

    setting = tmp_path / "enabled"
    monkeypatch.setattr(hugepages, "_THP_SETTING", setting)
    cases = {"always [madvise] never": True, "[always] madvise never": True, "always madvise [never]": False}
    for text, ok in cases.items():
        setting.write_text(text + "\n")
        assert hugepages.supported() == (ok and hasattr(__import__("mmap"), "MADV_HUGEPAGE"))
    setting.unlink()
    assert not hugepages.supported()  # no such file: not Linux, or no THP
