"""Pre-flight: the peak-memory estimate against peaks measured on the H100/H200 (docs/results),
and a config that cannot fit refused in one line before any weights exist."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from astraea import config, preflight
from astraea.cli import bench_main, build_main
from conftest import tiny_raw

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs/results"


def _real(report: str, method: str, setting: str = "") -> tuple[config.RunConfig, float, dict]:
    """The config of a measured bench row (random weights at the real size, on the meta
    device) and its measured peak GiB."""
    raw = json.loads((RESULTS / report / "bench.json").read_text())
    s = raw["setup"]
    row = next(r for r in raw["rows"] if r["method"] == method and r["setting"].startswith(setting))
    spec = {"model": {**s["model"], "device": "meta"}, "video": s["video"],
            "sampling": {k: v for k, v in s["sampling"].items() if k != "prompt_file"}, "selection": s["selection"]}
    if method.startswith("astraea"):
        spec["target"] = {"budget": 0.5}
    return config.from_dict(spec), row["peak_gib"], row


@pytest.mark.parametrize("report,method,setting", [
    ("bench-h100/searched-schedules", "dense", ""),  # Wan 2.1 1.3B, 832x480x65
    ("bench-h200/wan-1.3b-81", "dense", ""),  # 81 frames
    ("bench-h200/cogvideox-2b", "dense", ""),
    ("bench-h100/searched-schedules", "astraea-compiled", "searched 50%"),  # bf16 block state, full Delta
    ("bench-h100/float8-memory", "astraea-compiled", "uniform 50%"),  # float8 cache + sketch
    ("bench-h200/cogvideox-2b", "astraea-compiled", "searched 50%"),
])
def test_the_estimate_is_near_the_measured_peak(report, method, setting):
    """Within 15% of each measured peak; the block state exactly what the engines held."""
    cfg, peak, row = _real(report, method, setting)
    est = preflight.estimate(cfg, torch.device("meta"))
    assert est.free_bytes is None  # meta: nothing to check against
    assert est.peak_bytes / 2**30 == pytest.approx(peak, rel=0.15), est.line()
    if row.get("state_gib"):
        assert est.state_bytes / 2**30 == pytest.approx(row["state_gib"], rel=1e-3)


def test_the_parameters_are_counted_without_weights():
    """Counted on the meta device: Wan 2.1 14B at its real size costs no memory."""
    cfg = config.from_dict({"model": {"family": "wan", "preset": "wan2.1-t2v-14b", "device": "meta"},
                            "video": {"frames": 81, "height": 720, "width": 1280},
                            "sampling": {"prompts": ["x"]}})
    est = preflight.estimate(cfg, torch.device("meta"))
    assert 14.0e9 < est.parameters < 14.5e9 and est.video_tokens == 21 * 45 * 80


def test_a_video_that_cannot_fit_is_refused_before_any_work(tmp_path, capsys):
    """video.height 1e9 (it once passed validation, then died allocating 13.8 TB as an
    'internal error'): one line naming the key and the limit, exit 2, no run folder."""
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(video={"height": 1_000_000_000}, target={"budget": 0.5})))
    for prog, main in (("astraea-build", build_main), ("astraea-bench", bench_main)):
        assert main([str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"{prog}: error: video.height: ")
        assert "exceeds the" in err[-1] and "free on cpu" in err[-1] and "lower video.frames, height or width" in err[-1]
        assert [line.split()[1] for line in err[:-1]] == ["validate"]  # refused before load
        assert not (tmp_path / "run").exists()


def test_a_block_state_that_cannot_fit_names_the_selection_settings():
    """Wan 2.1 14B at 1280x720x81 fits a 139 GiB card dense, but not with the bf16 block state
    of a budget target (refused on an H200 this way): the message names the memory setting."""
    cfg = config.from_dict({"model": {"family": "wan", "preset": "wan2.1-t2v-14b", "device": "meta"},
                            "video": {"frames": 81, "height": 720, "width": 1280},
                            "sampling": {"prompts": ["x"]}, "target": {"budget": 0.5}})
    est = preflight.estimate(cfg, torch.device("meta"))
    free = 139 * 2**30
    assert est.weights_bytes + est.activation_bytes < free < est.peak_bytes
    import unittest.mock

    with unittest.mock.patch.object(preflight, "free_bytes", lambda device: free):
        with pytest.raises(config.ConfigError, match=r"^selection: 75,600 video tokens fit dense, but .* exceeds the 139 "
                           r"GiB free on meta: selection: \{delta: sketch, cache: float8\} needs \d+(\.\d+)? GiB$"):
            preflight.check(cfg, torch.device("meta"))


def test_a_config_that_fits_is_summarised(tmp_path, capsys):
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(tiny_raw()))
    assert build_main([str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if x.split()[1] == "preflight")
    assert "latents 16x3x4x6, 18 video tokens; estimated peak" in line and "free on cpu" in line
