"""`astraea-build` / `astraea-bench`: exit codes, one-line errors, --debug tracebacks, --help."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from astraea.cli import build_main
from conftest import interrupt_search_after, tiny_raw


def _write(tmp_path, raw, name="model.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def test_build_runs_and_reuses(tmp_path, capsys):
    path = _write(tmp_path, tiny_raw())
    out = tmp_path / "run"
    assert build_main([str(path), "--out", str(out), "--quiet"]) == 0
    assert "reference  1 sample(s) x 3 steps written" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["model"]["family"] == "wan"
    assert build_main([str(path), "--out", str(out), "--quiet"]) == 0
    assert "reference  1 sample(s) x 3 steps reused" in capsys.readouterr().err


def test_a_corrupt_stage_output_is_one_line(tmp_path, capsys):
    """A run folder's file damaged between builds (here the dense reference) is named in one
    line with what to do, exit 2; deleting it as told recomputes it."""
    path = _write(tmp_path, tiny_raw())
    out = tmp_path / "run"
    assert build_main([str(path), "--out", str(out), "--quiet"]) == 0
    (latents,) = (out / "reference").glob("*/latents.safetensors")
    latents.write_bytes(latents.read_bytes()[:50])
    assert build_main([str(path), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"astraea-build: error: {latents} cannot be read") and "delete " in err
    shutil.rmtree(latents.parent)
    assert build_main([str(path), "--out", str(out), "--quiet"]) == 0


def test_output_folder_from_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, tiny_raw(build={"output": "elsewhere"}), "mine.yaml")
    assert build_main([str(path), "--quiet"]) == 0
    assert (tmp_path / "elsewhere" / "config.json").is_file()
    path = _write(tmp_path, tiny_raw(), "mine.yaml")
    assert build_main([str(path), "--quiet"]) == 0
    assert (tmp_path / "runs" / "mine" / "config.json").is_file()


@pytest.mark.parametrize(
    "raw,words",
    [
        (tiny_raw(video={"frames": 10}), "astraea-build: error: video.frames: wan needs frames = 4k+1"),
        (tiny_raw(sampling={"stpes": 3}), "astraea-build: error: sampling.stpes: unknown key (did you mean 'steps'?)"),
    ],
)
def test_bad_config_is_one_line_exit_2(tmp_path, capsys, raw, words):
    path = _write(tmp_path, raw)
    assert build_main([str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == words or err.startswith(words)
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing written for an invalid config


def test_missing_file(tmp_path, capsys):
    assert build_main([str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_debug_raises(tmp_path):
    path = _write(tmp_path, tiny_raw(video={"frames": 10}))
    with pytest.raises(Exception, match="video.frames"):
        build_main([str(path), "--debug"])


def test_help_describes_every_stage(capsys):
    with pytest.raises(SystemExit) as e:
        build_main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for stage in ("validate", "preflight", "load", "reference", "rewrite", "search", "engines", "check"):
        assert stage in text


def test_console_script_in_a_fresh_process(tmp_path):
    exe = shutil.which("astraea-build") or str(__import__("pathlib").Path(sys.executable).parent / "astraea-build")
    path = _write(tmp_path, tiny_raw(model={"dtype": "fp64"}))
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "astraea-build: error: model.dtype: 'fp64' is not one of bf16, fp16, fp32"


def test_build_rewrites_every_level_and_searches(tmp_path, capsys):
    raw = tiny_raw(target={"budget": 0.5}, search={"levels": 3, "population": 4, "children": 3, "generations": 2},
                   bench={"warmup": 0, "repeats": 1}, build={"backend": "eager"})
    path = _write(tmp_path, raw)
    out = tmp_path / "run"
    assert build_main([str(path), "--out", str(out), "--quiet", "--dump-graphs"]) == 0
    err = capsys.readouterr().err
    log = (out / "build.log").read_text()
    # one line a stage on the terminal; the passes' statistics and the details only in the run's log
    stages = ["validate", "preflight", "load", "reference", "rewrite", "search", "engines", "check"]
    assert [line.split()[1] for line in err.strip().splitlines()] == stages, err
    assert "rewrite    2 programs (k = 9 .. 18 of 18 rows), 2 blocks" in err
    assert "replace_attention: sparse_attention 2" in log and "replace_attention" not in err
    record = json.loads((out / "graphs" / "k9.json").read_text())
    assert record["passes"]["replace_attention"] == {"sparse_attention": 2}
    assert "torch.ops.astraea.sparse_attention.default" in (out / "graphs" / "k9.txt").read_text()
    dumps = sorted(p.name for p in (out / "graphs" / "k9-passes").iterdir())
    assert len(dumps) == 16 and dumps[0] == "00-annotate_blocks-after.txt"  # 8 passes, before and after
    (folder,) = (out / "search").iterdir()
    schedule = json.loads((folder / "schedule.json").read_text())
    assert schedule["budget_per_step"][0] == 1.0 and 0.45 <= schedule["mean_budget"] <= 0.55
    assert "schedule (budget per step):" in log and "candidates" in log
    # a second build reuses the finished search; --resume of a finished one is a no-op run to the same schedule
    manifest = json.loads((out / "engines" / "manifest.json").read_text())
    assert [step["budget"] for step in manifest["steps"]] == schedule["budget_per_step"]
    check = json.loads((out / "engines-check.json").read_text())
    # eager engines, per CFG branch (Wan's pipeline convention): the search's numbers to float rounding
    assert check["psnr"] == pytest.approx(schedule["per_sample"]["p0_s0"]["psnr"], abs=1e-3)
    assert manifest["per_branch"] is True
    assert build_main([str(path), "--out", str(out), "--quiet", "--verbose"]) == 0
    err = capsys.readouterr().err
    assert "search: reusing" in (out / "build.log").read_text() and "(0 built)" in err  # nothing finished is redone
    assert "replace_attention: sparse_attention 2" in err  # --verbose: the passes' statistics too
    assert build_main([str(path), "--out", str(out), "--quiet", "--resume"]) == 0
    assert json.loads((folder / "schedule.json").read_text())["budget_per_step"] == schedule["budget_per_step"]


def test_tensorrt_backend_without_tensorrt_is_refused_before_any_work(tmp_path, capsys):
    from astraea.runtime import tensorrt_available

    if tensorrt_available():
        pytest.skip("TensorRT is installed: the backend builds (tests marked trt)")
    raw = tiny_raw(target={"budget": 0.5}, build={"backend": "tensorrt"})
    assert build_main([str(_write(tmp_path, raw)), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "build.backend: tensorrt needs TensorRT, which is not installed here" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_engine_refusals_are_user_errors(tmp_path, capsys, monkeypatch):
    """An engine refusal from a known cause is a one-line user error (exit 2), not an internal
    error: float8 block state with tensorrt engines (refused even where TensorRT exists), and
    an engine error raised inside a stage."""
    from astraea import engines, runtime

    monkeypatch.setattr(runtime, "tensorrt_available", lambda: True)  # past the missing-TensorRT check
    raw = tiny_raw(target={"budget": 0.5}, build={"backend": "tensorrt"}, selection={"cache": "float8"})
    assert build_main([str(_write(tmp_path, raw)), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("astraea-build: error: selection.cache: float8 is not built for the tensorrt backend")
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()

    def refuse(*args, **kwargs):
        raise runtime.EngineError("the engines were built for cuda, not cpu: rebuild on this device")

    monkeypatch.setattr(engines, "build", refuse)
    raw = tiny_raw(target={"budget": 0.5}, build={"backend": "eager"})
    assert build_main([str(_write(tmp_path, raw)), "--out", str(tmp_path / "run2"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "astraea-build: error: the engines were built for cuda, not cpu: rebuild on this device")


def test_unreachable_target_is_one_line(tmp_path, capsys):
    raw = tiny_raw(target={"budget": 0.05}, sampling={"steps": 4})
    assert build_main([str(_write(tmp_path, raw)), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("astraea-build: error: target.budget: 0.05 cannot be met with 4 steps")


def test_interrupted_build_resumes_to_the_same_schedule(tmp_path, capsys, monkeypatch):
    """Ctrl-C in the search (after generation 1's checkpoint): exit 130 naming --resume; the
    resumed build ends with the schedule of an uninterrupted one and reuses the reference."""
    raw = tiny_raw(target={"budget": 0.5}, search={"levels": 3, "population": 4, "children": 3, "generations": 3},
                   bench={"warmup": 0, "repeats": 1}, build={"backend": "eager"})
    path = _write(tmp_path, raw)
    assert build_main([str(path), "--out", str(tmp_path / "clean"), "--quiet", "--until", "search"]) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1].split()[1] == "search"  # --until: nothing after it
    assert not (tmp_path / "clean" / "engines").exists()
    (clean,) = (tmp_path / "clean" / "search").iterdir()
    interrupt_search_after(monkeypatch, 1)
    out = tmp_path / "run"
    assert build_main([str(path), "--out", str(out), "--quiet"]) == 130
    assert "continues with --resume" in capsys.readouterr().err
    assert not (out / "engines").exists()
    monkeypatch.undo()
    assert build_main([str(path), "--out", str(out), "--quiet", "--resume", "--until", "search"]) == 0
    assert "reference  1 sample(s) x 3 steps reused" in capsys.readouterr().err
    (folder,) = (out / "search").iterdir()
    got = json.loads((folder / "schedule.json").read_text())
    want = json.loads((clean / "schedule.json").read_text())
    assert got["budget_per_step"] == want["budget_per_step"] and got["mse"] == want["mse"]
