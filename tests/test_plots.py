"""The result plots: each JSON kind gives a PNG, quality series are grouped, bad input is refused."""

import json

import pytest

pytest.importorskip("matplotlib")

from modegpt_rt.bench import quality  # noqa: E402
from modegpt_rt.bench.plots import _quality_series, _rate_series, plot_files  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def _zs(avg):
    return {"tasks": {"arc_easy": {"acc": avg, "acc_norm": avg, "n": 5}, "winogrande": {"acc": avg, "n": 5}}}


def test_quality_json_and_plot_with_two_series(tmp_path):
    args = ["--rate", "dense=0", "--rate", "30%=0.3", "--rate", "30% refit=0.3", "--rate", "20% refit=0.2"]
    args += ["--series", "30%=paper", "--series", "30% refit=refit", "--series", "20% refit=refit"]
    for label, ppl, acc in (
        ("dense", 20.0, 0.5),
        ("30%", 50.0, 0.4),
        ("30% refit", 35.0, 0.42),
        ("20% refit", 28.0, 0.45),
    ):
        args += ["--ppl-json", f"{label}={_write(tmp_path / f'p{ppl}.json', {'ppl': ppl, 'windows': 3})}"]
        args += ["--zeroshot-json", f"{label}={_write(tmp_path / f'z{ppl}.json', _zs(acc))}"]
    out = tmp_path / "quality.json"
    quality.main([*args, "--json", str(out)])
    res = json.loads(out.read_text())
    rows = {r["label"]: r for r in res["rows"]}
    assert rows["30% refit"]["series"] == "refit" and "series" not in rows["dense"]
    assert rows["30% refit"]["average"] == pytest.approx(0.42) and rows["30%"]["ppl"] == 50.0
    groups = _quality_series(res["rows"])
    # dense (no series) joins both methods; each series sorted by rate
    assert [r["label"] for r in groups["refit"]] == ["dense", "20% refit", "30% refit"]
    assert [r["label"] for r in groups["paper"]] == ["dense", "30%"]
    (png,) = plot_files([out], tmp_path / "plots")
    assert png.name == "quality.png" and png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000


def test_quality_speed_from_a_named_checkpoint(tmp_path):
    """--speed takes a row's decode speeds from one checkpoint of an interleaved run, not the rate match."""
    tp = _write(
        tmp_path / "tp.json",
        {"results": [{"impl": "modegpt_rt (cpu)", "rate": 0.3, "batch": b, "tok_s": 70.0 + b} for b in (1, 8)]},
    )
    il = _write(
        tmp_path / "il.json",
        {"results": [{"path": p, "rate": 0.3, "batch": 1, "tok_s": t} for p, t in (("out/a", 77.5), ("out/b", 80.25))]},
    )
    out = tmp_path / "q.json"
    quality.main(
        ["--rate", "a=0.3", "--rate", "b=0.3", "--throughput-json", str(tp), "--speed", f"b={il}@out/b"]
        + ["--json", str(out)]
    )
    rows = {r["label"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["a"]["tok_s_b1"] == 71.0 and rows["a"]["tok_s_b8"] == 78.0 and "speed_source" not in rows["a"]
    assert rows["b"]["tok_s_b1"] == 80.25 and "tok_s_b8" not in rows["b"] and rows["b"]["speed_source"] == "il.json"
    for bad in (f"b={il}@out/c", f"c={il}@out/b", f"b={il}"):
        with pytest.raises(SystemExit):
            quality.main(["--rate", "b=0.3", "--speed", bad, "--json", str(out)])


def test_quality_rejects_series_without_rate(tmp_path):
    with pytest.raises(SystemExit):
        quality.main(["--rate", "a=0.1", "--series", "b=x", "--json", str(tmp_path / "q.json")])


def test_throughput_and_widths_plots(tmp_path):
    rows = [
        {"label": lab, "impl": "modegpt_rt (cpu)", "rate": rate, "batch": b, "tok_s": 10.0 * b * (1 + rate)}
        for lab, rate in (("dense", 0.0), ("30%", 0.3))
        for b in (1, 8)
    ] + [{"label": "dense", "impl": "transformers", "rate": 0.0, "batch": 1, "tok_s": 5.0}]
    tp = _write(tmp_path / "tp.json", {"kind": "throughput", "results": rows})
    layers = [{"k_mlp": 100 - 10 * i, "d_qk": 8, "d_v": 6} for i in range(3)]
    cfg_dir = tmp_path / "ck"
    cfg_dir.mkdir()
    _write(cfg_dir / "config.json", {"layers": layers, "intermediate_size": 128, "head_dim": 8})
    outs = plot_files([tp, cfg_dir], tmp_path / "plots")
    assert sorted(p.name for p in outs) == ["ck_widths.png", "tp_vs_batch.png", "tp_vs_rate.png"]
    assert all(p.read_bytes()[:8] == PNG for p in outs)


def test_plot_refuses_unknown_json(tmp_path):
    with pytest.raises(ValueError, match="not a throughput/quality result"):
        plot_files([_write(tmp_path / "x.json", {"hello": 1})], tmp_path)


def test_rate_series_uses_the_dense_row_for_aligned_models():
    # a GPU run pads compressed models (impl "+aligned") but not the dense one, which has nothing to pad:
    # the speed-up is still relative to that dense row; a series with no dense row stays absolute
    rows = [
        {"label": "dense", "impl": "modegpt_rt/triton+graph", "rate": 0.0, "batch": 256, "tok_s": 100.0},
        {"label": "5", "impl": "modegpt_rt/triton+graph+aligned", "rate": 0.05, "batch": 256, "tok_s": 102.0},
        {"label": "5", "impl": "modegpt_rt/triton+graph", "rate": 0.05, "batch": 256, "tok_s": 60.0},
        {"label": "5", "impl": "modegpt_rt/triton+graph+aligned", "rate": 0.05, "batch": 1, "tok_s": 9.0},
    ]
    by_batch, dense = _rate_series(rows)
    assert dense == {(256, "modegpt_rt/triton+graph"): 100.0, (256, "modegpt_rt/triton+graph+aligned"): 100.0}
    assert sorted(by_batch[(256, "modegpt_rt/triton+graph+aligned")]) == [(0.0, 100.0, "dense"), (0.05, 102.0, "5")]
    assert (1, "modegpt_rt/triton+graph+aligned") not in dense
    # at a batch where no compressed model ran unpadded, the dense row makes no line of its own
    rows.append({"label": "dense", "impl": "modegpt_rt/triton+graph", "rate": 0.0, "batch": 16, "tok_s": 50.0})
    rows.append({"label": "5", "impl": "modegpt_rt/triton+graph+aligned", "rate": 0.05, "batch": 16, "tok_s": 51.0})
    by_batch, dense = _rate_series(rows)
    assert (16, "modegpt_rt/triton+graph") not in by_batch and dense[(16, "modegpt_rt/triton+graph+aligned")] == 50.0


def test_plot_refuses_wrong_inputs_before_writing_anything(tmp_path):
    """Files of another kind get one clear error naming the file, and no output folder appears."""
    import json

    import pytest
    from modegpt_rt.bench import plots

    cases = {
        "list.json": "[1, 2]",
        "kind_only.json": json.dumps({"kind": "throughput"}),
        "zeroshot.json": json.dumps({"tasks": {}}),
        "latin1.json": b"\xff\xfe{}",
        "broken.json": json.dumps({"kind": "throughput", "results": [{"batch": 1}]}),
    }
    for name, body in cases.items():
        p = tmp_path / name
        p.write_bytes(body if isinstance(body, bytes) else body.encode())
        with pytest.raises(ValueError, match=name):
            plots.plot_files([p], tmp_path / "out")
        assert name == "broken.json" or not (tmp_path / "out").exists()


def test_interleaved_run_plots_as_throughput(tmp_path):
    """An interleaved run (`bench.interleaved`) plots like a throughput result: one series per weight dtype,
    rows labelled by rate, the speed-up taken against its dense row."""
    from modegpt_rt.bench.plots import interleaved_as_throughput

    rows = [
        {
            "path": f"out/m{rate}",
            "rate": rate,
            "weight_dtype": w,
            "batch": b,
            "tok_s": 10.0 * b * (1 + rate) * (2 if w == "bfloat16" else 1),
        }
        for rate in (0.0, 0.3)
        for w in ("float32", "bfloat16")
        for b in (1, 8)
    ]
    res = {"kind": "interleaved_throughput", "results": rows}
    conv = interleaved_as_throughput(res)["results"]
    assert {(r["label"], r["impl"]) for r in conv} == {
        (lab, impl)
        for lab in ("dense", "30%")
        for impl in ("modegpt_rt/cpu, interleaved", "modegpt_rt/cpu, interleaved, bfloat16 weights")
    }
    by_batch, dense = _rate_series(conv)
    assert dense[(8, "modegpt_rt/cpu, interleaved, bfloat16 weights")] == 160.0
    assert sorted(by_batch[(1, "modegpt_rt/cpu, interleaved")]) == [(0.0, 10.0, "dense"), (0.3, 13.0, "30%")]
    outs = plot_files([_write(tmp_path / "il.json", res)], tmp_path / "plots")
    assert sorted(p.name for p in outs) == ["il_vs_batch.png", "il_vs_rate.png"]
    # a run from before --weights (no weight_dtype: float32) with two models at one rate, told apart by folder
    old = [{"path": p, "rate": r, "batch": 1, "tok_s": t} for p, r, t in (("g.gguf", 0.0, 10), ("out/a", 0.3, 13))]
    old.append({"path": "out/b", "rate": 0.3, "batch": 1, "tok_s": 14})
    conv = interleaved_as_throughput({"results": old})["results"]
    assert [(r["label"], r["impl"]) for r in conv] == [
        ("dense", "modegpt_rt/cpu, interleaved"),
        ("a", "modegpt_rt/cpu, interleaved"),
        ("b", "modegpt_rt/cpu, interleaved"),
    ]
    bad = {"kind": "interleaved_throughput", "results": [{"rate": 0}]}
    with pytest.raises(ValueError, match="malformed"):
        plot_files([_write(tmp_path / "bad.json", bad)], tmp_path)
