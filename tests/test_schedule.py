"""The shared vocabulary: Schedule (schedule.json) and Manifest (manifest.json) round-trip through
their JSON, read the files earlier releases wrote, and agree with the level table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from astraea.errors import AstraeaError, EngineError
from astraea.manifest import Manifest
from astraea.schedule import Quality, Schedule, SearchRecord, budget_rows, call_label, level_tokens, read_schedules

ROOT = Path(__file__).resolve().parents[1]


def test_rows_of_a_budget_on_any_grid():
    assert [budget_rows(b, 1000) for b in (0, 0.0004, 0.25, 1)] == [0, 1, 250, 1000]
    assert level_tokens(5, 26520) == [0, 6630, 13260, 19890, 26520]
    assert [call_label(k, 2304) for k in (0, 1152, 2304)] == ["skip", "50%", "100%"]


# a schedule.json as the release before the typed Schedule wrote it (search.py, write_outputs)
EARLIER = {
    "key": "554f2ccc9098888c", "levels": 6, "tokens": 2304, "budget_per_step": [1.0, 0.6, 0.0, 0.4],
    "tokens_per_step": [2304, 1382, 0, 922], "mean_budget": 0.5,
    "constraint": {"kind": "budget", "target": 0.5, "value": 0.5, "bounds": [0.45, 0.55]},
    "mse": 0.0012, "psnr": 29.14, "per_sample": {"p0_s0": {"mse": 0.0012, "psnr": 29.14}}, "predicted_ms": 1200.0,
    "cost": {"generations": 3, "candidates_evaluated": 11, "stopped_early": 0, "steps_executed": 40,
             "transformer_calls": 30, "naive_steps": 44, "wall_seconds": 50.0, "gpus": 0, "gpu_hours": 0.0},
    "proxy": None, "device": "CPU", "dense_step_ms": 500.0, "dense_ms": 2000.0, "level_ms": [1, 2, 3, 4, 5, 6],
    "cost_model": "abc", "cost_source": "eager", "timesteps": [999.0, 750.0, 500.0, 250.0],
}


def test_a_searched_schedule_round_trips_and_reads_the_earlier_format():
    s = Schedule.from_levels([4, 2, 0, 3], 5, 1000, timesteps=(999.0, 750.0, 500.0, 250.0), key="k",
                             quality=Quality(0.01, 30.0, {"p0_s0": {"mse": 0.01, "psnr": 30.0}}),
                             search=SearchRecord({"kind": "budget", "target": 0.5, "value": 0.5625, "bounds": [0.45, 0.55]},
                                                 {"candidates_evaluated": 3}, 10.0, 20.0, 5.0, (0.1, 1, 2, 3, 5), "cpu"))
    assert s.tokens == (1000, 500, 0, 750) and s.budgets == (1.0, 0.5, 0.0, 0.75) and s.row_counts == [500, 750, 1000]
    assert s.mean_budget == pytest.approx(0.5625) and s.skipped == 1 and s.search.predicted_speedup == 2.0
    raw = json.loads(json.dumps(s.to_json()))
    assert Schedule.from_json(raw) == s
    assert raw["budget_per_step"] == [1.0, 0.5, 0.0, 0.75] and raw["tokens_per_step"] == [1000, 500, 0, 750]
    earlier = Schedule.from_json(EARLIER)
    assert earlier.search.predicted_speedup == pytest.approx(2000 / 1200) and earlier.quality.psnr == 29.14
    assert json.loads(json.dumps(earlier.to_json())) == EARLIER  # the same file, key for key


def test_schedules_refuse_what_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="first step must be dense"):
        Schedule.from_tokens([500, 1000], 1000)
    with pytest.raises(AstraeaError, match="is not a schedule.json"):
        Schedule.read(ROOT / "pyproject.toml")
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"a": [1.0, 0.5, True]}))
    with pytest.raises(AstraeaError, match="must be 3 budgets"):
        read_schedules(path, 3, 100)
    path.write_text("[1, 0.5]")
    with pytest.raises(AstraeaError, match="give a schedule.json or a JSON object"):
        read_schedules(path, 2, 100)


def test_uniform_is_the_dense_step_then_the_nearest_level():
    s = Schedule.uniform(0.43, 5, 11, 2304)
    assert s.budgets == (1.0, 0.4, 0.4, 0.4, 0.4) and s.tokens == (2304,) + (922,) * 4


def test_a_manifest_round_trips(tmp_path):
    """The manifest.json of a tiny eager build (tests/test_engines.py builds them): the JSON
    written is what from_json reads back, to the same Manifest."""
    from astraea import engines
    from conftest import engine_case

    cfg, model, programs, schedule, _, _ = engine_case("cpu", 4)
    built = engines.build(cfg, model, programs, schedule, tmp_path, backend="eager", progress=False)
    raw = json.loads((tmp_path / "engines" / "manifest.json").read_text())
    assert Manifest.from_json(raw) == built == Manifest.read(tmp_path / "engines")
    assert raw["steps"][2] == {"budget": 0.0, "tokens": 0, "engine": None}  # the skipped step: no engine
    assert [s.tokens for s in built.steps] == list(schedule.tokens) and built.by_tokens.keys() == {18, 3}
    assert built.state_bytes() == sum(s.bytes for s in built.state)
    raw["schema"] = 99
    (tmp_path / "engines" / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(EngineError, match="schema 99, this runtime reads 1"):
        Manifest.read(tmp_path / "engines")
