"""The budget search: an evolutionary search of one token budget per denoising step.

The paper's algorithm (../shared/ASTRAEA.md section 3) with every number in model.yaml's
`search` section: budgets are levels 0 .. L-1 (theta = level / (L-1)), the first step is
dense; a population of 50, 30 children a generation from binary tournaments, uniform or
block crossover, per-step mutation decaying 0.1 -> 0.01, then repair into [0.9, 1.1] x the
target; the best `population` of parents and children survive. The first population holds
the uniform and front-loaded hand-made schedules (seed_schedules, repaired), then random ones.

Fitness is the MSE of the final latents against the stored dense reference, averaged over
the calibration samples (prompts x seeds), measured by running the rewritten programs
(tokenwise.py) in the shared sampling loop: what will be deployed. Three exact savings,
none of which changes a fitness bit or the search's path (tests check both):
- shared prefixes: a generation's children are evaluated in lexicographic order of their
  schedules, a depth-first walk of their prefix trie; the sampling state (latents,
  scheduler, block caches) is copied at each depth where a later child branches off and
  restored for it, within `search.prefix_cache_gb`;
- early rejection: MSE >= 0, so once a child's partial sum over the samples evaluated so
  far already reaches the worst surviving fitness, it cannot survive and is stopped;
- a memo of every schedule evaluated (duplicates cost nothing).
The search state is written atomically after every generation; `resume` continues it to
the identical result. With torch.distributed initialised (torchrun, one process per GPU),
each rank evaluates a contiguous share of the sorted children and the results are
gathered; every rank runs the same evolution from the same seed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import RunConfig
from .errors import AstraeaError
from .io import source_hash, stable_hash, write_json
from .metrics import psnr
from .sampling import SampleInputs, Sampler
from .tokenwise import TokenwiseProgram, TokenwiseTransformer

log = logging.getLogger("astraea")
STATE_VERSION = 1
Schedule = tuple[int, ...]  # one level per step


class SearchError(AstraeaError):
    """The target cannot be met, or a checkpoint does not belong to this search."""


# ---- the constraint and its repair ------------------------------------------------------

@dataclass(frozen=True)
class Constraint:
    """What a schedule costs, against the target: the mean budget, or predicted milliseconds."""

    kind: str  # "budget" | "latency"
    target: float  # mean theta, or total ms
    low: float
    high: float
    levels: int
    step_ms: tuple[float, ...] = ()  # latency: the cost model's ms per level

    def value(self, s: Schedule) -> float:
        if self.kind == "budget":
            return sum(s) / ((self.levels - 1) * len(s))
        return sum(self.step_ms[v] for v in s)

    def ok(self, s: Schedule) -> bool:
        return self.low * self.target <= self.value(s) <= self.high * self.target + 1e-12

    def check_feasible(self, steps: int) -> None:
        top = self.levels - 1
        lightest, heaviest = (top,) + (0,) * (steps - 1), (top,) * steps
        lo, hi = self.value(lightest), self.value(heaviest)
        if hi < self.low * self.target or lo > self.high * self.target:
            unit = "mean budget" if self.kind == "budget" else "ms"
            raise SearchError(f"target: {self.target:.4g} {unit} cannot be met with {steps} steps "
                              f"(possible: {lo:.4g} .. {hi:.4g}; the first step is dense)")


def repair(s: Schedule, c: Constraint, rng: np.random.Generator) -> Schedule:
    """Move random steps one level down while over the band [low, high] x target, up while
    under it (the first step stays dense): a move that lands inside the band if there is
    one, else one that does not jump over it. Raises when every move would jump over the
    band (it is narrower than one level's cost)."""
    x = list(s)
    x[0] = c.levels - 1
    lo, hi = c.low * c.target, c.high * c.target + 1e-12
    for _ in range(4 * len(x) * c.levels + 8):
        v = c.value(tuple(x))
        if lo <= v <= hi:
            return tuple(x)
        step = -1 if v > hi else 1
        moves = [(i, v + _delta(c, x[i], step, len(x))) for i in range(1, len(x)) if 0 <= x[i] + step < c.levels]
        landing = [i for i, w in moves if lo <= w <= hi]
        toward = [i for i, w in moves if (w > hi if step < 0 else w < lo)]
        pool = landing or toward
        if not pool:
            break
        x[pool[int(rng.integers(len(pool)))]] += step
    raise SearchError(f"repair cannot bring a schedule into [{c.low}, {c.high}] x the target {c.target:.4g}: "
                      "the band is narrower than one level's step; widen search.repair_low/high or use more levels")


def seed_schedules(c: Constraint, steps: int) -> list[Schedule]:
    """The hand-made schedules a search starts from, before repair, best guesses first: the
    uniform one (every step after the dense first at the level whose cost is nearest the
    target), then front-loaded ones (the first d steps dense, the rest at one lower level,
    d chosen to come nearest the target), by their tail level from the uniform level down
    and then up. With these in the first population the elitist search never ends worse
    than the best of them (a speed search that started from random schedules alone did)."""
    top = c.levels - 1

    def nearest(cands: list[Schedule]) -> Schedule:
        return min(cands, key=lambda s: abs(c.value(s) - c.target))

    uniform = nearest([(top,) + (lv,) * (steps - 1) for lv in range(c.levels)])
    u = uniform[-1]
    tails = [*range(min(u, top - 1), -1, -1), *range(u + 1, top)]  # every level under the top
    front = [nearest([(top,) * d + (lv,) * (steps - d) for d in range(1, steps + 1)]) for lv in tails]
    return list(dict.fromkeys([uniform, *front]))


def _delta(c: Constraint, level: int, step: int, steps: int) -> float:
    if c.kind == "budget":
        return step / ((c.levels - 1) * steps)
    return c.step_ms[level + step] - c.step_ms[level]


# ---- the evolutionary operators ---------------------------------------------------------

def random_schedule(steps: int, levels: int, rng: np.random.Generator) -> Schedule:
    return (levels - 1,) + tuple(int(v) for v in rng.integers(0, levels, steps - 1))


def crossover(a: Schedule, b: Schedule, rng: np.random.Generator) -> Schedule:
    """Uniform (each step from either parent) or block (a contiguous range from the second)."""
    if rng.random() < 0.5:
        take = rng.random(len(a)) < 0.5
        return tuple(bv if t else av for av, bv, t in zip(a, b, take))
    i, j = sorted(int(v) for v in rng.integers(1, len(a) + 1, 2))
    return a[:i] + b[i:j] + a[j:]


def mutate(s: Schedule, p: float, levels: int, rng: np.random.Generator) -> Schedule:
    hit = rng.random(len(s)) < p
    new = rng.integers(0, levels, len(s))
    return tuple(int(n) if h and i > 0 else v for i, (v, h, n) in enumerate(zip(s, hit, new)))


def mutation_rate(spec, generation: int) -> float:
    """Linear decay from mutation_start (generation 1) to mutation_end (the last)."""
    span = max(1, spec.generations - 1)
    return spec.mutation_start + (spec.mutation_end - spec.mutation_start) * min(1.0, (generation - 1) / span)


# ---- evaluation -------------------------------------------------------------------------

@dataclass
class Sample:
    name: str
    inputs: SampleInputs
    reference: torch.Tensor  # dense final latents (1, *latent_shape), float32, on the CPU
    peak: float  # the reference's dynamic range, the PSNR's peak


@dataclass
class Counters:
    candidates: int = 0  # distinct schedules evaluated (memo hits excluded)
    stopped: int = 0  # of those, stopped early
    steps: int = 0  # denoising steps executed
    transformer_calls: int = 0  # of those, with a budget above 0
    naive_steps: int = 0  # what evaluating every candidate on every sample from scratch costs
    seconds: float = 0.0

    def add(self, other: Counters) -> None:
        for k in vars(self):
            setattr(self, k, getattr(self, k) + getattr(other, k))


def lcp(a: Schedule, b: Schedule) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Evaluator:
    """Fitness of schedules: the rewritten programs sampled against the dense reference.

    With `batch_samples`, every calibration sample of a schedule runs in one batch (the
    programs must be captured at that batch: `batched_example`); the per-sample MSEs are those
    of separate runs up to float rounding, and early rejection cannot stop part of a batch."""

    def __init__(self, model, cfg: RunConfig, programs: dict[int, TokenwiseProgram], samples: list[Sample],
                 levels: int, tokens: int, prefix_cache_bytes: int, share_prefixes: bool = True,
                 batch_samples: bool = False):
        from .sampling import batch_inputs

        self.model, self.cfg, self.programs, self.samples = model, cfg, programs, samples
        self.levels, self.tokens = levels, tokens
        self.level_rows = level_tokens(levels, tokens)  # the rows each level computes: what build_programs built
        self.cache_bytes, self.share = prefix_cache_bytes, share_prefixes
        if batch_samples and len(samples) > 1:
            self.groups = [list(range(len(samples)))]
            inputs = [batch_inputs([s.inputs for s in samples])]
        else:
            self.groups = [[i] for i in range(len(samples))]
            inputs = [s.inputs for s in samples]
        self.samplers = [Sampler(model, cfg.video, cfg.sampling, x) for x in inputs]

    def budgets(self, s: Schedule) -> list[int]:
        return [self.level_rows[v] for v in s]

    def evaluate(self, batch: list[Schedule], threshold: float, counters: Counters,
                 order: list[int] | None = None, tick: Callable[[int], None] | None = None) -> dict[Schedule, list]:
        """Per-sample MSE of each schedule (in `order` of samples); a schedule whose partial
        mean reaches `threshold` stops, its list shorter than the samples."""
        order = list(range(len(self.samples))) if order is None else order
        where = {si: i for i, si in enumerate(order)}
        steps, n = self.cfg.sampling.steps, len(self.samples)
        batch = sorted(set(batch))
        got: dict[Schedule, dict[int, float]] = {s: {} for s in batch}
        alive = list(batch)
        for gi in sorted(range(len(self.groups)), key=lambda g: min(where[i] for i in self.groups[g])):
            for s, values in self._walk(alive, gi, counters, tick).items():
                got[s].update(zip(self.groups[gi], values))
            alive = [s for s in alive if sum(got[s].values()) / n < threshold]
        mse = {s: [v[si] for si in order if si in v] for s, v in got.items()}
        counters.candidates += len(batch)
        counters.stopped += sum(len(v) < n for v in mse.values())
        counters.naive_steps += len(batch) * n * steps
        return mse

    @torch.no_grad()
    def _walk(self, batch: list[Schedule], gi: int, counters: Counters, tick) -> dict[Schedule, list[float]]:
        """Depth-first over the sorted schedules' prefix trie for sample group `gi`."""
        group, sampler = self.groups[gi], self.samplers[gi]
        references = [self.samples[i].reference for i in group]
        steps = self.cfg.sampling.steps
        stack: list[tuple[int, object, tuple, int]] = []  # (depth, trajectory, transformer snapshot, bytes)
        held = 0
        out = {}
        prev: Schedule | None = None
        for j, s in enumerate(batch):
            if prev is not None:
                shared = lcp(prev, s)
                while stack and stack[-1][0] > shared:
                    held -= stack.pop()[3]
            runner = TokenwiseTransformer(self.programs, self.budgets(s))
            if stack:
                depth, traj, snap, _ = stack[-1]
                traj = traj.copy()
                runner.restore(snap)
            else:
                depth, traj = 0, sampler.start()
            # depths where a later schedule branches off this one's path (non-increasing)
            branch = set()
            for later in batch[j + 1:]:
                d = lcp(s, later) if self.share else 0
                if d <= depth:
                    break
                branch.add(d)
            for i in range(depth, steps):
                if i in branch:
                    snap = runner.snapshot()
                    size = runner.snapshot_bytes(snap) + traj.latents.numel() * traj.latents.element_size()
                    if held + size <= self.cache_bytes:
                        stack.append((i, traj.copy(), snap, size))
                        held += size
                sampler.advance(traj, runner)
                counters.steps += len(group)  # sample-steps: the naive count's unit
                counters.transformer_calls += runner.schedule[i] > 0
                if tick is not None:
                    tick(len(group))
            final = traj.latents.float().cpu()
            out[s] = [float(((final[j:j + 1] - ref) ** 2).mean()) for j, ref in enumerate(references)]
            prev = s
        return out


def batched_example(model, cfg: RunConfig, samples: list[Sample]) -> dict:
    """The transformer's first-step kwargs with every sample in one batch: what an Evaluator
    with `batch_samples` needs its programs captured at."""
    from .sampling import batch_inputs, first_step_kwargs

    return first_step_kwargs(model, cfg.video, cfg.sampling, batch_inputs([s.inputs for s in samples]))


def shard(batch: list[Schedule]) -> list[Schedule]:
    """This rank's contiguous share of the sorted batch (all of it without torch.distributed)."""
    import torch.distributed as dist

    batch = sorted(set(batch))
    world = _world()
    if world == 1:
        return batch
    rank = dist.get_rank()
    per = -(-len(batch) // world)
    return batch[rank * per:(rank + 1) * per]


def gather(results: dict, counters: Counters) -> tuple[dict, Counters]:
    import torch.distributed as dist

    if _world() == 1:
        return results, counters
    parts: list = [None] * _world()
    dist.all_gather_object(parts, (results, vars(counters)))
    merged, total = {}, Counters()
    for res, cnt in parts:
        merged.update(res)
        total.add(Counters(**cnt))
    return merged, total


# ---- the search -------------------------------------------------------------------------

@dataclass
class SearchState:
    generation: int  # generations completed (0: the initial population)
    rng: dict
    population: list[tuple[Schedule, float]]
    memo: dict[Schedule, list]  # per-sample MSE in sample order (shorter: stopped early)
    history: list[dict] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)
    sample_order: list[int] = field(default_factory=list)

    def to_json(self, key: str) -> dict:
        return {"version": STATE_VERSION, "key": key, "generation": self.generation, "rng": self.rng,
                "population": [[list(s), f] for s, f in self.population],
                "memo": {_encode(s): v for s, v in self.memo.items()}, "history": self.history,
                "counters": vars(self.counters), "sample_order": self.sample_order}

    @classmethod
    def from_json(cls, raw: dict, key: str) -> SearchState:
        if raw.get("version") != STATE_VERSION or raw.get("key") != key:
            raise SearchError("the search checkpoint belongs to another configuration; remove it or drop --resume")
        return cls(raw["generation"], raw["rng"], [(tuple(s), f) for s, f in raw["population"]],
                   {_decode(k): v for k, v in raw["memo"].items()}, raw["history"], Counters(**raw["counters"]),
                   raw["sample_order"])


def fitness_of(values: list, samples: int) -> float:
    return sum(values) / samples if len(values) == samples else math.inf


def _encode(s: Schedule) -> str:
    """A schedule as a JSON object key ("10,5,5,...")."""
    return ",".join(map(str, s))


def _decode(text: str) -> Schedule:
    return tuple(int(v) for v in text.split(","))


def ranking(st: SearchState, samples: int) -> list[tuple[float, Schedule]]:
    """Every evaluated schedule with its fitness, best first (stopped ones last, at inf)."""
    return sorted((fitness_of(v, samples), s) for s, v in st.memo.items())


class Search:
    def __init__(self, cfg: RunConfig, evaluator: Evaluator, constraint: Constraint, folder: Path, key: str,
                 early_stop: bool = True, predict_ms: Callable[[Schedule], float] | None = None):
        self.cfg, self.ev, self.c, self.folder, self.key = cfg, evaluator, constraint, folder, key
        self.spec = cfg.search
        self.early_stop, self.predict_ms = early_stop, predict_ms
        self.n = len(evaluator.samples)

    # one batch of schedules through the memo, the evaluator and the gather
    def _evaluate(self, st: SearchState, batch: list[Schedule], threshold: float, bar) -> None:
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

    def _select(self, st: SearchState, candidates: list[Schedule]) -> None:
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

    def _initial(self, rng: np.random.Generator) -> list[Schedule]:
        """The hand-made seeds (seed_schedules, repaired into the band; at most half the
        population, so that random schedules keep it diverse), then random repaired ones."""
        steps, levels = self.cfg.sampling.steps, self.spec.levels
        seeds = list(dict.fromkeys(repair(s, self.c, rng) for s in seed_schedules(self.c, steps)))
        pop = seeds[: max(1, self.spec.population // 2)]
        while len(pop) < self.spec.population * 4 and len(set(pop)) < self.spec.population:
            pop.append(repair(random_schedule(steps, levels, rng), self.c, rng))
        return list(dict.fromkeys(pop))[: self.spec.population]

    def _checkpoint(self, st: SearchState) -> None:
        if _is_main():
            write_json(self.folder / "state.json", st.to_json(self.key))

    def run(self, resume: bool = False, progress: bool = True) -> SearchState:
        self.folder.mkdir(parents=True, exist_ok=True)
        ckpt = self.folder / "state.json"
        steps, spec = self.cfg.sampling.steps, self.spec
        if resume and ckpt.is_file():
            import json

            st = SearchState.from_json(json.loads(ckpt.read_text()), self.key)
            rng = np.random.default_rng()
            rng.bit_generator.state = st.rng
            log.info("search: resuming after generation %d of %d", st.generation, spec.generations)
        else:
            rng = np.random.default_rng(spec.seed)
            st = None
        per_gen = spec.children * self.n * steps
        total = spec.population * self.n * steps + spec.generations * per_gen
        done = 0 if st is None else spec.population * self.n * steps + st.generation * per_gen
        bar = tqdm(total=total, initial=done, desc="budget search", unit="step", disable=not progress or not _is_main())
        try:
            if st is None:
                pop = self._initial(rng)
                st = SearchState(0, {}, [], {}, sample_order=list(range(self.n)))
                self._evaluate(st, pop, math.inf, bar)
                # hardest sample first (largest MSE over the initial population): earlier rejections
                means = [np.mean([st.memo[s][i] for s in pop]) for i in range(self.n)]
                order = sorted(range(self.n), key=lambda i: (-means[i], i))
                st.memo = {s: [v[i] for i in order] for s, v in st.memo.items()}
                st.sample_order = order
                self._select(st, pop)
                st.rng = rng.bit_generator.state
                self._record(st, len(pop))
                self._checkpoint(st)
            while st.generation < spec.generations:
                gen = st.generation + 1
                p = mutation_rate(spec, gen)
                children = []
                for _ in range(spec.children):
                    a, b = self._tournament(st, rng), self._tournament(st, rng)
                    child = mutate(crossover(a, b, rng), p, spec.levels, rng)
                    children.append(repair(child, self.c, rng))
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

    def _tournament(self, st: SearchState, rng: np.random.Generator) -> Schedule:
        i, j = (int(v) for v in rng.integers(0, len(st.population), 2))
        return st.population[min(i, j)][0]  # the population is sorted: the lower index is fitter

    def mean_psnr(self, s: Schedule, st: SearchState) -> float:
        values = st.memo[s]
        return float(np.mean([psnr(v, self.ev.samples[st.sample_order[i]].peak) for i, v in enumerate(values)]))

    # ---- outputs --------------------------------------------------------------------------
    def write_outputs(self, st: SearchState, extra: dict, rescored: Rescored | None = None) -> dict:
        """schedule.json, search.png and schedule.png. With a proxy (`rescored`), the schedule,
        its tokens, MSE and PSNR are the full video's, and the cost adds the re-scoring."""
        c = Counters(**vars(st.counters))
        if rescored is None:
            best, fit = st.population[0]
            n, tokens = self.ev.tokens, self.ev.budgets(best)
            named = [(self.ev.samples[st.sample_order[i]], v) for i, v in enumerate(st.memo[best])]
            proxy = None
        else:
            best, fit = rescored.chosen, fitness_of(rescored.mse[rescored.chosen], len(rescored.samples))
            n, tokens = rescored.full.tokens, rescored.full.budgets(best)
            named = list(zip(rescored.samples, rescored.mse[best]))
            c.add(rescored.counters)
            proxy = rescored.report(self, st)
        per_sample = {sample.name: {"mse": v, "psnr": psnr(v, sample.peak)} for sample, v in named}
        top = self.spec.levels - 1
        gpus = max(1, _world()) if self.ev.model.device.type == "cuda" else 0
        schedule = {
            "key": self.key, "levels": self.spec.levels, "tokens": n,
            "budget_per_step": [v / top for v in best], "tokens_per_step": tokens,
            "mean_budget": sum(best) / (top * len(best)), "constraint": {"kind": self.c.kind, "target": self.c.target,
                                                                         "value": self.c.value(best),
                                                                         "bounds": [self.c.low * self.c.target, self.c.high * self.c.target]},
            "mse": fit, "psnr": float(np.mean([p["psnr"] for p in per_sample.values()])), "per_sample": per_sample,
            "predicted_ms": None if self.predict_ms is None else self.predict_ms(best),
            "cost": {"generations": st.generation, "candidates_evaluated": c.candidates, "stopped_early": c.stopped,
                     "steps_executed": c.steps, "transformer_calls": c.transformer_calls,
                     "naive_steps": c.naive_steps, "wall_seconds": c.seconds, "gpus": gpus,
                     "gpu_hours": c.seconds * gpus / 3600},
            "proxy": proxy,
            **extra,
        }
        if _is_main():
            write_json(self.folder / "schedule.json", schedule)
            plot_search(st, self, self.folder / "search.png", proxy)
            plot_schedule(schedule, self.folder / "schedule.png")
        return schedule


# ---- a proxy video, validated and re-scored at the full video ---------------------------

@dataclass
class Rescored:
    """Candidates of a proxy search re-evaluated at the full video: the proxy's best
    `rescore` (the schedule chosen is the best of them there) and `validate` more spread over
    the proxy's ranking (with the best, the sample on which the proxy's ranking is checked)."""

    full: Evaluator  # at the full video
    top: list[Schedule]
    spread: list[Schedule]
    mse: dict[Schedule, list]  # per-sample MSE at the full video, in sample order
    counters: Counters

    @property
    def samples(self) -> list[Sample]:
        return self.full.samples

    @property
    def chosen(self) -> Schedule:
        n = len(self.samples)
        return min(self.top + self.spread, key=lambda s: (fitness_of(self.mse[s], n), s))

    def report(self, search: Search, st: SearchState) -> dict:
        from .metrics import spearman

        n, bound, video = len(self.samples), search.spec.proxy_min_spearman, list(search.spec.proxy_video)
        rows = []
        rank = {s: i for i, (_, s) in enumerate(ranking(st, search.n))}
        for s in self.top + self.spread:
            full = float(np.mean([psnr(v, x.peak) for x, v in zip(self.samples, self.mse[s])]))
            rows.append({"schedule": list(s), "proxy_rank": rank[s], "proxy_mse": fitness_of(st.memo[s], search.n),
                         "proxy_psnr": search.mean_psnr(s, st), "mse": fitness_of(self.mse[s], n), "psnr": full,
                         "role": "best" if s in self.top else "spread"})
        rho = spearman([r["proxy_mse"] for r in rows], [r["mse"] for r in rows]) if len(rows) > 2 else float("nan")
        valid = bool(rho >= bound)
        if not valid:
            log.warning("search: the proxy video %s does not rank schedules like the full video (Spearman %.2f < "
                        "search.proxy_min_spearman %.2f over %d candidates); the schedule is still the best of them at the "
                        "full video, but a search at the full video (search.proxy_video: []) may find a better one",
                        video, rho, bound, len(rows))
        return {"video": video, "tokens": search.ev.tokens, "samples_a_batch": len(search.ev.groups[0]),
                "rescored": len(rows), "spearman": rho,
                "valid": valid, "min_spearman": bound, "chosen_proxy_rank": rank[self.chosen],
                "rescore_steps": self.counters.steps, "rescore_seconds": self.counters.seconds,
                "search_seconds": st.counters.seconds, "candidates": rows}


def rescore(search: Search, st: SearchState, full: Evaluator, progress: bool = True, chunk: int = 4) -> Rescored:
    """Re-evaluate the proxy's best and a spread of its ranking at the full video, a few
    candidates at a time, each chunk written to <folder>/rescore.json (reused on a rerun)."""
    import json

    spec = search.spec
    ranked = [s for f, s in ranking(st, search.n) if math.isfinite(f)]
    top, rest = ranked[: spec.rescore], ranked[spec.rescore:]
    picks = sorted({int(round(i)) for i in np.linspace(0, len(rest) - 1, min(spec.validate, len(rest)))}) if rest else []
    spread = [rest[i] for i in picks]
    path = search.folder / "rescore.json"
    done: dict[Schedule, list] = {}
    counters = Counters()
    if path.is_file():
        raw = json.loads(path.read_text())
        if raw.get("key") == search.key:
            done = {_decode(k): v for k, v in raw["mse"].items()}
            counters = Counters(**raw["counters"])
    todo = sorted(s for s in top + spread if s not in done)
    steps = full.cfg.sampling.steps
    bar = tqdm(total=len(todo) * len(full.samples) * steps, desc="re-score at the full video", unit="step",
               disable=not progress or not _is_main())
    try:
        for i in range(0, len(todo), chunk):
            part, got = todo[i:i + chunk], Counters()
            t0 = time.perf_counter()
            results = full.evaluate(shard(part), math.inf, got, tick=bar.update)
            got.seconds = time.perf_counter() - t0
            results, got = gather(results, got)
            done.update(results)
            counters.add(got)
            if _is_main():
                write_json(path, {"key": search.key, "mse": {_encode(s): v for s, v in done.items()},
                                  "counters": vars(counters)})
    finally:
        bar.close()
    return Rescored(full, top, spread, {s: done[s] for s in top + spread}, counters)


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _is_main() -> bool:
    import torch.distributed as dist

    return _world() == 1 or dist.get_rank() == 0


def search_key(reference_key: str, cfg: RunConfig, constraint: Constraint, backend: str,
               cost_from: str | None = None) -> str:
    """cost_from: the key of the cost model read from search.cost_from (its times, wherever the file lies)."""
    from dataclasses import asdict

    settings = asdict(cfg.search)
    for exact in ("early_stop", "share_prefixes", "prefix_cache_gb", "proxy_min_spearman"):  # not the result
        settings.pop(exact)
    settings["cost_from"] = cost_from
    return stable_hash({"reference": reference_key, "search": settings, "selection": asdict(cfg.selection),
                        "backend": backend, "source": source_hash(),
                        "constraint": [constraint.kind, constraint.target, constraint.low, constraint.high,
                                       list(constraint.step_ms)]})


# ---- plots ------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_search(st: SearchState, search: Search, path: Path, proxy: dict | None = None) -> None:
    """Best and mean fitness per generation, and every fully evaluated schedule's
    quality against its cost (the front the search moves along); with a proxy, the
    re-scored candidates' PSNR at the full video against the proxy's."""
    plt = _plt()
    panels = 3 if proxy is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8), dpi=110)
    a, b = axes[0], axes[1]
    gens = [h["generation"] for h in st.history]
    a.plot(gens, [h["best_mse"] for h in st.history], "-o", ms=3, label="best")
    a.plot(gens, [h["mean_mse"] for h in st.history], "--", label="population mean")
    a.set_yscale("log")
    a.set_xlabel("generation")
    a.set_ylabel("MSE against dense")
    a.grid(alpha=0.3)
    a.legend()
    full = [(s, fitness_of(v, search.n)) for s, v in st.memo.items() if len(v) == search.n]
    xs = [search.c.value(s) for s, _ in full]
    ys = [search.mean_psnr(s, st) for s, _ in full]
    b.scatter(xs, ys, s=6, alpha=0.5, label="evaluated")
    best = st.population[0][0]
    b.scatter([search.c.value(best)], [search.mean_psnr(best, st)], s=40, c="red", label="chosen")
    b.axvspan(search.c.low * search.c.target, search.c.high * search.c.target, color="green", alpha=0.08, label="target band")
    b.set_xlabel("mean budget" if search.c.kind == "budget" else "predicted ms")
    b.set_ylabel("PSNR against dense (dB)" + (" at the proxy video" if proxy is not None else ""))
    b.grid(alpha=0.3)
    b.legend(fontsize=8)
    if proxy is not None:
        ax = axes[2]
        for role, colour in (("best", "tab:red"), ("spread", "tab:blue")):
            rows = [x for x in proxy["candidates"] if x["role"] == role]
            ax.scatter([x["proxy_psnr"] for x in rows], [x["psnr"] for x in rows], s=14, c=colour,
                       label="proxy's best" if role == "best" else "spread over its ranking")
        ax.set_xlabel(f"PSNR at the proxy video {'x'.join(map(str, proxy['video']))} (dB)")
        ax.set_ylabel("PSNR at the full video (dB)")
        ax.set_title(f"Spearman {proxy['spearman']:.2f} over {proxy['rescored']} candidates", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_schedule(schedule: dict, path: Path) -> None:
    plt = _plt()
    budgets = schedule["budget_per_step"]
    fig, ax = plt.subplots(figsize=(6, 3), dpi=110)
    ax.bar(range(len(budgets)), budgets, color="tab:blue")
    ax.axhline(schedule["mean_budget"], ls="--", color="grey", label=f"mean {schedule['mean_budget']:.2f}")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("budget k/N")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"searched schedule: PSNR {schedule['psnr']:.2f} dB against dense", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- the stage: programs, samples, constraint, search, outputs --------------------------

def budget_rows(budget: float, tokens: int) -> int:
    """The rows a step at `budget` computes: 0 skips the step, 1 is dense, at least one row
    otherwise (any grid: the level table below and schedules given as budgets agree)."""
    return 0 if budget == 0 else tokens if budget == 1 else max(1, round(budget * tokens))


def level_tokens(levels: int, tokens: int) -> list[int]:
    """Rows computed at each level: 0 for level 0 (the step is skipped), N at the top."""
    top = levels - 1
    return [budget_rows(v / top, tokens) for v in range(levels)]


def build_programs(model, cfg: RunConfig, tokens: list[int], progress: bool = True,
                   dump_root: Path | None = None, example: dict | None = None) -> dict[int, TokenwiseProgram]:
    """One rewritten program per distinct non-zero row count, from a single capture
    (`dump_root`: every pass's graphs under <dump_root>/k<k>-passes; `example`: capture
    at these transformer inputs instead of the first step's)."""
    from .capture import capture
    from .tokenwise import rewrite

    cap = capture(model, cfg, example)
    wanted = sorted({k for k in tokens if k > 0})
    return {k: rewrite(model, cfg, k, captured=cap, dump_dir=None if dump_root is None else dump_root / f"k{k}-passes")
            for k in tqdm(wanted, desc="rewrite", unit="budget", disable=not progress)}


def calibration_samples(model, cfg: RunConfig, reference, cache_dir: Path) -> list[Sample]:
    from .conditioning import encode_prompt
    from .reference import sample_name
    from .sampling import make_inputs

    s = cfg.sampling
    negative = encode_prompt(model, s.negative_prompt, cache_dir)
    samples = []
    for pi, prompt in enumerate(s.prompts):
        cond = encode_prompt(model, prompt, cache_dir)
        for seed in s.seeds:
            name = sample_name(pi, seed)
            ref = reference.latents[name].float()
            samples.append(Sample(name, make_inputs(model, cfg.video, s, cond, negative, seed), ref,
                                  float(ref.max() - ref.min())))
    return samples


def plan(cfg: RunConfig, model, reference, out_dir: Path, resume: bool = False, progress: bool = True,
         programs: dict[int, TokenwiseProgram] | None = None) -> dict:
    """Search the schedule for cfg.target (or reuse the finished search with the same key);
    returns schedule.json's content."""
    import json

    spec, target = cfg.search, cfg.target
    n = model.layout(cfg.video).video_tokens
    tokens = level_tokens(spec.levels, n)
    programs = programs or build_programs(model, cfg, tokens, progress)
    cost = measure_cost(cfg, model, programs, tokens, out_dir, progress)
    steps = cfg.sampling.steps
    if target.budget is not None:
        c = Constraint("budget", target.budget, spec.repair_low, spec.repair_high, spec.levels)
    elif target.speedup is not None:
        c = Constraint("latency", steps * cost.dense_ms / target.speedup, spec.repair_low, spec.repair_high,
                       spec.levels, tuple(cost.level_ms))
    else:
        raise SearchError("target: set target.budget (mean budget) or target.speedup for the search")
    c.check_feasible(steps)
    key = search_key(reference.key, cfg, c, "eager", cost.key if spec.cost_from else None)
    folder = out_dir / "search" / key
    done = folder / "schedule.json"
    if done.is_file() and not resume:
        log.info("search: reusing %s", done)
        return json.loads(done.read_text())
    if (folder / "state.json").is_file() and not resume:
        log.info("search: an unfinished search of this configuration exists; starting over (--resume continues it)")
    cache = int(spec.prefix_cache_gb * 2**30)
    samples = calibration_samples(model, cfg, reference, out_dir / "embeddings")
    full = Evaluator(model, cfg, programs, samples, spec.levels, n, cache, spec.share_prefixes)
    ev = full
    if spec.proxy_video:  # candidates evaluated at the smaller video, the best re-scored at the full one
        from . import reference as dense
        from .config import proxy_config

        small = proxy_config(cfg)
        small_ref = dense.run(small, model, out_dir, progress=progress)
        small_n = model.layout(small.video).video_tokens
        small_samples = calibration_samples(model, small, small_ref, out_dir / "embeddings")
        batched = spec.batch_samples and len(small_samples) > 1 and not model.family.stochastic(model.scheduler)
        example = batched_example(model, small, small_samples) if batched else None
        small_programs = build_programs(model, small, level_tokens(spec.levels, small_n), progress, example=example)
        ev = Evaluator(model, small, small_programs, small_samples, spec.levels, small_n, cache, spec.share_prefixes,
                       batch_samples=batched)
        log.info("search: candidates at the proxy video %s (%d tokens against %d%s); the best %d and %d more re-scored "
                 "at the full video", list(spec.proxy_video), small_n, n,
                 f", {len(small_samples)} samples a batch" if batched else "", spec.rescore, spec.validate)
    search = Search(cfg, ev, c, folder, key, early_stop=spec.early_stop, predict_ms=cost.schedule_ms)
    st = search.run(resume=resume, progress=progress)
    rescored = rescore(search, st, full, progress) if spec.proxy_video else None
    return search.write_outputs(st, {"device": cost.device, "dense_step_ms": cost.dense_ms, "dense_ms": steps * cost.dense_ms,
                                     "level_ms": cost.level_ms, "cost_model": cost.key, "cost_source": cost.source,
                                     "timesteps": [float(t) for t in full.samplers[0].timesteps.cpu()]}, rescored)


def measure_cost(cfg, model, programs, tokens, out_dir, progress):
    """The step-latency model: search.cost_from's measured engines, or measured here."""
    from .costmodel import from_bench, measure

    if cfg.search.cost_from:
        return from_bench(cfg.search.cost_from, cfg.search.levels, tokens)
    return measure(cfg, model, programs, tokens, out_dir / "costmodel", progress=progress)
