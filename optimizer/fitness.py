"""The search's fitness: schedules sampled with the rewritten programs against the dense reference.

A candidate is one budget level per denoising step (`Candidate`). Its fitness is the MSE of
the final latents against the stored dense reference, averaged over the calibration
samples (prompts x seeds), measured by running the rewritten programs (tokenwise.py) in
the shared sampling loop: what will be deployed. Exact savings, none of which changes a
fitness bit (tests check it):
- shared prefixes: a batch of candidates is evaluated in lexicographic order, a
  depth-first walk of their prefix trie; the sampling state (latents, scheduler, block
  caches) is copied at each depth where a later candidate branches off and restored for
  it, within a memory bound;
- early rejection: MSE >= 0, so once a candidate's partial sum over the samples evaluated
  so far reaches the threshold (the worst surviving fitness), it is stopped.
With torch.distributed initialised, `shard` gives each rank a contiguous share of a sorted
batch and `gather` merges the results.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .metrics import psnr
from .sampling import SampleInputs, Sampler, denoise
from .schedule import Choices, level_tokens
from .schema import RunConfig
from .tokenwise import TokenwiseProgram, TokenwiseTransformer, build_programs

log = logging.getLogger("astraea")
Candidate = tuple[int, ...]  # one budget level per step


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


def lcp(a: Candidate, b: Candidate) -> int:
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
                 batch_samples: bool = False, choices: Choices | None = None,
                 fp8_programs: dict[int, TokenwiseProgram] | None = None):
        """choices: what a gene's value means (default: level v in the model's dtype); with FP8
        choices, fp8_programs runs the steps they mark (the FP8 model's, the same row counts)."""
        from .sampling import batch_inputs

        self.model, self.cfg, self.programs, self.samples = model, cfg, programs, samples
        self.levels, self.tokens = levels, tokens
        self.choices = choices or Choices.budgets(levels)
        if self.choices.mixed and not fp8_programs:
            raise ValueError("FP8 choices need the FP8 model's programs")
        self.fp8_programs = fp8_programs
        self.level_rows = level_tokens(levels, tokens)  # the rows each level computes: what build_programs built
        self.cache_bytes, self.share = prefix_cache_bytes, share_prefixes
        if batch_samples and len(samples) > 1:
            self.groups = [list(range(len(samples)))]
            inputs = [batch_inputs([s.inputs for s in samples])]
        else:
            self.groups = [[i] for i in range(len(samples))]
            inputs = [s.inputs for s in samples]
        self.samplers = [Sampler(model, cfg.video, cfg.sampling, x) for x in inputs]

    def budgets(self, s: Candidate) -> list[int]:
        return [self.level_rows[self.choices.level(g)] for g in s]

    def runner(self, s: Candidate) -> TokenwiseTransformer:
        """The rewritten programs running schedule s (each step at its value's rows and precision)."""
        precisions = [self.choices.precision(g) for g in s] if self.choices.mixed else None
        return TokenwiseTransformer(self.programs, self.budgets(s), precisions, self.fp8_programs)

    def evaluate(self, batch: list[Candidate], threshold: float, counters: Counters,
                 order: list[int] | None = None, tick: Callable[[int], None] | None = None) -> dict[Candidate, list]:
        """Per-sample MSE of each schedule (in `order` of samples); a schedule whose partial
        mean reaches `threshold` stops, its list shorter than the samples."""
        order = list(range(len(self.samples))) if order is None else order
        where = {si: i for i, si in enumerate(order)}
        steps, n = self.cfg.sampling.steps, len(self.samples)
        batch = sorted(set(batch))
        got: dict[Candidate, dict[int, float]] = {s: {} for s in batch}
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
    def _walk(self, batch: list[Candidate], gi: int, counters: Counters, tick) -> dict[Candidate, list[float]]:
        """Depth-first over the sorted schedules' prefix trie for sample group `gi`."""
        group, sampler = self.groups[gi], self.samplers[gi]
        references = [self.samples[i].reference for i in group]
        steps = self.cfg.sampling.steps
        stack: list[tuple[int, object, tuple, int]] = []  # (depth, trajectory, transformer snapshot, bytes)
        held = 0
        out = {}
        prev: Candidate | None = None
        for j, s in enumerate(batch):
            if prev is not None:
                shared = lcp(prev, s)
                while stack and stack[-1][0] > shared:
                    held -= stack.pop()[3]
            runner = self.runner(s)
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


def shard(batch: list[Candidate]) -> list[Candidate]:
    """This rank's contiguous share of the sorted batch (all of it without torch.distributed)."""
    import torch.distributed as dist

    batch = sorted(set(batch))
    size = world()
    if size == 1:
        return batch
    rank = dist.get_rank()
    per = -(-len(batch) // size)
    return batch[rank * per:(rank + 1) * per]


def gather(results: dict, counters: Counters) -> tuple[dict, Counters]:
    import torch.distributed as dist

    if world() == 1:
        return results, counters
    parts: list = [None] * world()
    dist.all_gather_object(parts, (results, vars(counters)))
    merged, total = {}, Counters()
    for res, cnt in parts:
        merged.update(res)
        total.add(Counters(**cnt))
    return merged, total


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


@torch.no_grad()
def sample_psnrs(model, cfg: RunConfig, samples: list[Sample], make: Callable[[], Callable]) -> list[float]:
    """Each sample's PSNR of the final latents against its dense reference, sampled with a
    transformer from `make()` (one a sample: a token-wise one keeps its schedule's state)."""
    out = []
    for s in samples:
        got = denoise(model, cfg.video, cfg.sampling, s.inputs, make()).float().cpu()
        out.append(psnr(float(((got - s.reference) ** 2).mean()), s.peak))
    return out


def schedule_psnrs(model, cfg: RunConfig, samples: list[Sample], schedules) -> dict[str, list[float]]:
    """Each named schedule's PSNR per sample: `schedules` (name, Schedule) pairs sampled with the
    rewritten programs of cfg (built once for every row count they use)."""
    schedules = list(schedules)
    programs = build_programs(model, cfg, sorted({k for _, s in schedules for k in s.tokens if k}), progress=False)
    return {name: sample_psnrs(model, cfg, samples, lambda t=list(s.tokens): TokenwiseTransformer(programs, t))
            for name, s in schedules}


def fitness_of(values: list, samples: int) -> float:
    return sum(values) / samples if len(values) == samples else math.inf


def encode(s: Candidate) -> str:
    """A schedule as a JSON object key ("10,5,5,...")."""
    return ",".join(map(str, s))


def decode(text: str) -> Candidate:
    return tuple(int(v) for v in text.split(","))


def ranking(memo: dict[Candidate, list], samples: int) -> list[tuple[float, Candidate]]:
    """Every evaluated candidate with its fitness, best first (stopped ones last, at inf)."""
    return sorted((fitness_of(v, samples), s) for s, v in memo.items())



def world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    import torch.distributed as dist

    return world() == 1 or dist.get_rank() == 0


def holdout(cfg: RunConfig, model, programs, chosen: Candidate, out_dir: Path, search_psnr: float,
            progress: bool = True, choices: Choices | None = None, fp8_programs=None) -> dict:
    """The chosen schedule sampled on every (prompt, seed) pair of search.holdout_* that the
    search did not see, against their dense samples: PSNR per sample and the drop from the
    search's own samples."""
    from . import reference as dense

    s, spec = cfg.sampling, cfg.search
    prompts, seeds = tuple(s.prompts) + tuple(spec.holdout_prompts), (*s.seeds, *spec.holdout_seeds)
    # dense references of the unseen pairs only: every prompt with the new seeds, and the new
    # prompts (numbered after the search's) with its seeds
    groups = [(prompts, tuple(spec.holdout_seeds), 0), (tuple(spec.holdout_prompts), tuple(s.seeds), len(s.prompts))]
    samples = []
    for group_prompts, group_seeds, first in groups:
        if not group_prompts or not group_seeds:
            continue
        part = dataclasses.replace(cfg, sampling=dataclasses.replace(s, prompts=group_prompts, seeds=group_seeds))
        names = [dense.sample_name(first + i, seed) for i in range(len(group_prompts)) for seed in group_seeds]
        found = calibration_samples(model, part, dense.run(part, model, out_dir, progress=progress), out_dir / "embeddings")
        samples += [dataclasses.replace(x, name=name) for x, name in zip(found, names, strict=True)]
    n = model.layout(cfg.video).video_tokens
    ev = Evaluator(model, cfg, programs, samples, spec.levels, n, 0, False, choices=choices, fp8_programs=fp8_programs)
    mse = ev.evaluate([chosen], math.inf, Counters())[chosen]
    per_sample = {x.name: psnr(v, x.peak) for x, v in zip(samples, mse)}
    mean = float(np.mean(list(per_sample.values())))
    log.info("search: on %d held-out samples %.2f dB (%.2f dB on the search's own)", len(samples), mean, search_psnr)
    return {"prompts": list(prompts), "seeds": list(seeds), "psnr": mean,
            "per_sample": per_sample, "search_psnr": search_psnr, "drop_db": search_psnr - mean}
