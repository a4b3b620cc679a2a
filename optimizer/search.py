"""The budget search: an evolutionary search of one token budget per denoising step.

The paper's algorithm (../shared/ASTRAEA.md section 3; its constraint, repair, seeds and
operators in evolution.py) with every number in model.yaml's `search` section: budgets are levels 0 .. L-1 (theta = level / (L-1)), the first step is
dense; a population of 50, 30 children a generation from binary tournaments, uniform or
block crossover, per-step mutation decaying 0.1 -> 0.01, then repair into [0.9, 1.1] x the
target; the best `population` of parents and children survive. The first population holds
the uniform and front-loaded hand-made schedules (seed_schedules, repaired), then random ones.

Fitness (fitness.py) is the MSE of the final latents against the dense reference, measured
with the rewritten programs; a memo keeps every candidate evaluated, and exact prefix
sharing and early rejection cut the work without changing a fitness bit or the search's
path. The search state is written atomically after every generation; `resume` continues
it to the identical result. With torch.distributed initialised (torchrun, one process per
GPU), each rank evaluates a contiguous share of the sorted children and the results are
gathered; every rank runs the same evolution from the same seed. `plan` is the stage:
programs, cost model, constraint, search (at a proxy video and re-scored, proxy.py, when
`search.proxy_video` is set; then refined at the full video with `search.refine_generations`)
and schedule.json (a `Schedule`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import plots
from .errors import AstraeaError
from .evolution import (  # noqa: F401  re-exported: the search's public names
    Constraint,
    SearchError,
    crossover,
    mutate,
    mutation_rate,
    random_schedule,
    repair,
    seed_schedules,
)
from .fitness import (
    Candidate,
    Counters,
    Evaluator,
    batched_example,
    calibration_samples,
    decode,
    encode,
    fitness_of,
    gather,
    holdout,
    is_main,
    ranking,
    shard,
    world,
)
from .io import read_json, source_hash, stable_hash, write_json
from .metrics import psnr
from .proxy import Rescored, rescore
from .schedule import Choices, Quality, Schedule, SearchRecord, level_tokens
from .schema import RunConfig
from .tokenwise import TokenwiseProgram, build_programs, compiled, graphed

log = logging.getLogger("astraea")
STATE_VERSION = 1


# ---- the search -------------------------------------------------------------------------

@dataclass
class SearchState:
    generation: int  # generations completed (0: the initial population)
    rng: dict
    population: list[tuple[Candidate, float]]
    memo: dict[Candidate, list]  # per-sample MSE in sample order (shorter: stopped early)
    history: list[dict] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)
    sample_order: list[int] = field(default_factory=list)

    def to_json(self, key: str) -> dict:
        return {"version": STATE_VERSION, "key": key, "generation": self.generation, "rng": self.rng,
                "population": [[list(s), f] for s, f in self.population],
                "memo": {encode(s): v for s, v in self.memo.items()}, "history": self.history,
                "counters": vars(self.counters), "sample_order": self.sample_order}

    @classmethod
    def from_json(cls, raw: dict, key: str) -> SearchState:
        if raw.get("version") != STATE_VERSION or raw.get("key") != key:
            raise SearchError("the search checkpoint belongs to another configuration; remove it or drop --resume")
        return cls(raw["generation"], raw["rng"], [(tuple(s), f) for s, f in raw["population"]],
                   {decode(k): v for k, v in raw["memo"].items()}, raw["history"], Counters(**raw["counters"]),
                   raw["sample_order"])


class Search:
    """One evolution. Outputs go to `folder` under `key`; the checkpoint to `state` (default
    folder/state.json) under `state_key` (default `key`): a refined search keeps its proxy
    stage's checkpoint in the folder of the same search without refinement, to be reused."""

    def __init__(self, cfg: RunConfig, evaluator: Evaluator, constraint: Constraint, folder: Path, key: str,
                 early_stop: bool = True, state: Path | None = None, state_key: str | None = None,
                 desc: str = "budget search", extends: bool = False):
        self.cfg, self.ev, self.c, self.folder, self.key = cfg, evaluator, constraint, folder, key
        self.spec = cfg.search
        self.early_stop = early_stop
        self.n = len(evaluator.samples)
        self.state, self._state_key = state or folder / "state.json", state_key
        self.desc = desc
        # a checkpoint of fewer generations is continued without --resume (the refinement: its
        # mutation rate is constant, so continuing it is the same as running them all at once)
        self.extends = extends

    @property
    def state_key(self) -> str:
        return self._state_key or self.key

    # one batch of schedules through the memo, the evaluator and the gather
    def _evaluate(self, st: SearchState, batch: list[Candidate], threshold: float, bar) -> None:
        todo = [s for s in dict.fromkeys(batch) if s not in st.memo]
        if not todo:
            return
        counters = Counters()
        t0 = time.perf_counter()
        mine = shard(todo)
        results = self.ev.evaluate(mine, threshold if self.early_stop else math.inf, counters, st.sample_order,
                                   tick=bar.update if bar is not None else None)
        counters.seconds = time.perf_counter() - t0
        results, counters = gather(results, counters)
        st.memo.update(results)
        st.counters.add(counters)

    def _threshold(self, st: SearchState) -> float:
        return st.population[-1][1] if len(st.population) >= self.spec.population else math.inf

    def _select(self, st: SearchState, candidates: list[Candidate]) -> None:
        """Best `population` of parents and children; parents first among equal fitness."""
        pool = list(dict.fromkeys([s for s, _ in st.population] + candidates))
        scored = [(fitness_of(st.memo[s], self.n), i, s) for i, s in enumerate(pool)]
        scored.sort(key=lambda x: (x[0], x[1]))
        st.population = [(s, f) for f, _, s in scored[: self.spec.population]]

    def _record(self, st: SearchState, children: int) -> None:
        best_s, best_f = st.population[0]
        finite = [f for _, f in st.population if math.isfinite(f)]
        st.history.append({"generation": st.generation, "best_mse": best_f, "mean_mse": float(np.mean(finite)),
                           "best_value": self.c.value(best_s), "children": children,
                           "candidates": st.counters.candidates, "steps": st.counters.steps,
                           "naive_steps": st.counters.naive_steps, "seconds": st.counters.seconds})

    def hand_made(self, rng: np.random.Generator | None = None) -> list[Candidate]:
        """The hand-made schedules the search starts from (seed_schedules) as its first population
        holds them: repaired into the band, at most half the population (so that random schedules
        keep it diverse). Without `rng` they are replayed from search.seed: the first population's
        generator repairs them first, so they come out the same."""
        rng = np.random.default_rng(self.spec.seed) if rng is None else rng
        made = seed_schedules(self.c, self.cfg.sampling.steps, self.spec.gene_steps)
        seeds = list(dict.fromkeys(repair(s, self.c, rng, self.spec.gene_steps) for s in made))
        return seeds[: max(1, self.spec.population // 2)]

    def _initial(self, rng: np.random.Generator) -> list[Candidate]:
        """The hand-made seeds, then random repaired schedules."""
        steps, levels, w = self.cfg.sampling.steps, self.c.levels, self.spec.gene_steps  # c.levels: a gene's values
        pop = self.hand_made(rng)
        while len(pop) < self.spec.population * 4 and len(set(pop)) < self.spec.population:
            pop.append(repair(random_schedule(steps, levels, rng, w), self.c, rng, w))
        return list(dict.fromkeys(pop))[: self.spec.population]

    def _checkpoint(self, st: SearchState) -> None:
        if is_main():
            write_json(self.state, st.to_json(self.state_key))

    def _own(self) -> SearchState | None:
        """This search's checkpoint, if there is one of this key."""
        try:
            raw = read_json(self.state, "delete it to search from the start")
        except AstraeaError:
            return None
        if raw.get("version") == STATE_VERSION and raw.get("key") == self.state_key:
            return SearchState.from_json(raw, self.state_key)
        return None

    def _finished(self) -> SearchState | None:
        """A checkpoint of this search that has run every generation (deterministic for its
        key, so reused without --resume; a refined search reuses its proxy stage's)."""
        own = self._own() if self.state.is_file() else None
        return own if own is not None and own.generation == self.spec.generations else None

    def run(self, resume: bool = False, progress: bool = True,
            start: list[tuple[Candidate, list]] | None = None) -> SearchState:
        """`start`: evaluated candidates (schedule, per-sample MSE in sample order) as the first
        population instead of the hand-made and random ones (the refinement's parents)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.state.parent.mkdir(parents=True, exist_ok=True)
        ckpt = self.state
        steps, spec = self.cfg.sampling.steps, self.spec
        own = self._own() if ckpt.is_file() else None
        if own is not None and own.generation == spec.generations:
            log.info("search: reusing the finished %s (%s)", self.desc, ckpt)
            return own
        if self.extends and own is not None and own.generation < spec.generations:
            resume = True
        # a refinement asked for fewer generations than its checkpoint holds runs them again
        # from the start over the checkpoint's evaluations (the same children: nothing is lost)
        longer = own if self.extends and own is not None and own.generation > spec.generations else None
        if resume and ckpt.is_file():
            st = SearchState.from_json(read_json(ckpt, "delete it, or drop --resume, to search from the start"),
                                       self.state_key)
            rng = np.random.default_rng()
            rng.bit_generator.state = st.rng
            log.info("search: resuming after generation %d of %d", st.generation, spec.generations)
        else:
            rng = np.random.default_rng(spec.seed)
            st = None
        per_gen = spec.children * self.n * steps
        first = 0 if start else spec.population * self.n * steps
        total = first + spec.generations * per_gen
        done = 0 if st is None else first + st.generation * per_gen
        bar = tqdm(total=total, initial=done, desc=self.desc, unit="step", disable=not progress or not is_main(),
                   leave=False)
        try:
            if st is None:
                pop = [s for s, _ in start] if start else self._initial(rng)
                st = SearchState(0, {}, [], dict(start or {}), sample_order=list(range(self.n)))
                self._evaluate(st, pop, math.inf, bar)
                # hardest sample first (largest MSE over the initial population): earlier rejections
                means = [np.mean([st.memo[s][i] for s in pop]) for i in range(self.n)]
                order = sorted(range(self.n), key=lambda i: (-means[i], i))
                st.memo = {s: [v[i] for i in order] for s, v in st.memo.items()}
                st.sample_order = order
                if longer is not None and longer.sample_order == order:
                    st.memo = {**longer.memo, **st.memo}
                self._select(st, pop)
                st.rng = rng.bit_generator.state
                self._record(st, len(pop))
                self._checkpoint(st)
            while st.generation < spec.generations:
                gen = st.generation + 1
                p = mutation_rate(spec, gen)
                children, w = [], spec.gene_steps
                for _ in range(spec.children):
                    a, b = self._tournament(st, rng), self._tournament(st, rng)
                    child = mutate(crossover(a, b, rng, w), p, self.c.levels, rng, w)
                    children.append(repair(child, self.c, rng, w))
                self._evaluate(st, children, self._threshold(st), bar)
                self._select(st, children)
                st.generation = gen
                st.rng = rng.bit_generator.state
                self._record(st, len(children))
                self._checkpoint(st)
                best = st.population[0]
                bar.set_postfix(best_psnr=f"{self.mean_psnr(best[0], st):.2f}", value=f"{self.c.value(best[0]):.3g}")
        finally:
            bar.total = bar.n
            bar.close()
        return st

    def _tournament(self, st: SearchState, rng: np.random.Generator) -> Candidate:
        i, j = (int(v) for v in rng.integers(0, len(st.population), 2))
        return st.population[min(i, j)][0]  # the population is sorted: the lower index is fitter

    def mean_psnr(self, s: Candidate, st: SearchState) -> float:
        values = st.memo[s]
        return float(np.mean([psnr(v, self.ev.samples[st.sample_order[i]].peak) for i, v in enumerate(values)]))

    # ---- outputs --------------------------------------------------------------------------
    def write_outputs(self, st: SearchState, cost, timesteps: list[float], rescored: Rescored | None = None,
                      refined: SearchState | None = None, fp8_cost=None) -> Schedule:
        """schedule.json, search.png and schedule.png. With a proxy (`rescored`), the schedule,
        its tokens, MSE and PSNR are the full video's, and the cost adds the re-scoring; with
        a refinement (`refined`, the evolution at the full video after it) the schedule is
        the refinement's best and the cost adds it too."""
        c = Counters(**vars(st.counters))
        if rescored is None:
            best, fit = st.population[0]
            n = self.ev.tokens
            named = [(self.ev.samples[st.sample_order[i]], v) for i, v in enumerate(st.memo[best])]
            proxy = None
        else:
            best, fit = rescored.chosen, fitness_of(rescored.mse[rescored.chosen], len(rescored.samples))
            n = rescored.full.tokens
            named = list(zip(rescored.samples, rescored.mse[best]))
            c.add(rescored.counters)
            proxy = rescored.report(self.spec, self.ev, ranking(st.memo, self.n), lambda s: self.mean_psnr(s, st),
                                    st.counters.seconds)
            if refined is not None:
                start_psnr = float(np.mean([psnr(v, x.peak) for x, v in named]))
                best, fit = refined.population[0]
                named = [(rescored.samples[refined.sample_order[i]], v) for i, v in enumerate(refined.memo[best])]
                c.add(refined.counters)
                proxy["refine"] = {
                    "generations": refined.generation, "children": self.spec.refine_children or self.spec.children,
                    "parents": len(rescored.candidates), "candidates": refined.counters.candidates,
                    "stopped_early": refined.counters.stopped, "steps": refined.counters.steps,
                    "seconds": refined.counters.seconds, "start_psnr": start_psnr,
                    "psnr": float(np.mean([psnr(v, x.peak) for x, v in named])), "history": refined.history}
        per_sample = {sample.name: {"mse": v, "psnr": psnr(v, sample.peak)} for sample, v in named}
        gpus = max(1, world()) if self.ev.model.device.type == "cuda" else 0
        steps = len(best)
        choices = self.ev.choices
        if choices.mixed:  # joint precision: each step at its value's time, of either cost model
            step_ms = choices.step_ms(cost.level_ms, fp8_cost.level_ms)
            predicted = sum(step_ms[g] for g in best)
        else:
            predicted = cost.schedule_ms(best)
        record = SearchRecord(
            constraint={"kind": self.c.kind, "target": self.c.target, "value": self.c.value(best),
                        "bounds": [self.c.low * self.c.target, self.c.high * self.c.target]},
            cost={"generations": st.generation, "candidates_evaluated": c.candidates, "stopped_early": c.stopped,
                  "steps_executed": c.steps, "transformer_calls": c.transformer_calls, "naive_steps": c.naive_steps,
                  "wall_seconds": c.seconds, "gpus": gpus, "gpu_hours": c.seconds * gpus / 3600},
            predicted_ms=predicted, dense_ms=steps * cost.dense_ms, dense_step_ms=cost.dense_ms,
            level_ms=tuple(cost.level_ms), device=cost.device, cost_model=cost.key, cost_source=cost.source, proxy=proxy,
            fp8_level_ms=tuple(fp8_cost.level_ms) if choices.mixed else ())
        quality = Quality(fit, float(np.mean([p["psnr"] for p in per_sample.values()])), per_sample)
        schedule = Schedule.from_choices(best, choices, n, timesteps=tuple(timesteps), quality=quality,
                                         key=self.key, search=record)
        if is_main():
            write_json(self.folder / "schedule.json", schedule.to_json())
            full = [(self.c.value(s), self.mean_psnr(s, st)) for s, v in st.memo.items() if len(v) == self.n]
            chosen = st.population[0][0]
            plots.search_progress(self.folder / "search.png", st.history, full, (self.c.value(chosen), self.mean_psnr(chosen, st)),
                                  (self.c.low * self.c.target, self.c.high * self.c.target), self.c.kind == "budget", proxy)
            plots.schedule_bars(self.folder / "schedule.png", list(schedule.budgets), schedule.mean_budget, quality.psnr)
        return schedule


def search_key(reference_key: str, cfg: RunConfig, constraint: Constraint, backend: str,
               cost_from: str | None = None, model_identity: dict | None = None) -> str:
    """cost_from: the key of the cost model read from search.cost_from (its times, wherever the file lies)."""
    from dataclasses import asdict

    settings = asdict(cfg.search)
    for exact in ("early_stop", "share_prefixes", "prefix_cache_gb", "proxy_min_spearman"):  # not the result
        settings.pop(exact)
    for late, off in (("compile", False), ("cuda_graphs", False), ("gene_steps", 1), ("precision", "model"),
                      ("fp8_cost_from", None)):
        if settings[late] == off:  # keys of searches before the setting existed stay valid
            settings.pop(late)
    refine = [settings.pop("refine_generations"), settings.pop("refine_children") or cfg.search.children]
    settings["cost_from"] = cost_from
    base = stable_hash({"reference": reference_key, "model": model_identity, "search": settings,
                        "selection": asdict(cfg.selection),
                        "backend": backend, "source": source_hash(),
                        "constraint": [constraint.kind, constraint.target, constraint.low, constraint.high,
                                       list(constraint.step_ms)]})
    # the proxy stage's key is the same with or without a refinement, so that one reuses its checkpoint
    return base if not refine[0] else stable_hash({"search": base, "refine": refine})


def faster(programs: dict[int, TokenwiseProgram], spec) -> dict[int, TokenwiseProgram]:
    """The fitness programs as search.compile and search.cuda_graphs ask (compiled, then replayed)."""
    programs = compiled(programs) if spec.compile else programs
    return graphed(programs) if spec.cuda_graphs else programs


def plan(cfg: RunConfig, model, reference, out_dir: Path, resume: bool = False, progress: bool = True,
         programs: dict[int, TokenwiseProgram] | None = None, fp8=None) -> Schedule:
    """Search the schedule for cfg.target (or reuse the finished search with the same key).
    fp8: with search.precision joint, the FP8 model (astraea.quantize) and optionally its
    rewritten programs; each step's precision is then searched with its budget."""
    spec, target = cfg.search, cfg.target
    n = model.layout(cfg.video).video_tokens
    tokens = level_tokens(spec.levels, n)
    programs = programs or build_programs(model, cfg, tokens, progress)
    joint = spec.precision == "joint"
    if joint and fp8 is None:
        raise SearchError("search.precision joint needs the FP8 model (build.precision: fp8)")
    fp8_model, fp8_programs = (fp8[0], fp8[1] or build_programs(fp8[0], cfg, tokens, progress)) if joint else (None, None)
    # a speedup target searches in milliseconds: every level's cost first; a budget target
    # needs only the chosen schedule's levels, for its predicted time (measured after the search)
    cost = measure_cost(cfg, model, programs, tokens, out_dir, progress) if (
        target.speedup is not None or spec.cost_from) else None
    fp8_cost = measure_cost(cfg, fp8_model, fp8_programs, tokens, out_dir, progress, fp8=True) if joint else None
    choices = Choices.joint(spec.levels, cost.level_ms, fp8_cost.level_ms) if joint else Choices.budgets(spec.levels)
    steps = cfg.sampling.steps
    if target.budget is not None:
        c = Constraint("budget", target.budget, spec.repair_low, spec.repair_high, spec.levels)
    elif target.speedup is not None:
        c = Constraint("latency", steps * cost.dense_ms / target.speedup, spec.repair_low, spec.repair_high,
                       len(choices), choices.step_ms(cost.level_ms, fp8_cost.level_ms if joint else None))
    else:
        raise SearchError("target: set target.budget (mean budget) or target.speedup for the search")
    c.check_feasible(steps)
    cost_keys = None if not spec.cost_from else cost.key if not joint else f"{cost.key}+{fp8_cost.key}"
    key_args = (c, "eager", cost_keys, model.identity if not joint else model.identity | {"fp8": fp8_model.identity})
    key = search_key(reference.key, cfg, *key_args)
    folder = out_dir / "search" / key
    done = folder / "schedule.json"
    if done.is_file() and not resume:
        log.debug("search: reusing %s", done)
        return Schedule.read(done)
    # a refined search's proxy stage is the unrefined search's: its folder, checkpoint and re-scoring are shared
    stage_key = search_key(reference.key, dataclasses.replace(
        cfg, search=dataclasses.replace(spec, refine_generations=0, refine_children=0)), *key_args)
    stage = out_dir / "search" / stage_key
    cache = int(spec.prefix_cache_gb * 2**30)
    samples = calibration_samples(model, cfg, reference, out_dir / "embeddings")
    # on an accelerator the full video's samples run in one batch too (programs captured at that batch; on the
    # CPU a batch gains nothing and would cost a second capture)
    batched = _batches(spec, model, samples) and torch.device(model.device).type != "cpu"
    fitness_programs = build_programs(model, cfg, tokens, progress, example=batched_example(model, cfg, samples)) \
        if batched else programs
    fitness_programs = faster(fitness_programs, spec)
    fitness_fp8 = None
    if joint:
        fitness_fp8 = faster(build_programs(fp8_model, cfg, tokens, progress, example=batched_example(model, cfg, samples))
                             if batched else fp8_programs, spec)
    full = Evaluator(model, cfg, fitness_programs, samples, spec.levels, n, cache, spec.share_prefixes,
                     batch_samples=batched, choices=choices, fp8_programs=fitness_fp8)
    ev = full
    if spec.proxy_video:  # candidates evaluated at the smaller video, the best re-scored at the full one
        from . import reference as dense
        from .schema import proxy_config

        small = proxy_config(cfg)
        small_ref = dense.run(small, model, out_dir, progress=progress)
        small_n = model.layout(small.video).video_tokens
        small_samples = calibration_samples(model, small, small_ref, out_dir / "embeddings")
        batched = _batches(spec, model, small_samples)
        example = batched_example(model, small, small_samples) if batched else None
        small_programs = build_programs(model, small, level_tokens(spec.levels, small_n), progress, example=example)
        small_programs = faster(small_programs, spec)
        small_fp8 = faster(build_programs(fp8_model, small, level_tokens(spec.levels, small_n), progress,
                                          example=example), spec) if joint else None
        ev = Evaluator(model, small, small_programs, small_samples, spec.levels, small_n, cache, spec.share_prefixes,
                       batch_samples=batched, choices=choices, fp8_programs=small_fp8)
        log.info("search: candidates at the proxy video %s (%d tokens against %d%s); the best %d and %d more re-scored "
                 "at the full video", list(spec.proxy_video), small_n, n,
                 f", {len(small_samples)} samples a batch" if batched else "", spec.rescore, spec.validate)
    search = Search(cfg, ev, c, folder, key, early_stop=spec.early_stop, state=stage / "state.json",
                    state_key=stage_key)
    if search.state.is_file() and not resume and search._finished() is None:
        log.info("search: an unfinished search of this configuration exists; starting over (--resume continues it)")
    st = search.run(resume=resume, progress=progress)
    rescored = rescore(spec, ranking(st.memo, search.n), full, stage, stage_key, progress,
                       seeds=search.hand_made()) if spec.proxy_video else None
    refined = refine(cfg, full, c, rescored, folder, key, stage, stage_key, resume, progress) if spec.refine_generations else None
    chosen = refined.population[0][0] if refined else rescored.chosen if rescored else st.population[0][0]
    if cost is None:
        cost = measure_cost(cfg, model, programs, tokens, out_dir, progress, only=set(chosen))
    schedule = search.write_outputs(st, cost, [float(t) for t in full.samplers[0].timesteps.cpu()], rescored, refined,
                                    fp8_cost)
    if spec.holdout_prompts or spec.holdout_seeds:
        report = holdout(cfg, model, programs, chosen, out_dir, schedule.quality.psnr, progress, choices, fp8_programs)
        schedule = dataclasses.replace(schedule, search=dataclasses.replace(schedule.search, holdout=report))
        if is_main():
            write_json(done, schedule.to_json())
    return schedule


def refine(cfg: RunConfig, full: Evaluator, c: Constraint, rescored: Rescored, folder: Path, key: str,
           stage: Path, stage_key: str, resume: bool, progress: bool) -> SearchState:
    """search.refine_generations generations of the same evolution at the full video, its
    first population the re-scored candidates (already evaluated there), at the last
    mutation rate. Its checkpoint, <stage>/refine-<children>.json beside the proxy stage's,
    is continued by a run that asks for more generations."""
    spec = cfg.search
    parents = list(dict.fromkeys(rescored.candidates))
    r = dataclasses.replace(spec, population=len(parents), children=spec.refine_children or spec.children,
                            generations=spec.refine_generations, mutation_start=spec.mutation_end)
    s = Search(dataclasses.replace(cfg, search=r), full, c, folder, key, early_stop=spec.early_stop,
               state=stage / f"refine-{r.children}.json", state_key=f"{stage_key}-refine-{r.children}",
               desc="refine at the full video", extends=True)
    log.info("search: refining at the full video: %d generations of %d children from the %d re-scored",
             r.generations, r.children, len(parents))
    return s.run(resume=resume, progress=progress, start=[(p, rescored.mse[p]) for p in parents])


def _batches(spec, model, samples) -> bool:
    """Whether a candidate's samples run as one batch (search.batch_samples; not with a
    stochastic scheduler, whose noise a batch would draw differently)."""
    return spec.batch_samples and len(samples) > 1 and not model.family.stochastic(model.scheduler)


def measure_cost(cfg, model, programs, tokens, out_dir, progress, only: set[int] | None = None, fp8: bool = False):
    """The step-latency model: search.cost_from's measured engines (fp8: search.fp8_cost_from's
    FP8 ones), or measured here on `programs` (`only` these levels)."""
    from .costmodel import from_bench, measure

    path = cfg.search.fp8_cost_from if fp8 else cfg.search.cost_from
    if path:
        return from_bench(path, cfg.search.levels, tokens, precision="fp8" if fp8 else "model")
    return measure(cfg, model, programs, tokens, out_dir / "costmodel", progress=progress, only=only)
