"""astraea-bench (astraea.bench) and its metrics: SSIM against a direct float64 computation,
the report's rows against the dense model (a full-budget Astraea schedule and a peer that
skips nothing equal dense; a skipping peer does less block work), rows merged across
invocations, and the runtime switching schedules over one engine folder (equal to the
rewritten graphs of that schedule)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import yaml

from astraea import config, metrics
from astraea.cli import bench_main
from conftest import engine_case, tiny_raw


def _ssim_direct(x, y, data_range, size=11, sigma=1.5):
    """SSIM by its definition: every valid window's weighted moments, one window at a time."""
    c = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(c**2) / (2 * sigma**2))
    w = (g[:, None] * g[None, :]) / (g.sum() ** 2)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for a, b in zip(x.reshape(-1, *x.shape[-2:]).double(), y.reshape(-1, *y.shape[-2:]).double()):
        for i in range(a.shape[0] - size + 1):
            for j in range(a.shape[1] - size + 1):
                pa, pb = a[i:i + size, j:j + size], b[i:i + size, j:j + size]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                cov = (w * (pa - ma) * (pb - mb)).sum()
                vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(torch.stack(vals).mean())


def test_ssim_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 14, 16, generator=g)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert metrics.ssim(x, y, 1.0) == pytest.approx(_ssim_direct(x, y, 1.0), abs=1e-9)
    assert metrics.ssim(x, x, 1.0) == pytest.approx(1.0)
    assert metrics.ssim(x, y, 1.0) < 0.99
    assert metrics.psnr(0.01, 1.0) == pytest.approx(20.0) and math.isinf(metrics.psnr(0.0, 1.0))
    with pytest.raises(ValueError, match="at least"):
        metrics.ssim(x[..., :8, :8], y[..., :8, :8], 1.0)


@pytest.mark.parametrize("need", [1, 2, 3])
@pytest.mark.parametrize("labels", [["100%"] + ["40%"] * 9, ["100%", "skip", "40%", "50%", "40%", "skip"],
                                    ["call"] * 4, ["50%"] * 3 + ["100%"]])
def test_warm_up_calls_every_label_before_the_timed_runs(labels, need):
    """Every label (an engine: CUDA graphs are captured at its second call) is called `need`
    times in the warm-up, with more generations where one has too few such calls, and no
    step more than that takes."""
    from types import SimpleNamespace

    from astraea.bench import Bench

    fake = SimpleNamespace(cfg=SimpleNamespace(bench=SimpleNamespace(warmup=need)))
    runs = Bench._warm_runs(fake, labels)
    called = [label for steps in runs for label in labels[:steps]]
    assert all(called.count(x) >= need for x in set(labels))
    assert all(steps == len(labels) for steps in runs[:-1]) and 1 <= runs[-1] <= len(labels)
    short = called[:-1]  # one step less is not enough
    assert any(short.count(x) < need for x in set(labels))


def test_bench_rows_against_dense_and_merged_across_invocations(tmp_path, capsys):
    raw = tiny_raw(sampling={"steps": 4},
                   bench={"warmup": 1, "repeats": 2, "methods": ["dense", "astraea", "peers"], "budgets": [0.5, 1.0],
                          "peers": ["first_block_cache threshold=0", "taylorseer interval=2 warmup=1"]})
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    assert bench_main([str(path), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "bench" / "bench.json").read_text())
    rows = {(r["method"], r["setting"]): r for r in report["rows"]}
    dense = rows[("dense", "diffusers, eager")]
    assert math.isinf(dense["psnr_latent"]) and dense["speedup"] == 1.0 and dense["work_fraction"] == 1.0
    assert len(dense["sample_ms_all"]) == 2 and dense["step_calls"] == {"dense": 8}
    full = rows[("astraea", "uniform 100%")]  # every row recomputed: the oracle says dense
    assert full["psnr_latent"] > 80 and full["mean_budget"] == 1.0
    half = rows[("astraea", "uniform 50%")]
    assert 0 < half["psnr_latent"] < full["psnr_latent"] and half["mean_budget"] < 1
    assert set(half["step_ms"]) == {"100%", "50%"} and half["step_calls"] == {"100%": 2, "50%": 6}
    assert math.isinf(rows[("first_block_cache", "threshold=0")]["psnr_latent"])
    assert rows[("first_block_cache", "threshold=0")]["work_fraction"] == 1.0
    taylor = rows[("taylorseer", "interval=2 warmup=1")]
    assert taylor["work_fraction"] < 1 and math.isfinite(taylor["psnr_latent"])
    for f in ("bench.md", "latency-vs-budget.png", "quality-vs-speedup.png", "step-latency.png"):
        assert (out / "bench" / f).stat().st_size > 0
    assert "| astraea | uniform 50% |" in capsys.readouterr().out
    # a second invocation measures one peer again and keeps the other rows; dense is reused
    assert bench_main([str(path), "--out", str(out), "--quiet", "--methods", "peers",
                       "--peers", "taylorseer interval=3 warmup=1"]) == 0
    again = json.loads((out / "bench" / "bench.json").read_text())
    keys = [(r["method"], r["setting"]) for r in again["rows"]]
    assert keys[0] == ("dense", "diffusers, eager") and again["rows"][0]["sample_ms"] == dense["sample_ms"]
    assert set(rows) | {("taylorseer", "interval=3 warmup=1")} == set(keys) and len(keys) == len(set(keys))


@pytest.mark.parametrize("bad,error", [
    (["--steps", "0"], "sampling.steps"),
    (["--peers", "pab skip=two"], "bench.peers[0]"),
    (["--methods", "dense", "--schedules", "missing.json"], "--schedules"),
])
def test_bench_bad_input_is_one_line(tmp_path, capsys, bad, error):
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(tiny_raw()))
    assert bench_main([str(path), "--out", str(tmp_path / "run"), "--quiet", *bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("astraea-bench: error: ") and error in err and "\n" not in err  # before any other stage


def test_given_schedules_keep_their_own_budgets(tmp_path):
    """A schedule searched at 5 levels (0.25 steps) keeps its budgets under a config of 11
    levels (snapping 0.25 to that grid gave 0.2 once), with the search's own rows per level;
    a schedule that does not start dense is refused in one line."""
    from astraea.errors import AstraeaError
    from astraea.schedule import level_tokens, read_schedules

    n = 26520
    budgets = [1.0, 0.25, 0.0, 0.75, 0.5, 0.25]
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"quarters": budgets}))
    five = level_tokens(5, n)
    got = read_schedules(path, 6, n)
    assert list(got) == ["quarters"] and list(got["quarters"].tokens) == [five[round(b * 4)] for b in budgets]
    assert got["quarters"].tokens[1] == 6630  # not the 11-level grid's 0.2 (5304)
    assert list(got["quarters"].budgets) == budgets
    path.write_text(json.dumps({"budget_per_step": [0.5] + budgets[1:], "mean_budget": 0.4}))  # a schedule.json
    with pytest.raises(AstraeaError, match="first step must be dense"):
        read_schedules(path, 6, n)


def test_build_only_builds_once_and_keeps_what_is_there(tmp_path, capsys):
    """astraea-bench --build-only writes the engine of every budget level the rows use and
    measures nothing; run again (as the timing run builds, through the same function) it
    keeps every file; an engine folder is refused."""
    raw = tiny_raw(sampling={"steps": 4}, build={"backend": "eager"}, bench={"warmup": 0, "repeats": 1})
    path, out = tmp_path / "model.yaml", tmp_path / "run"
    path.write_text(yaml.safe_dump(raw))
    sched = tmp_path / "s.json"
    sched.write_text(json.dumps({"quarters": [1.0, 0.25, 0.0, 0.75]}))
    args = [str(path), "--out", str(out), "--quiet", "--methods", "astraea-compiled", "--budgets", "--schedules", str(sched)]
    assert bench_main([*args, "--build-only"]) == 0
    manifest = json.loads((out / "bench" / "engines" / "manifest.json").read_text())
    from astraea import loader
    from astraea.schedule import budget_rows

    cfg = config.from_dict(raw)
    n = loader.load_model(cfg).layout(cfg.video).video_tokens
    assert sorted(e["tokens"] for e in manifest["engines"].values()) == sorted({n, budget_rows(0.25, n), budget_rows(0.75, n)})
    assert len(manifest["build"]["rebuilt"]) == 3 and not (out / "bench" / "bench.json").exists()
    assert len(re.findall(r"rows, built in \d+ s\n", capsys.readouterr().out)) == 3
    log = (out / "bench" / "bench.log").read_text()  # where a long build's time went (a GPU call's limit)
    assert "programs: capture" in log and len(re.findall(r"rows\): built in [\d.]+ s", log)) == 3
    files = {f.name: f.stat().st_mtime_ns for f in (out / "bench" / "engines").glob("*.pt2")}
    assert bench_main([*args, "--build-only"]) == 0
    assert capsys.readouterr().out.count(", kept") == 3
    assert {f.name: f.stat().st_mtime_ns for f in (out / "bench" / "engines").glob("*.pt2")} == files
    # a schedule a run (as a split benchmark times them): one that uses fewer levels builds
    # nothing and leaves the others' engines for the next (they were deleted once, and rebuilt)
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"half dense": [1.0, 1.0, 0.25, 0.25]}))
    assert bench_main([*args[:-1], str(one), "--build-only"]) == 0
    manifest = json.loads((out / "bench" / "engines" / "manifest.json").read_text())
    assert sorted(e["tokens"] for e in manifest["engines"].values()) == sorted({n, budget_rows(0.25, n)})
    assert {f.name: f.stat().st_mtime_ns for f in (out / "bench" / "engines").glob("*.pt2")} == files
    assert bench_main([*args, "--build-only"]) == 0
    assert capsys.readouterr().out.count(", kept") == 3 + 2
    assert bench_main([str(tmp_path / "run" / "bench" / "engines"), "--build-only", "--quiet"]) == 2
    assert "--build-only" in capsys.readouterr().err


def test_runtime_switches_schedules_over_one_engine_folder(tmp_path):
    from astraea import engines, runtime
    from astraea.sampling import denoise, first_step_kwargs
    from astraea.tokenwise import TokenwiseTransformer

    cfg, model, programs, schedule, inputs, want = engine_case("cpu", steps=5)
    engines.build(cfg, model, programs, schedule, tmp_path, backend="eager", progress=False)
    rt = runtime.load(tmp_path / "engines")
    torch.testing.assert_close(denoise(model, cfg.video, cfg.sampling, inputs, rt), want, rtol=1e-5, atol=1e-5)
    n = max(programs)
    other = [n, 0, 3, n, 3]
    buffers = [t.data_ptr() for branch in rt.branches.values() for t in branch["state"]]
    rt.use_schedule(other)
    with pytest.raises(runtime.EngineError, match="before step 0"):  # a new generation starts at step 0
        rt(**first_step_kwargs(model, cfg.video, cfg.sampling) | {"timestep": rt.timesteps[2:3]})
    got = denoise(model, cfg.video, cfg.sampling, inputs, rt)
    # in-place engines keep their state buffers (and, with cuda_graphs, their graphs: tests/test_gpu.py)
    assert [t.data_ptr() for branch in rt.branches.values() for t in branch["state"]] == buffers
    ref = denoise(model, cfg.video, cfg.sampling, inputs, TokenwiseTransformer(programs, other))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert (got - want).abs().max() > 1e-6  # another schedule, another sample
    rt.use_schedule(list(schedule.tokens))  # and back: the kept buffers start from zero again
    torch.testing.assert_close(denoise(model, cfg.video, cfg.sampling, inputs, rt), want, rtol=1e-5, atol=1e-5)
    for bad, error in (([n, 4, 3, 3, 3], "no engine computes"), ([3, 3, 3, 3, 3], "must be dense"),
                       ([n, 3], "5")):
        with pytest.raises(runtime.EngineError, match=error):
            rt.use_schedule(bad)

    # astraea-bench ENGINE_FOLDER: the engines' own schedule, scored against dense as the
    # rewritten graphs' sample scores
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict(cfg)))
    assert bench_main([str(tmp_path / "engines"), "--quiet", "--methods", "dense", "astraea-compiled",
                       "--repeats", "1"]) == 0
    report = json.loads((tmp_path / "bench" / "bench.json").read_text())
    row = next(r for r in report["rows"] if r["method"] == "astraea-compiled")
    dense = denoise(model, cfg.video, cfg.sampling, inputs)
    assert row["setting"] == "engines" and row["tokens_per_step"] == list(schedule.tokens)
    assert row["psnr_latent"] == pytest.approx(metrics.compare(model, want, dense)["psnr_latent"], abs=1e-3)


@pytest.mark.parametrize("family,sampling", [("cogvideox", {}), ("hunyuan_video", {"guidance": 1.0,
                                                                                 "embedded_guidance": 6.0})])
def test_bench_peers_on_every_family(tmp_path, family, sampling):
    """The peers run on each family's blocks, with and without a CFG batch (HunyuanVideo's
    distilled guidance: FasterCache must not split a batch of one; ToCa on joint attention)."""
    raw = tiny_raw(family, sampling={"steps": 4, **sampling},
                   bench={"warmup": 1, "repeats": 1, "methods": ["dense", "peers"],
                          "peers": ["faster_cache skip=2 lo=-1 hi=1000", "pab skip=2 lo=-1 hi=1000", "toca first=1"]})
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert bench_main([str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    rows = json.loads((tmp_path / "run" / "bench" / "bench.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "faster_cache", "pab", "toca"]
    for r in rows[1:]:  # each skipped some work and stayed finite
        assert r["work_fraction"] < 1 and math.isfinite(r["psnr_latent"]), r
