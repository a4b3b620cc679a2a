"""The step-latency cost model: each budget level's step time, measured once on the device.

A latency or speedup target is a constraint in milliseconds: the predicted time of a
schedule is the sum of its steps' measured times. Each level's program runs from the state
one dense step leaves (as in sampling), warm-up first, then the median of `bench.repeats`
calls (CUDA events on a GPU). The dense model's own step is measured too: a speedup target
is against it. Stored as `<run>/costmodel/<key>.json`, the key hashing the model, the video,
the device, torch and the programs' source; reused whenever the key exists.

`from_bench` reads the model instead from an astraea-bench bench.json measured on the
deployment card (`search.cost_from`): a search on one machine (the CPU, the bundled model)
for the engines another runs. Its levels are budget fractions, so they carry over between
models and video sizes: each level's time is the median of the compiled rows' calls at
that fraction (rows with CUDA graphs when there are any), 0 the skipped step's own call,
and the speedup is against the bench's dense eager step.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import AstraeaError
from .io import read_json, source_hash, stable_hash, write_json
from .sampling import first_step_kwargs
from .schedule import budget_rows, call_label
from .schema import RunConfig
from .timing import device_name, time_call
from .tokenwise import TokenwiseProgram, TokenwiseTransformer


@dataclass
class CostModel:
    key: str
    device: str
    dense_ms: float  # the dense model's step
    level_ms: list[float | None]  # per level (level 0: the step is skipped); None: not measured (not needed)
    tokens_per_level: list[int]
    source: str = "eager"  # "eager": measured here on the rewritten programs; else the bench.json read

    def schedule_ms(self, levels) -> float:
        return sum(self.level_ms[v] for v in levels)


def cost_key(cfg: RunConfig, model, tokens: list[int], backend: str, only: list[int] | None = None) -> str:
    return stable_hash({"model": model.identity, "dtype": cfg.model.dtype, "video": asdict(cfg.video),
                        "device": device_name(model.device), "torch": torch.__version__, "tokens": tokens,
                        "backend": backend, "source": source_hash(), "guidance": cfg.sampling.guidance > 1,
                        "selection": asdict(cfg.selection), "only": only})


@torch.no_grad()
def measure(cfg: RunConfig, model, programs: dict[int, TokenwiseProgram], tokens: list[int], folder: Path,
            backend: str = "eager", progress: bool = True, only: set[int] | None = None) -> CostModel:
    """Per-level step ms (`tokens[level]` rows; 0 = skipped), or the stored measurement;
    `only`: just these levels (a budget target needs the chosen schedule's alone)."""
    only = None if only is None else sorted(only)
    key = cost_key(cfg, model, tokens, backend, only)
    path = folder / f"{key}.json"
    if path.is_file():
        return CostModel(**read_json(path, "delete it to measure the cost model again"))
    kwargs = first_step_kwargs(model, cfg.video, cfg.sampling)
    warmup, repeats = max(1, cfg.bench.warmup), cfg.bench.repeats
    top = max(tokens)

    def median(fn) -> float:
        for _ in range(warmup):
            fn()
        return statistics.median(time_call(model.device, fn) for _ in range(repeats))

    dense_ms = median(lambda: model.transformer(**kwargs))
    level_ms = []
    for level, k in enumerate(tqdm(tokens, desc="cost model", unit="level", disable=not progress, leave=False)):
        if only is not None and level not in only:
            level_ms.append(None)
            continue
        runner = TokenwiseTransformer(programs, [top] + [k] * (warmup + repeats))
        runner(**kwargs)  # the dense first step fills the caches
        level_ms.append(median(lambda: runner(**kwargs)))
    cm = CostModel(key, device_name(model.device), dense_ms, level_ms, list(tokens))
    write_json(path, asdict(cm))
    return cm


def from_bench(path: str | Path, levels: int, tokens: list[int], precision: str = "model") -> CostModel:
    """The cost model of `levels` budget levels (`tokens` rows each, for the model searched)
    from an astraea-bench report; raises AstraeaError naming what is missing. precision: the
    compiled rows of the model's dtype, or ("fp8") those of FP8 engines (their setting marked
    ", fp8": astraea-bench with build.precision fp8); rows of schedules mixing precisions are not read."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
        setup, rows = report["setup"], list(report["rows"])
        n = int(setup["video_tokens"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AstraeaError(f"search.cost_from: {path} is not an astraea-bench bench.json ({type(e).__name__}: {e})") from None
    dense = [r["step_ms"]["dense"] for r in rows if r.get("method") == "dense" and "dense" in r.get("step_ms", {})]
    fp8 = precision == "fp8"
    what = "search.fp8_cost_from" if fp8 else "search.cost_from"
    compiled = [r for r in rows if r.get("method") == "astraea-compiled" and r.get("tokens_per_step")
                and str(r.get("setting", "")).endswith(", fp8") == fp8 and not r.get("precision_per_step")]
    compiled = [r for r in compiled if r.get("cuda_graphs")] or compiled
    if not dense or not compiled:
        kind = "FP8 astraea-compiled rows (build.precision fp8)" if fp8 else "astraea-compiled rows of the model's dtype"
        raise AstraeaError(f"{what}: {path} needs a dense row and {kind} "
                           f"(it has {sorted({r.get('method') for r in rows})})")
    calls: dict[int, list[float]] = {}
    for r in compiled:
        for k in set(r["tokens_per_step"]):
            label = call_label(k, n)
            if label in r.get("step_ms", {}):
                calls.setdefault(int(k), []).append(float(r["step_ms"][label]))
    level_ms = []
    for level in range(levels):
        k = budget_rows(level / (levels - 1), n)
        if k not in calls:
            have = ", ".join(call_label(c, n) for c in sorted(calls))
            raise AstraeaError(f"{what}: {path} has no compiled call at {level / (levels - 1):.0%} "
                               f"(search.levels {levels}; it has {have}): time a schedule that uses every level")
        level_ms.append(statistics.median(calls[k]))
    key = stable_hash({"cost_from": [dense, level_ms], "levels": levels} | ({"precision": "fp8"} if fp8 else {}))
    return CostModel(key, str(setup.get("device", "?")), statistics.median(dense), level_ms, list(tokens), str(path))
