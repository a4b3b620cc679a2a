"""The schedule: one token budget per denoising step, the value the stages after the search share.

A step's budget is a fraction of the N video tokens; the rows it computes are
`budget_rows(budget, N)`: 0 skips the step (the cached output is reused), 1 is dense, any
other budget at least one row. The search picks budgets on a grid of `levels` (level v is
v / (levels - 1)); a schedule given by hand keeps its budgets as given. The first step is
always dense: the block caches are empty before it.

`Schedule` is what `schedule.json` holds (the search's result, or a fixed schedule built
from budgets), what `engines.build` compiles one engine per distinct row count of, and
what astraea-bench times. Its JSON form is flat and stable: `budget_per_step`,
`tokens_per_step`, `tokens` (N), `timesteps`, `mean_budget`, the quality stamp (`mse`,
`psnr`, `per_sample`) and, for a searched schedule, the search's record (`SearchRecord`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import AstraeaError


def budget_rows(budget: float, tokens: int) -> int:
    """The rows a step at `budget` computes: 0 skips the step, 1 is dense, at least one row
    otherwise (any grid: the level table below and schedules given as budgets agree)."""
    return 0 if budget == 0 else tokens if budget == 1 else max(1, round(budget * tokens))


def level_tokens(levels: int, tokens: int) -> list[int]:
    """Rows computed at each level: 0 for level 0 (the step is skipped), N at the top."""
    top = levels - 1
    return [budget_rows(v / top, tokens) for v in range(levels)]


PRECISIONS = ("model", "fp8")


@dataclass(frozen=True)
class Choices:
    """What one gene of the search can take: (budget level, precision) pairs, a gene's value
    an index into `options`. Budgets alone (`Choices.budgets`): value v is level v in the
    model's dtype, the paper's search. Joint precision (`Choices.joint`): every level in the
    model's dtype and every level above 0 in FP8 (a skipped step runs nothing), ordered by
    the cost model's step time with the dense model-dtype step last (the first step's), so
    that the evolution's operators (values drawn in range(len), repair moving one value up
    or down) work on them unchanged."""

    levels: int
    options: tuple[tuple[int, str], ...]

    @classmethod
    def budgets(cls, levels: int) -> Choices:
        return cls(levels, tuple((v, "model") for v in range(levels)))

    @classmethod
    def joint(cls, levels: int, model_ms, fp8_ms) -> Choices:
        """model_ms, fp8_ms: a step's time at each level (fp8_ms[0] unused)."""
        ms = {(v, "model"): model_ms[v] for v in range(levels)} | {(v, "fp8"): fp8_ms[v] for v in range(1, levels)}
        dense = (levels - 1, "model")
        rest = sorted((p for p in ms if p != dense), key=lambda p: (ms[p], p[1] != "model", p[0]))
        return cls(levels, tuple(rest) + (dense,))

    def __len__(self) -> int:
        return len(self.options)

    @property
    def mixed(self) -> bool:
        return any(p != "model" for _, p in self.options)

    def level(self, g: int) -> int:
        return self.options[g][0]

    def precision(self, g: int) -> str:
        return self.options[g][1]

    def step_ms(self, model_ms, fp8_ms=None) -> tuple[float, ...]:
        """Each value's step time (the latency constraint's table)."""
        return tuple((model_ms if p == "model" else fp8_ms)[v] for v, p in self.options)


def call_label(k: int, n: int) -> str:
    """How a report names a call of k of n rows ("40%", "skip"): the key of a bench row's
    step_ms by budget, which costmodel.from_bench reads back."""
    return f"{k / n:.0%}" if k else "skip"


@dataclass(frozen=True)
class Quality:
    """The schedule's measured loss against the dense reference (the search's samples)."""

    mse: float
    psnr: float
    per_sample: dict = field(default_factory=dict)  # sample name -> {"mse": ..., "psnr": ...}


@dataclass(frozen=True)
class SearchRecord:
    """How a searched schedule was found and what it is predicted to cost."""

    constraint: dict  # {"kind": "budget" | "latency", "target", "value", "bounds": [low, high]}
    cost: dict  # the search's own cost: candidates, steps executed, wall seconds, GPU-hours
    predicted_ms: float | None = None  # the schedule's predicted time (the cost model)
    dense_ms: float | None = None  # the dense model's predicted time over the same steps
    dense_step_ms: float | None = None
    level_ms: tuple[float | None, ...] = ()  # the cost model's step time at each level (None: not measured)
    device: str = ""  # where the cost model was measured
    cost_model: str = ""  # the cost model's key
    cost_source: str = "eager"  # "eager": measured on the rewritten programs; else the bench.json read
    proxy: dict | None = None  # a proxy-video search's re-scoring report
    holdout: dict | None = None  # the chosen schedule on prompts and seeds the search never saw (search.holdout_*)
    fp8_level_ms: tuple[float | None, ...] = ()  # search.precision joint: the FP8 step time at each level

    @property
    def predicted_speedup(self) -> float | None:
        return self.dense_ms / self.predicted_ms if self.predicted_ms and self.dense_ms else None


@dataclass(frozen=True)
class Schedule:
    tokens: tuple[int, ...]  # rows computed per step (0: skipped; video_tokens: dense)
    budgets: tuple[float, ...]  # the budget per step, as searched or given
    video_tokens: int  # N
    timesteps: tuple[float, ...] = ()  # the scheduler's timesteps the engines are keyed on
    quality: Quality | None = None
    key: str = ""  # the search's key, or a name for a fixed schedule
    levels: int | None = None  # the search's budget grid
    search: SearchRecord | None = None
    precisions: tuple[str, ...] = ()  # each step's precision ("model" | "fp8"); (): every step in the engines' one

    def __post_init__(self):
        if len(self.tokens) != len(self.budgets) or not self.tokens:
            raise ValueError(f"a schedule needs one budget and one row count a step ({len(self.budgets)} and "
                             f"{len(self.tokens)})")
        if self.tokens[0] != self.video_tokens:
            raise ValueError(f"the first step must be dense ({self.video_tokens} rows): the caches are empty before it")
        if self.precisions and (len(self.precisions) != len(self.tokens) or not set(self.precisions) <= set(PRECISIONS)):
            raise ValueError(f"precision_per_step: one of {', '.join(PRECISIONS)} a step ({len(self.tokens)} steps)")
        if "fp8" not in self.precisions:  # every step in the model's dtype: as a schedule that gives none
            object.__setattr__(self, "precisions", ())

    # ---- how it is made --------------------------------------------------------------------
    @classmethod
    def from_budgets(cls, budgets, n: int, **kw) -> Schedule:
        budgets = tuple(float(b) for b in budgets)
        return cls(tuple(budget_rows(b, n) for b in budgets), budgets, n, **kw)

    @classmethod
    def from_levels(cls, levels_per_step, levels: int, n: int, **kw) -> Schedule:
        top = levels - 1
        table = level_tokens(levels, n)
        return cls(tuple(table[v] for v in levels_per_step), tuple(v / top for v in levels_per_step), n,
                   levels=levels, **kw)

    @classmethod
    def from_choices(cls, values, choices: Choices, n: int, **kw) -> Schedule:
        """A searched schedule: each step's gene value in `choices` (its level and precision)."""
        return cls.from_levels([choices.level(g) for g in values], choices.levels, n,
                               precisions=tuple(choices.precision(g) for g in values), **kw)

    @classmethod
    def from_tokens(cls, tokens, n: int, **kw) -> Schedule:
        return cls(tuple(int(k) for k in tokens), tuple(k / n for k in tokens), n, **kw)

    @classmethod
    def uniform(cls, budget: float, steps: int, levels: int, n: int, **kw) -> Schedule:
        """The dense first step, then `budget` at the nearest of `levels` grid levels."""
        level = round(budget * (levels - 1))
        return cls.from_levels([levels - 1] + [level] * (steps - 1), levels, n, **kw)

    # ---- what it is ------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return len(self.tokens)

    @property
    def mean_budget(self) -> float:
        return sum(self.budgets) / len(self.budgets)

    @property
    def mean_rows(self) -> float:
        """The mean fraction of rows computed (the budgets after rounding to rows)."""
        return sum(self.tokens) / self.video_tokens / len(self.tokens)

    @property
    def row_counts(self) -> list[int]:
        """The distinct non-zero row counts: one engine (or rewritten program) each."""
        return sorted({k for k in self.tokens if k})

    @property
    def skipped(self) -> int:
        return sum(k == 0 for k in self.tokens)

    @property
    def mixed(self) -> bool:
        """Whether some steps run in FP8 (search.precision joint)."""
        return "fp8" in self.precisions

    @property
    def fp8_steps(self) -> int:
        """Steps that compute in FP8 (a skipped step computes nothing)."""
        return sum(p == "fp8" and k > 0 for p, k in zip(self.precisions, self.tokens))

    def name(self, prefix: str = "searched") -> str:
        return f"{prefix} {self.mean_budget:.0%}"

    # ---- schedule.json ---------------------------------------------------------------------
    def to_json(self) -> dict:
        raw = {"key": self.key, "levels": self.levels, "tokens": self.video_tokens,
               "budget_per_step": list(self.budgets), "tokens_per_step": list(self.tokens),
               "mean_budget": self.mean_budget, "timesteps": list(self.timesteps),
               "mse": None if self.quality is None else self.quality.mse,
               "psnr": None if self.quality is None else self.quality.psnr,
               "per_sample": {} if self.quality is None else self.quality.per_sample}
        if self.precisions:  # newer than the format: written only for a schedule that mixes precisions
            raw["precision_per_step"] = list(self.precisions)
        if self.search is not None:
            raw |= {f.name: getattr(self.search, f.name) for f in fields(SearchRecord)}
            raw["level_ms"] = list(self.search.level_ms)
            for late in ("holdout", "fp8_level_ms"):  # newer than the format: written only when there is one
                if not raw[late]:
                    del raw[late]
            if "fp8_level_ms" in raw:
                raw["fp8_level_ms"] = list(raw["fp8_level_ms"])
        return raw

    @classmethod
    def from_json(cls, raw: dict) -> Schedule:
        """schedule.json's content; raises ValueError (KeyError) on a malformed one."""
        n = int(raw["tokens"]) if raw.get("tokens") is not None else int(raw["tokens_per_step"][0])
        quality = None if raw.get("mse") is None else Quality(float(raw["mse"]), float(raw["psnr"]),
                                                                dict(raw.get("per_sample") or {}))
        search = None
        if raw.get("constraint") is not None:
            known = {f.name for f in fields(SearchRecord)}
            record = {k: v for k, v in raw.items() if k in known}
            search = SearchRecord(**record | {"level_ms": tuple(record.get("level_ms") or ()),
                                              "fp8_level_ms": tuple(record.get("fp8_level_ms") or ())})
        return cls(tuple(int(k) for k in raw["tokens_per_step"]), tuple(float(b) for b in raw["budget_per_step"]), n,
                   tuple(float(t) for t in raw.get("timesteps") or ()), quality, str(raw.get("key", "")),
                   raw.get("levels"), search, tuple(str(p) for p in raw.get("precision_per_step") or ()))

    @classmethod
    def read(cls, path: str | Path) -> Schedule:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise AstraeaError(f"{path} is not a schedule.json ({type(e).__name__}: {e})") from None


def read_schedules(path: str | Path, steps: int, n: int) -> dict[str, Schedule]:
    """Named schedules from a file: a schedule.json (`budget_per_step`) or {name: [budget per
    step]}. Each budget is kept as given (a schedule searched at other levels than the
    config's keeps its own), never snapped to the config's levels."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AstraeaError(f"--schedules {path}: {e}") from None
    if not isinstance(raw, dict):
        raise AstraeaError(f"--schedules {path}: give a schedule.json or a JSON object {{name: [budget per step]}}")
    precisions = tuple(raw.get("precision_per_step") or ()) if "budget_per_step" in raw else ()  # joint: a step's
    joint = " joint" if "fp8" in precisions else ""
    named = {f"searched {raw.get('mean_budget', 0):.0%}{joint}": raw["budget_per_step"]} if "budget_per_step" in raw else raw
    out = {}
    for name, budgets in named.items():
        if not isinstance(budgets, list) or len(budgets) != steps or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b <= 1 for b in budgets):
            raise AstraeaError(f"--schedules {path}: {name!r} must be {steps} budgets in [0, 1] (one a step)")
        if budgets[0] != 1:
            raise AstraeaError(f"--schedules {path}: {name!r} starts at {budgets[0]}: the first step must be dense (1.0)")
        try:
            out[name] = Schedule.from_budgets(budgets, n, key=name, precisions=precisions)
        except ValueError as e:
            raise AstraeaError(f"--schedules {path}: {e}") from None
    return out
