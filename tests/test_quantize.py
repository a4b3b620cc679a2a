"""FP8 (build.precision fp8): the astraea::fp8_linear op against nvidia-modelopt's simulated FP8,
the calibration against an independent record of the activations, the FP8 model through the
rewrite, the search and the engines, and the bundled model's FP8 quality against fp32."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml

from astraea import config, loader, plugins, quantize, reference, runtime
from astraea.cli import bench_main, build_main
from astraea.plugins import fp8_linear as f8
from conftest import bench_report, tiny_config, tiny_raw

modelopt = pytest.importorskip("modelopt.torch.quantization.tensor_quant", reason="nvidia-modelopt (the dev extra)")


def _linear(seed: int = 0) -> tuple[torch.nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g) * 0.2)
    return lin, torch.randn(3, 11, 64, generator=g) * 4


def test_fp8_linear_is_modelopts_simulated_fp8():
    """Both schemes equal F.linear over modelopt's own quantize-dequantize (fp8_eager) of the
    input and the weight: per tensor with the given amaxes; per output channel and per row."""
    lin, x = _linear()
    w = lin.weight.detach()
    x_amax, w_amax = x.abs().amax(), w.abs().amax()
    got = f8.Fp8Linear.from_linear(lin, w_amax, x_amax)(x)
    want = torch.nn.functional.linear(modelopt.fp8_eager(x, x_amax), modelopt.fp8_eager(w, w_amax), lin.bias)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    w_rows = w.abs().amax(dim=1, keepdim=True)
    got = f8.Fp8Linear.from_linear(lin, w_rows.flatten(), None)(x)
    want = torch.nn.functional.linear(modelopt.fp8_eager(x, x.abs().amax(dim=-1, keepdim=True)),
                                      modelopt.fp8_eager(w, w_rows), lin.bias)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - lin(x)).abs().max() > 1e-4  # and it is not the float Linear


@pytest.mark.parametrize("channel", [False, True])
def test_fp8_linear_is_row_local_exports_and_decomposes(channel):
    """A row's output is its own (the rewrite's `keep` rule); torch.export keeps one op node,
    and its ATen form (what Inductor and AOTInductor compile) computes the same."""
    lin, x = _linear(1)
    w = lin.weight.detach()
    layer = f8.Fp8Linear.from_linear(lin, w.abs().amax(dim=1) if channel else w.abs().amax(),
                                     None if channel else x.abs().amax())
    full = layer(x)
    torch.testing.assert_close(layer(x[:, 3:7]), full[:, 3:7], atol=0, rtol=0)
    ep = torch.export.export(layer, (x,))
    assert [n.target for n in ep.graph.nodes if n.op == "call_function"] == [torch.ops.astraea.fp8_linear.default]
    plain = plugins.decompose(ep)
    assert not any(n.target is torch.ops.astraea.fp8_linear.default for n in plain.graph.nodes)
    torch.testing.assert_close(plain.module()(x), full, atol=1e-6, rtol=1e-6)


def test_calibration_scales_are_the_largest_inputs_of_the_dense_sampling(tmp_path):
    """`tensor` scheme: modelopt's calibrated input amax of each Linear equals the largest |x|
    seen by a forward hook over the same dense sampling, the weight amax the weight's."""
    cfg = tiny_config("wan", "tiny", sampling={"steps": 3}, build={"precision": "fp8", "fp8_scaling": "tensor"})
    model = loader.load_model(cfg)
    ref = reference.run(cfg, model, tmp_path, progress=False)
    samples = quantize.calibration_samples(model, cfg, ref, tmp_path / "embeddings")
    names = list(quantize.candidates(model.transformer))
    amax = quantize.calibrate(model, cfg, samples, names, progress=False)
    seen: dict[str, float] = {}
    modules = dict(model.transformer.named_modules())
    hooks = [modules[n].register_forward_pre_hook(
        lambda m, a, n=n: seen.__setitem__(n, max(seen.get(n, 0.0), float(a[0].abs().max())))) for n in names]
    from astraea.sampling import denoise

    with torch.no_grad():
        for s in samples:
            denoise(model, cfg.video, cfg.sampling, s.inputs)
    for h in hooks:
        h.remove()
    for n in names:
        assert float(amax[f"{n}.input_amax"]) == pytest.approx(seen[n], rel=1e-6), n
        assert float(amax[f"{n}.weight_amax"]) == pytest.approx(float(modules[n].weight.abs().max()), rel=1e-6), n


def test_the_fp8_model_at_full_budget_is_the_fp8_dense_model(tmp_path):
    """The rewrite treats fp8_linear as the row-local op it is: at budget N every step of the
    token-wise FP8 programs equals the FP8 dense model, which is not the float one."""
    from astraea.sampling import denoise, prompt_inputs
    from astraea.tokenwise import TokenwiseTransformer, build_programs

    cfg = tiny_config("wan", "tiny", sampling={"steps": 3}, build={"precision": "fp8"})
    model = loader.load_model(cfg)
    q = quantize.run(cfg, model, reference.run(cfg, model, tmp_path, progress=False), tmp_path, progress=False)
    assert q.record["quantized"] and q.record["rule"] == "auto" and not q.reused
    n = model.layout(cfg.video).video_tokens
    programs = build_programs(q.model, cfg, [n], progress=False)
    ops = [x.target for x in programs[n].graph.graph.nodes]
    assert torch.ops.astraea.fp8_linear.default in ops
    inputs = prompt_inputs(model, cfg.video, cfg.sampling, cfg.sampling.prompts[0], 0)
    want = denoise(q.model, cfg.video, cfg.sampling, inputs)
    torch.testing.assert_close(denoise(q.model, cfg.video, cfg.sampling, inputs, TokenwiseTransformer(programs, [n] * 3)),
                               want, atol=1e-5, rtol=1e-5)
    assert (want - denoise(model, cfg.video, cfg.sampling, inputs)).abs().max() > 1e-5
    again = quantize.run(cfg, model, reference.run(cfg, model, tmp_path, progress=False), tmp_path, progress=False)
    assert again.reused and again.record == q.record


def test_fp8_keep_names_groups_and_refuses_unknown_ones():
    names = ["condition_embedder", "blocks.0", "blocks.1", "proj_out"]
    assert quantize.resolve_keep(("blocks.-1", "proj_out"), names, ("blocks",)) == {"blocks.1", "proj_out"}
    with pytest.raises(config.ConfigError, match=r"build.fp8_keep\[0\]: 'blocks.7' is not a group"):
        quantize.resolve_keep(("blocks.7",), names, ("blocks",))
    with pytest.raises(config.ConfigError, match="build.fp8_scaling: channel scales .* no TensorRT form"):
        tiny_config("wan", "tiny", build={"precision": "fp8", "backend": "tensorrt"})
    tiny_config("wan", "tiny", build={"precision": "fp8", "backend": "tensorrt", "fp8_scaling": "tensor"})


def test_an_fp8_build_samples_what_its_search_measured(tmp_path, capsys):
    """astraea-build with build.precision fp8 (eager engines): the quantize stage, FP8 engines
    in the manifest, and the runtime's sample at the PSNR the search measured on the FP8 programs."""
    raw = tiny_raw(target={"budget": 0.5}, search={"levels": 3, "population": 4, "children": 2, "generations": 1},
                   bench={"warmup": 0, "repeats": 1}, build={"backend": "eager", "precision": "fp8"})
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    assert build_main([str(path), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "quantize   4 of 4 groups of Linear layers in FP8 e4m3, auto" in err
    manifest = json.loads((out / "engines" / "manifest.json").read_text())
    assert manifest["build"]["precision"] == "fp8" and manifest["model"]["identity"]["precision"] == "fp8"
    (folder,) = (out / "search").iterdir()
    schedule = json.loads((folder / "schedule.json").read_text())
    check = json.loads((out / "engines-check.json").read_text())
    assert check["psnr"] == pytest.approx(schedule["per_sample"]["p0_s0"]["psnr"], abs=1e-3)


def test_fp8_engines_are_refused_on_a_gpu_without_fp8_tensor_cores(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    manifest = dataclasses.make_dataclass("M", [("build", dict)])({"precision": "fp8"})
    with pytest.raises(runtime.EngineError, match=r"FP8 .*compute capability 8.0\) has no FP8 tensor cores"):
        runtime.check_precision(manifest, torch.device("cuda", 0))
    runtime.check_precision(manifest, torch.device("cpu"))  # simulated there: allowed
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    runtime.check_precision(manifest, torch.device("cuda", 0))


def test_the_bundled_models_fp8_is_near_fp32():
    """The stated tolerance on a trained model: every block's Linear layers in FP8 (channel
    scales), the bundled model's dense sample stays within 30 dB PSNR of fp32 (measured: 36.2
    dB at 10 steps on two prompts), and FP8 is not a no-op."""
    cfg = config.bundled_config(["a red circle moving left over a striped background"], steps=6)
    model = loader.load_model(cfg)
    names = {n: m for n, m in quantize.candidates(model.transformer).items() if n.startswith("blocks.")}
    amax = {f"{n}.weight_amax": m.weight.detach().abs().amax(dim=1) for n, m in names.items()}
    fp8 = quantize.convert(model.transformer, amax, set(names))
    from astraea.sampling import denoise, prompt_inputs

    inputs = prompt_inputs(model, cfg.video, cfg.sampling, cfg.sampling.prompts[0], 0)
    with torch.no_grad():
        want = denoise(model, cfg.video, cfg.sampling, inputs)
        got = denoise(model, cfg.video, cfg.sampling, inputs, fp8)
    peak = float(want.max() - want.min())
    from astraea.metrics import psnr

    value = psnr(float(((got - want) ** 2).mean()), peak)
    assert 30 < value < 80, value



def test_a_joint_precision_build_runs_each_step_in_its_searched_precision(tmp_path, capsys):
    """astraea-build with search.precision joint, priced by two reports of a card whose FP8
    calls are 40% cheaper: the FP8 model is calibrated, both program sets rewritten, the
    search puts some steps in FP8, and the engine folder holds engines of both precisions
    (the FP8 ones on their own weights file). The runtime's sample is the search's: its PSNR
    is the one the search measured on the mixed programs, in the build's check and in
    astraea-bench's row of the folder (marked by its FP8 steps, its precision a step recorded)."""
    levels = 3
    raw = tiny_raw(target={"speedup": 2.0}, sampling={"steps": 4}, bench={"warmup": 0, "repeats": 1},
                   search={"levels": levels, "population": 4, "children": 2, "generations": 1, "precision": "joint",
                           "repair_low": 0.5, "cost_from": bench_report(tmp_path / "bf16.json", levels, [1, 600, 1000]),
                           "fp8_cost_from": bench_report(tmp_path / "fp8.json", levels, [1, 360, 600], ", fp8")},
                   build={"backend": "eager", "precision": "fp8", "fp8_keep": ["proj_out"]})
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    assert build_main([str(path), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "and the FP8 model's 2" in err and " in FP8, PSNR" in err
    (folder,) = (out / "search").iterdir()
    schedule = json.loads((folder / "schedule.json").read_text())
    marks = schedule["precision_per_step"]
    assert "fp8" in [p for p, k in zip(marks, schedule["tokens_per_step"]) if k] and marks[0] == "model"
    assert schedule["fp8_level_ms"] == [1, 360, 600]
    manifest = json.loads((out / "engines" / "manifest.json").read_text())
    engines = manifest["engines"]
    assert {e["precision"] for e in engines.values()} == {"model", "fp8"} and manifest["fp8_weights"]["file"] in manifest["files"]
    assert manifest["fp8_weights"]["file"] != manifest["weights"]["file"]
    steps = [engines[s["engine"]]["precision"] if s["engine"] else None for s in manifest["steps"]]
    assert steps == [p if k else None for p, k in zip(marks, schedule["tokens_per_step"])]
    check = json.loads((out / "engines-check.json").read_text())
    assert check["psnr"] == pytest.approx(schedule["per_sample"]["p0_s0"]["psnr"], abs=1e-3)
    assert bench_main([str(out / "engines"), "--methods", "dense", "astraea-compiled", "--quiet"]) == 0
    (row,) = [r for r in json.loads((out / "bench" / "bench.json").read_text())["rows"] if r["method"] == "astraea-compiled"]
    assert row["precision_per_step"] == marks and row["setting"].endswith(f"{sum(p == 'fp8' for p in marks)} FP8 steps")
    assert row["psnr_latent"] == pytest.approx(check["psnr"], abs=1e-3)  # the bench's dense eager sample: the reference's
    assert row["weights_shared"]  # both weight sets are the bench's models' own tensors (counted once)
    have = {(e["tokens"], e["precision"]) for e in engines.values()}
    k, p = next(c for c in [(9, "fp8"), (18, "fp8"), (9, "model")] if c not in have)
    with pytest.raises(runtime.EngineError, match=rf"no engine computes \[\({k}, '{p}'\)\]"):
        runtime.load(out / "engines").use_schedule([18, k, k, k], ["model", p, p, p])
