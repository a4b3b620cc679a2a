"""A proxy-video search's last stage: its candidates re-scored at the full video.

With `search.proxy_video`, the evolution evaluates candidates at a smaller video; the
proxy's best `search.rescore` candidates and `search.validate` more, spread over its
ranking, are then evaluated at the full video, with the hand-made schedules the search
started from (`seed`). The schedule chosen is the best of them there, so never worse than a
hand-made one. The proxy is trusted when its candidates' rank correlation with the full
fitness reaches `search.proxy_min_spearman` and a hand-made seed does not beat its picks at
the full video (a warning otherwise: a proxy that cannot see what a schedule costs the full
video can rank its own finalists consistently and still lead the search astray). Chunks of candidates are
written to <search folder>/rescore.json as they finish and reused on a rerun.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .fitness import Candidate, Counters, Evaluator, Sample, decode, encode, fitness_of, gather, is_main, shard
from .io import read_json, write_json
from .metrics import psnr, spearman
from .schema import SearchSpec

log = logging.getLogger("astraea")


@dataclass
class Rescored:
    """The proxy's best (`top`: the schedule chosen is the best of them at the full video),
    a `spread` over its ranking (with the best, where the proxy's ranking is checked) and the
    hand-made `seeds` the search started from (a floor under the choice)."""

    full: Evaluator  # at the full video
    top: list[Candidate]
    spread: list[Candidate]
    mse: dict[Candidate, list]  # per-sample MSE at the full video, in sample order
    counters: Counters
    seeds: list[Candidate] = dataclasses.field(default_factory=list)

    @property
    def candidates(self) -> list[Candidate]:
        return self.top + self.spread + self.seeds

    @property
    def samples(self) -> list[Sample]:
        return self.full.samples

    @property
    def chosen(self) -> Candidate:
        n = len(self.samples)
        return min(self.candidates, key=lambda s: (fitness_of(self.mse[s], n), s))

    def report(self, spec: SearchSpec, proxy: Evaluator, ranked: list[tuple[float, Candidate]],
               proxy_psnr: Callable[[Candidate], float], search_seconds: float) -> dict:
        """`ranked`: the proxy search's (fitness, candidate), best first; `proxy_psnr`: a
        candidate's mean PSNR at the proxy video."""
        n, bound, video = len(self.samples), spec.proxy_min_spearman, list(spec.proxy_video)
        rank = {s: i for i, (_, s) in enumerate(ranked)}
        proxy_fitness = {s: f for f, s in ranked}
        rows = []
        for s in self.candidates:
            full = float(np.mean([psnr(v, x.peak) for x, v in zip(self.samples, self.mse[s])]))
            rows.append({"schedule": list(s), "proxy_rank": rank[s], "proxy_mse": proxy_fitness[s],
                         "proxy_psnr": proxy_psnr(s), "mse": fitness_of(self.mse[s], n), "psnr": full,
                         "role": "best" if s in self.top else "spread" if s in self.spread else "seed"})
        rho = spearman([r["proxy_mse"] for r in rows], [r["mse"] for r in rows]) if len(rows) > 2 else float("nan")
        chosen = self.chosen
        seed_won = chosen in self.seeds
        valid = bool(rho >= bound) and not seed_won
        if seed_won:
            picked = min((r for r in rows if r["role"] != "seed"), key=lambda r: r["mse"])  # the proxy's best there
            log.warning("search: at the full video a hand-made seed (%.2f dB) beats every schedule the proxy video %s "
                        "chose (best %.2f dB): the proxy does not see what a schedule costs the full video; the "
                        "schedule is the seed, and a search at the full video (search.proxy_video: []) is the remedy",
                        rows[self.candidates.index(chosen)]["psnr"], video, picked["psnr"])
        elif not valid:
            log.warning("search: the proxy video %s does not rank schedules like the full video (Spearman %.2f < "
                        "search.proxy_min_spearman %.2f over %d candidates); the schedule is still the best of them at the "
                        "full video, but a search at the full video (search.proxy_video: []) may find a better one",
                        video, rho, bound, len(rows))
        return {"video": video, "tokens": proxy.tokens, "samples_a_batch": len(proxy.groups[0]),
                "rescored": len(rows), "spearman": rho,
                "valid": valid, "min_spearman": bound, "chosen_proxy_rank": rank[chosen], "seed_chosen": seed_won,
                "rescore_steps": self.counters.steps, "rescore_seconds": self.counters.seconds,
                "search_seconds": search_seconds, "candidates": rows}


def rescore(spec: SearchSpec, ranked: list[tuple[float, Candidate]], full: Evaluator, folder: Path, key: str,
            progress: bool = True, chunk: int = 4, seeds: list[Candidate] = ()) -> Rescored:
    """Re-evaluate the proxy's best, a spread of its ranking and the hand-made `seeds` (those
    the proxy evaluated) at the full video, a few candidates at a time, each chunk written to
    <folder>/rescore.json (reused on a rerun)."""
    finite = [s for f, s in ranked if math.isfinite(f)]
    top, rest = finite[: spec.rescore], finite[spec.rescore:]
    picks = sorted({int(round(i)) for i in np.linspace(0, len(rest) - 1, min(spec.validate, len(rest)))}) if rest else []
    spread = [rest[i] for i in picks]
    evaluated = set(finite)
    seeds = [s for s in dict.fromkeys(seeds) if s in evaluated and s not in top and s not in spread]
    path = folder / "rescore.json"
    done: dict[Candidate, list] = {}
    counters = Counters()
    if path.is_file():
        raw = read_json(path, "delete it to re-score the candidates again")
        if raw.get("key") == key:
            done = {decode(k): v for k, v in raw["mse"].items()}
            counters = Counters(**raw["counters"])
    wanted = top + spread + seeds
    todo = sorted(s for s in wanted if s not in done)
    steps = full.cfg.sampling.steps
    bar = tqdm(total=len(todo) * len(full.samples) * steps, desc="re-score at the full video", unit="step",
               disable=not progress or not is_main(), leave=False)
    try:
        for i in range(0, len(todo), chunk):
            part, got = todo[i:i + chunk], Counters()
            t0 = time.perf_counter()
            results = full.evaluate(shard(part), math.inf, got, tick=bar.update)
            got.seconds = time.perf_counter() - t0
            results, got = gather(results, got)
            done.update(results)
            counters.add(got)
            if is_main():
                write_json(path, {"key": key, "mse": {encode(s): v for s, v in done.items()}, "counters": vars(counters)})
    finally:
        bar.close()
    return Rescored(full, top, spread, {s: done[s] for s in wanted}, counters, seeds)
