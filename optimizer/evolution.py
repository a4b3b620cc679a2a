"""The evolution's parts (../shared/ASTRAEA.md section 3): the constraint a schedule must
meet (mean budget or predicted milliseconds) and its repair into the band, the hand-made
seed schedules, and the operators (random schedules, crossover, mutation and its decay).
search.py runs them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import AstraeaError
from .fitness import Candidate


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

    def value(self, s: Candidate) -> float:
        if self.kind == "budget":
            return sum(s) / ((self.levels - 1) * len(s))
        return sum(self.step_ms[v] for v in s)

    def ok(self, s: Candidate) -> bool:
        return self.low * self.target <= self.value(s) <= self.high * self.target + 1e-12

    def check_feasible(self, steps: int) -> None:
        top = self.levels - 1
        lightest, heaviest = (top,) + (0,) * (steps - 1), (top,) * steps
        lo, hi = self.value(lightest), self.value(heaviest)
        if hi < self.low * self.target or lo > self.high * self.target:
            unit = "mean budget" if self.kind == "budget" else "ms"
            raise SearchError(f"target: {self.target:.4g} {unit} cannot be met with {steps} steps "
                              f"(possible: {lo:.4g} .. {hi:.4g}; the first step is dense)")


def genes(steps: int, width: int = 1) -> list[range]:
    """The steps that share one budget level (a gene), after the dense first step: runs of
    `width` consecutive steps (the last may be shorter); width 1 is a level a step, the paper's."""
    return [range(i, min(i + width, steps)) for i in range(1, steps, width)]


def tie(s: Candidate, width: int) -> Candidate:
    """s with every gene at the level of its first step (the first step dense as it was)."""
    if width == 1:
        return tuple(s)
    x = list(s)
    for g in genes(len(s), width):
        for i in g:
            x[i] = s[g.start]
    return tuple(x)


def repair(s: Candidate, c: Constraint, rng: np.random.Generator, width: int = 1) -> Candidate:
    """Move random genes (steps, with width 1) one level down while over the band [low, high]
    x target, up while under it (the first step stays dense): a move that lands inside the
    band if there is one, else one that does not jump over it. Raises when every move would
    jump over the band (it is narrower than one gene's level step). `s` is tied (tie) first."""
    x = list(tie(s, width))
    x[0] = c.levels - 1
    units = genes(len(x), width)
    lo, hi = c.low * c.target, c.high * c.target + 1e-12
    for _ in range(4 * len(x) * c.levels + 8):
        v = c.value(tuple(x))
        if lo <= v <= hi:
            return tuple(x)
        step = -1 if v > hi else 1
        moves = [(u, v + sum(_delta(c, x[i], step, len(x)) for i in u)) for u in units
                 if 0 <= x[u.start] + step < c.levels]
        landing = [u for u, w in moves if lo <= w <= hi]
        toward = [u for u, w in moves if (w > hi if step < 0 else w < lo)]
        pool = landing or toward
        if not pool:
            break
        for i in pool[int(rng.integers(len(pool)))]:
            x[i] += step
    what = "level's" if width == 1 else f"{width}-step gene's level"
    raise SearchError(f"repair cannot bring a schedule into [{c.low}, {c.high}] x the target {c.target:.4g}: "
                      f"the band is narrower than one {what} step; widen search.repair_low/high, use more levels"
                      + ("" if width == 1 else " or a smaller search.gene_steps"))


def seed_schedules(c: Constraint, steps: int, width: int = 1) -> list[Candidate]:
    """The hand-made schedules a search starts from, before repair, best guesses first: the
    uniform one (every step after the dense first at the level whose cost is nearest the
    target), then front-loaded ones (the first d steps dense, the rest at one lower level,
    d chosen to come nearest the target), by their tail level from the uniform level down
    and then up. With these in the first population the elitist search never ends worse
    than the best of them (a speed search that started from random schedules alone did)."""
    top = c.levels - 1

    def nearest(cands: list[Candidate]) -> Candidate:
        return min(cands, key=lambda s: abs(c.value(s) - c.target))

    uniform = nearest([(top,) + (lv,) * (steps - 1) for lv in range(c.levels)])
    u = uniform[-1]
    tails = [*range(min(u, top - 1), -1, -1), *range(u + 1, top)]  # every level under the top
    prefixes = [1] + [g.stop for g in genes(steps, width)]  # dense prefixes that end at a gene's end
    front = [nearest([(top,) * d + (lv,) * (steps - d) for d in prefixes]) for lv in tails]
    return list(dict.fromkeys([uniform, *front]))


def _delta(c: Constraint, level: int, step: int, steps: int) -> float:
    if c.kind == "budget":
        return step / ((c.levels - 1) * steps)
    return c.step_ms[level + step] - c.step_ms[level]


# ---- the evolutionary operators ---------------------------------------------------------

# Each operator works gene by gene (`width` steps share a level; genes()) and keeps tied
# schedules tied; with width 1 it draws exactly the random numbers it always drew.

def _expand(first: int, levels_by_gene, steps: int, width: int) -> Candidate:
    x = [first] * steps
    for g, v in zip(genes(steps, width), levels_by_gene):
        for i in g:
            x[i] = int(v)
    return tuple(x)


def random_schedule(steps: int, levels: int, rng: np.random.Generator, width: int = 1) -> Candidate:
    if width == 1:
        return (levels - 1,) + tuple(int(v) for v in rng.integers(0, levels, steps - 1))
    return _expand(levels - 1, rng.integers(0, levels, len(genes(steps, width))), steps, width)


def crossover(a: Candidate, b: Candidate, rng: np.random.Generator, width: int = 1) -> Candidate:
    """Uniform (each gene from either parent) or block (a contiguous range of genes from the second)."""
    if width == 1:
        if rng.random() < 0.5:
            take = rng.random(len(a)) < 0.5
            return tuple(bv if t else av for av, bv, t in zip(a, b, take))
        i, j = sorted(int(v) for v in rng.integers(1, len(a) + 1, 2))
        return a[:i] + b[i:j] + a[j:]
    units = genes(len(a), width)
    if rng.random() < 0.5:
        take = rng.random(len(units)) < 0.5
    else:
        i, j = sorted(int(v) for v in rng.integers(0, len(units) + 1, 2))
        take = np.arange(len(units)) >= i
        take &= np.arange(len(units)) < j
    return _expand(a[0], [(b if t else a)[g.start] for g, t in zip(units, take)], len(a), width)


def mutate(s: Candidate, p: float, levels: int, rng: np.random.Generator, width: int = 1) -> Candidate:
    """Each gene (after the dense first step) redrawn at random with probability p."""
    if width == 1:
        hit = rng.random(len(s)) < p
        new = rng.integers(0, levels, len(s))
        return tuple(int(n) if h and i > 0 else v for i, (v, h, n) in enumerate(zip(s, hit, new)))
    units = genes(len(s), width)
    hit = rng.random(len(units)) < p
    new = rng.integers(0, levels, len(units))
    return _expand(s[0], [n if h else s[g.start] for g, h, n in zip(units, hit, new)], len(s), width)


def mutation_rate(spec, generation: int) -> float:
    """Linear decay from mutation_start (generation 1) to mutation_end (the last)."""
    span = max(1, spec.generations - 1)
    return spec.mutation_start + (spec.mutation_end - spec.mutation_start) * min(1.0, (generation - 1) / span)
