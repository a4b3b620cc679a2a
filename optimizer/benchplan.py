"""What an astraea-bench invocation measures: its schedules (uniform, the run folder's
searched ones, those given with --schedules, or an engine folder's own) and the engine
folder that holds every budget level (and, for schedules that mix precisions, both kinds of
engine) they use; bench.py times them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .families import LoadedModel
from .schedule import Schedule
from .schema import RunConfig


def share_weights(transformer, module: torch.nn.Module, fp8_module: torch.nn.Module | None = None) -> bool:
    """Point the runtime's weights at the model's own tensors (same names, shapes, dtypes),
    so a benchmark holding both counts the weights once; in a folder mixing precisions the FP8
    engines' weights at fp8_module's. True when every weight is the model's own tensor."""

    def point(attr: str, names, source: torch.nn.Module) -> bool:
        own = dict(source.named_parameters()) | dict(source.named_buffers())  # non-persistent ones too (Wan's rope)
        if not all(n in own and own[n].shape == w.shape and own[n].dtype == w.dtype
                   for n, w in zip(names, getattr(transformer, attr))):
            return False
        setattr(transformer, attr, [own[n].detach() for n in names])
        return True

    shared = point("weights", transformer.manifest.weights_order, module)
    if transformer.fp8_weights is not None and fp8_module is not None:
        shared = point("fp8_weights", transformer.manifest.fp8_weights["order"], fp8_module) and shared
    return shared


def run_searched(out: Path, timesteps: list[float], n: int) -> dict[str, Schedule]:
    """The run folder's finished searches for these timesteps and this N."""
    found = {}
    for path in sorted((out / "search").glob("*/schedule.json")):
        s = Schedule.read(path)
        if s.video_tokens == n and len(s.timesteps) == len(timesteps) and all(
                abs(a - b) < 1e-3 for a, b in zip(s.timesteps, timesteps)):
            found[s.name() + (" joint" if s.mixed else "")] = s  # a joint search beside a plain one of its budget
    return found


@dataclass
class Plan:
    """What one invocation measures: the schedules of the Astraea rows and, given an engine
    folder, its loaded engines."""

    schedules: dict[str, Schedule]
    engines: object | None = None  # runtime.EngineTransformer


def invocation_plan(cfg: RunConfig, model: LoadedModel, out: Path, extra: dict[str, Schedule] | None,
                    engine_folder: Path | None) -> Plan:
    steps, levels, n = cfg.sampling.steps, cfg.search.levels, model.layout(cfg.video).video_tokens
    if engine_folder is not None:  # the folder's own schedule
        from . import runtime

        engines = runtime.load(engine_folder, model.device, cuda_graphs=cfg.bench.cuda_graphs)
        m = engines.manifest
        precisions = tuple(m.engines[s.engine].precision if s.engine else "model" for s in m.steps) \
            if m.fp8_weights else ()
        return Plan({"engines": Schedule.from_tokens([s.tokens for s in m.steps], n, precisions=precisions)}, engines)
    from .sampling import timesteps

    uniform = {f"uniform {b:.0%}": Schedule.uniform(b, steps, levels, n) for b in cfg.bench.budgets}
    schedules = uniform | run_searched(out, timesteps(model, steps), n) | (extra or {})
    mixed = [name for name, s in schedules.items() if s.mixed]
    if mixed and cfg.build.precision != "fp8":
        from .errors import AstraeaError

        raise AstraeaError(f"{mixed[0]!r} runs some steps in FP8 (search.precision joint): time it with build.precision: "
                           "fp8, which makes the FP8 model")
    return Plan(schedules)


def plan_schedules(cfg: RunConfig, model: LoadedModel, out: Path, extra: dict[str, Schedule] | None = None):
    """The schedules an invocation without an engine folder measures (uniform, searched, given)."""
    return invocation_plan(cfg, model, out, extra, None).schedules


def build_engines(cfg: RunConfig, model: LoadedModel, out: Path, schedules: dict[str, Schedule], progress: bool,
                  dense: LoadedModel | None = None):
    """Build (or keep, where its file is there) the engine of every budget level the schedules
    use under <out>/bench/engines; returns the manifest. Engines of earlier invocations stay
    in the folder (one invocation a schedule reuses what another built): astraea-bench
    --build-only, and the astraea-compiled rows. Schedules that mix precisions (search.precision
    joint) need `model` the FP8 one (build.precision fp8) and `dense` the model dtype's: the
    folder then holds the engines of both, each schedule of the FP8 bench's own in FP8."""
    from . import engines
    from .errors import AstraeaError
    from .sampling import timesteps

    steps, n = cfg.sampling.steps, model.layout(cfg.video).video_tokens
    mixed = any(s.mixed for s in schedules.values())
    if mixed and (dense is None or model.identity.get("precision") != "fp8"):
        raise AstraeaError("a schedule that mixes precisions (precision_per_step) is timed with build.precision: fp8, "
                           "which makes its FP8 model")
    own = "fp8" if mixed else "model"  # the precision of a schedule that gives none, in a mixed folder
    calls = {(k, p) for s in schedules.values()
             for k, p in zip(s.tokens[1:], (s.precisions or (own,) * s.steps)[1:]) if k}
    if mixed and any(not s.mixed for s in schedules.values()):
        calls.add((n, "fp8"))  # their dense first step, in FP8
    calls = sorted(calls, key=lambda c: (-c[0], c[1])) or [(n, "model")]
    if len(calls) > steps - 1:
        raise AstraeaError(f"the schedules use {len(calls)} budget levels, more than one {steps}-step schedule holds "
                           "(sampling.steps - 1): time them in several invocations")
    picked = [calls[i % len(calls)] for i in range(steps - 1)]
    schedule = Schedule.from_tokens([n] + [k for k, _ in picked], n, timesteps=tuple(timesteps(model, steps)),
                                    key="astraea-bench", precisions=("model", *(p for _, p in picked)))
    if mixed:
        manifest = engines.build(cfg, dense, {}, schedule, out / "bench", progress=progress, prune=False,
                                 fp8=(model, {}))
    else:
        manifest = engines.build(cfg, model, {}, schedule, out / "bench", progress=progress, prune=False)
    from .parallel import barrier

    barrier()  # under sequence parallelism: every rank's engines in place before any loads the folder
    return manifest
