"""The budget search: repair, exact savings (shared prefixes, early rejection), determinism,
resume, and on the bundled reference model a searched schedule that beats uniform."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from astraea import config, loader, reference
from astraea.evolution import crossover, genes, tie
from astraea.fitness import Counters, Evaluator, batched_example, calibration_samples
from astraea.schedule import Schedule, level_tokens, read_schedules
from astraea.search import (
    Constraint,
    Search,
    SearchError,
    mutate,
    plan,
    random_schedule,
    repair,
    search_key,
    seed_schedules,
)
from astraea.tokenwise import TokenwiseTransformer, build_programs, compiled
from conftest import bench_report, interrupt_search_after, tiny_config, tiny_raw

ROOT = Path(__file__).resolve().parents[1]

LEVELS, STEPS = 5, 6


def _tiny_search_model():
    """The tiny Wan model with two samples, a 50% target, and its programs at every level."""
    cfg = tiny_config("wan", "tiny", sampling={"steps": STEPS, "seeds": [0, 1]},
                      search={"levels": LEVELS, "population": 6, "children": 5, "generations": 3})
    cfg = dataclasses.replace(cfg, target=config.TargetSpec(budget=0.5))
    model = loader.load_model(cfg)
    n = model.layout(cfg.video).video_tokens
    return cfg, model, n, build_programs(model, cfg, level_tokens(LEVELS, n), progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    cfg, model, n, programs = _tiny_search_model()
    ref = reference.run(cfg, model, out, progress=False)
    samples = calibration_samples(model, cfg, ref, out / "embeddings")
    return cfg, model, n, programs, samples, out


def _evaluator(tiny, share=True, cache_bytes=2**30):
    cfg, model, n, programs, samples, _ = tiny
    return Evaluator(model, cfg, programs, samples, LEVELS, n, cache_bytes, share)


def _search(tiny, folder, early_stop=True, share=True, **spec):
    cfg = tiny[0]
    cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, **spec))
    c = Constraint("budget", 0.5, cfg.search.repair_low, cfg.search.repair_high, LEVELS)
    ev = _evaluator(tiny, share)
    ev.cfg = cfg
    return Search(cfg, ev, c, folder, "k", early_stop=early_stop)


@pytest.mark.parametrize("kind", ["budget", "latency"])
def test_repair_always_meets_the_constraint(kind):
    rng = np.random.default_rng(0)
    solved = 0
    for trial in range(300):
        steps, levels = int(rng.integers(3, 40)), int(rng.integers(3, 12))
        ms = tuple(np.cumsum(rng.uniform(0.5, 2.0, levels)).tolist())
        lo, hi = sorted(rng.uniform(0.8, 1.2, 2))
        hi = max(hi, lo + 0.1)
        if kind == "budget":
            c = Constraint("budget", float(rng.uniform(0.15, 0.9)), lo, hi, levels)
        else:
            c = Constraint("latency", float(rng.uniform(0.3, 0.9)) * steps * ms[-1], lo, hi, levels, ms)
        try:
            c.check_feasible(steps)
        except SearchError:
            continue
        try:
            fixed = repair(random_schedule(steps, levels, rng), c, rng)
        except SearchError:
            # only where one level's cost is wider than the band: then no schedule at all
            # may be reachable, which the budget kind lets us check exhaustively
            widest = 1 / ((levels - 1) * steps) if kind == "budget" else max(np.diff(ms))
            assert widest > (hi - lo) * c.target, (trial, c)
            if kind == "budget":
                grid = [(levels - 1 + j) / ((levels - 1) * steps) for j in range((levels - 1) * (steps - 1) + 1)]
                assert not any(lo * c.target <= g <= hi * c.target for g in grid), (trial, c)
            continue
        assert c.ok(fixed) and fixed[0] == levels - 1 and len(fixed) == steps, (trial, fixed, c)
        solved += 1
    assert solved > 200


@pytest.mark.parametrize("kind", ["budget", "latency"])
def test_seed_schedules_are_uniform_then_front_loaded(kind):
    """Worked by hand (12 steps, 6 levels, a 45% target): the uniform schedule nearest the
    target, then for each tail level (from the uniform one down, then up) the dense prefix
    that comes nearest it."""
    steps, top = 12, 5
    if kind == "budget":  # value = (5 d + tail (12 - d)) / 60
        c = Constraint("budget", 0.45, 0.9, 1.0, top + 1)
        want = [(5,) + (2,) * 11, (5,) * 4 + (1,) * 8, (5,) * 5 + (0,) * 7, (5,) + (3,) * 11, (5,) + (4,) * 11]
    else:  # 59.4 ms: uniform 2 = 66 ms; tail 1: 8 d + 36 -> d = 3; tail 0: 10.5 d + 6 -> d = 5
        ms = (0.5, 3.0, 5.0, 7.5, 9.0, 11.0)
        c = Constraint("latency", 0.45 * steps * ms[-1], 0.9, 1.0, top + 1, ms)
        want = [(5,) + (2,) * 11, (5,) * 3 + (1,) * 9, (5,) * 5 + (0,) * 7, (5,) + (3,) * 11, (5,) + (4,) * 11]
    assert seed_schedules(c, steps) == want


def _paper_operators(s, a, b, p, levels, rng):
    """The paper's per-step operators written out (a level a step): mutate(crossover(a, b)), then s's random schedule."""
    if rng.random() < 0.5:
        take = rng.random(len(a)) < 0.5
        child = [bv if t else av for av, bv, t in zip(a, b, take)]
    else:
        i, j = sorted(int(v) for v in rng.integers(1, len(a) + 1, 2))
        child = list(a[:i] + b[i:j] + a[j:])
    hit, new = rng.random(len(child)) < p, rng.integers(0, levels, len(child))
    child = [int(n) if h and i > 0 else v for i, (v, h, n) in enumerate(zip(child, hit, new))]
    return tuple(child), (levels - 1,) + tuple(int(v) for v in rng.integers(0, levels, len(s) - 1))


@pytest.mark.parametrize("width", [1, 2, 3, 5])
def test_genes_of_several_steps_stay_tied_through_every_operator(width):
    """search.gene_steps: random schedules, crossover, mutation and repair keep every gene's
    steps at one level (the first step dense and alone), repair still meets the band, and
    width 1 draws what the paper's per-step operators draw, number for number."""
    rng = np.random.default_rng(width)
    failed = 0
    for trial in range(200):
        steps, levels = int(rng.integers(4, 40)), int(rng.integers(3, 8))
        c = Constraint("budget", float(rng.uniform(0.3, 0.8)), 0.85, 1.1, levels)
        a, b = random_schedule(steps, levels, rng, width), random_schedule(steps, levels, rng, width)
        if width == 1:
            state = rng.bit_generator.state
            want = _paper_operators(a, a, b, 0.3, levels, rng)
            rng.bit_generator.state = state
        child = mutate(crossover(a, b, rng, width), 0.3, levels, rng, width)
        fresh = random_schedule(steps, levels, rng, width)
        if width == 1:
            assert (child, fresh) == want, trial
        for s in (a, b, child, fresh):
            assert tie(s, width) == s and s[0] == levels - 1 and len(s) == steps, (trial, s)
            assert all(len({s[i] for i in g}) == 1 for g in genes(steps, width))
        assert all(v in (a[i], b[i]) for i, v in enumerate(crossover(a, b, rng, width)))
        try:
            fixed = repair(child, c, rng, width)
        except SearchError:  # only where one gene's level step is wider than the band
            widest = max(len(g) for g in genes(steps, width)) / ((levels - 1) * steps)
            assert widest > (c.high - c.low) * c.target, trial
            failed += 1
            continue
        assert c.ok(fixed) and tie(fixed, width) == fixed, (trial, fixed)
    assert failed < 40


def test_tied_seed_schedules_end_their_dense_prefix_at_a_gene_end():
    """Worked by hand: 12 steps, 6 levels, 45%, genes of 4 steps (1-4, 5-8, 9-11): dense
    prefixes of 1, 5, 9 or 12 steps only (value = (5 d + tail (12 - d)) / 60)."""
    c = Constraint("budget", 0.45, 0.9, 1.0, 6)
    want = [(5,) + (2,) * 11, (5,) * 5 + (1,) * 7, (5,) * 5 + (0,) * 7, (5,) + (3,) * 11, (5,) + (4,) * 11]
    assert seed_schedules(c, 12, 4) == want
    assert genes(12, 4) == [range(1, 5), range(5, 9), range(9, 12)]


def test_a_search_of_tied_genes_evaluates_only_tied_schedules(tiny, tmp_path):
    """gene_steps 2 on 6 steps (genes 1-2, 3-4, 5): every candidate evaluated is tied, the
    chosen one meets the band, and the setting enters the search key only when not 1."""
    st = _search(tiny, tmp_path, gene_steps=2).run(progress=False)
    assert st.memo and all(tie(s, 2) == s for s in st.memo)
    c = Constraint("budget", 0.5, tiny[0].search.repair_low, tiny[0].search.repair_high, LEVELS)
    assert c.ok(st.population[0][0])
    cfg = tiny[0]
    tied = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, gene_steps=2))
    assert search_key("r", tied, c, "eager") != search_key("r", cfg, c, "eager")


def test_a_search_never_ends_worse_than_its_hand_made_seeds(tiny, tmp_path):
    """A speed (latency) search: the first hand-made seeds (half the population) that are
    inside the band are in its first population, and its best is at least as good as each of them, measured
    again by an evaluator of its own."""
    cfg = tiny[0]
    cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, population=6, children=4, generations=2))
    ms = (0.5, 3.0, 5.0, 7.5, 10.0)
    c = Constraint("latency", 0.5 * STEPS * ms[-1], 0.8, 1.2, LEVELS, ms)
    ev = _evaluator(tiny)
    ev.cfg = cfg
    search = Search(cfg, ev, c, tmp_path, "k")
    st = search.run(progress=False)
    seeds = [s for s in seed_schedules(c, STEPS)[: cfg.search.population // 2] if c.ok(s)]
    assert len(seeds) >= 2  # in the band, so repair leaves them as they are
    assert all(s in st.memo for s in seeds)
    # hand_made() replays the first population's seeds, repaired, without its generator (the proxy's re-scoring)
    replayed = search.hand_made()
    assert set(seeds) <= set(replayed) <= set(st.memo)
    assert replayed == search._initial(np.random.default_rng(cfg.search.seed))[: len(replayed)]
    own = _evaluator(tiny, share=False).evaluate(seeds, math.inf, Counters())
    best = st.population[0][1]
    for s in seeds:
        assert best <= sum(own[s]) / len(own[s]) * (1 + 1e-9), s


def test_an_unreachable_target_is_named():
    c = Constraint("budget", 0.05, 0.9, 1.1, 11)
    with pytest.raises(SearchError, match="cannot be met with 4 steps"):
        c.check_feasible(4)  # the dense first step alone is 0.25


def test_shared_prefixes_give_identical_fitness_in_fewer_steps(tiny):
    rng = np.random.default_rng(1)
    c = Constraint("budget", 0.5, 0.8, 1.2, LEVELS)
    base = repair(random_schedule(STEPS, LEVELS, rng), c, rng)
    batch = [repair(mutate(base, 0.3, LEVELS, rng), c, rng) for _ in range(10)]
    shared, naive = Counters(), Counters()
    got = _evaluator(tiny, share=True).evaluate(batch, math.inf, shared)
    want = _evaluator(tiny, share=False).evaluate(batch, math.inf, naive)
    assert got == want  # bit-identical MSE for every schedule and sample
    assert shared.steps < naive.steps == naive.naive_steps
    # a memory bound too small for one snapshot falls back to recomputing, same numbers
    tight = Counters()
    assert _evaluator(tiny, share=True, cache_bytes=1).evaluate(batch, math.inf, tight) == want
    assert tight.steps == naive.steps


def test_early_rejection_and_prefixes_leave_the_search_path_unchanged(tiny, tmp_path):
    fast = _search(tiny, tmp_path / "fast").run(progress=False)
    slow = _search(tiny, tmp_path / "slow", early_stop=False, share=False).run(progress=False)
    assert fast.population == slow.population
    assert fast.counters.steps < slow.counters.steps
    assert fast.counters.candidates == slow.counters.candidates


def test_same_seed_same_schedule_and_resume_is_identical(tiny, tmp_path, monkeypatch):
    full = _search(tiny, tmp_path / "a").run(progress=False)
    assert _search(tiny, tmp_path / "b").run(progress=False).population == full.population
    other_seed = _search(tiny, tmp_path / "c", seed=7).run(progress=False)
    assert other_seed.population != full.population

    interrupted = _search(tiny, tmp_path / "d")
    interrupt_search_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run(progress=False)
    monkeypatch.undo()
    resumed = _search(tiny, tmp_path / "d").run(resume=True, progress=False)
    assert resumed.generation == full.generation and resumed.population == full.population
    assert resumed.history[-1]["best_mse"] == full.history[-1]["best_mse"]


def test_a_checkpoint_of_another_search_is_refused(tiny, tmp_path):
    _search(tiny, tmp_path, generations=1).run(progress=False)
    other = _search(tiny, tmp_path, generations=1)
    other.key = "another"
    with pytest.raises(SearchError, match="another configuration"):
        other.run(resume=True, progress=False)


def test_plan_writes_the_schedule_and_reuses_it(tiny):
    cfg, model, n, programs, _, out = tiny
    ref = reference.run(cfg, model, out, progress=False)
    first = plan(cfg, model, ref, out, progress=False, programs=programs).to_json()
    assert len(first["budget_per_step"]) == STEPS and first["budget_per_step"][0] == 1.0
    lo, hi = first["constraint"]["bounds"]
    assert lo <= first["mean_budget"] <= hi
    folder = out / "search" / first["key"]
    assert {p.name for p in folder.iterdir()} >= {"schedule.json", "state.json", "search.png", "schedule.png"}
    assert first["cost"]["steps_executed"] <= first["cost"]["naive_steps"]
    assert set(first["per_sample"]) == {"p0_s0", "p0_s1"}
    assert first["predicted_ms"] > 0 and len(first["level_ms"]) == LEVELS
    again = plan(cfg, model, ref, out, progress=False, programs=programs).to_json()
    assert again == first


def test_holdout_reports_the_schedule_on_prompts_and_seeds_the_search_never_saw(tiny, tmp_path):
    """search.holdout_prompts / holdout_seeds: every unseen (prompt, seed) pair sampled with
    the chosen schedule afterwards, its PSNR equal to an independent run against dense, and
    written into schedule.json; a held-out prompt or seed that the search sees is refused."""
    from astraea.metrics import psnr
    from astraea.sampling import denoise, prompt_inputs
    from astraea.schedule import Schedule
    from astraea.tokenwise import TokenwiseTransformer

    cfg, model, n, programs, _, _ = tiny
    cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, holdout_prompts=("an unseen prompt",),
                                                              holdout_seeds=(7,)))
    ref = reference.run(cfg, model, tmp_path, progress=False)
    got = plan(cfg, model, ref, tmp_path, progress=False, programs=programs)
    h = got.search.holdout
    assert set(h["per_sample"]) == {"p0_s7", "p1_s0", "p1_s1", "p1_s7"}
    inputs = prompt_inputs(model, cfg.video, cfg.sampling, "an unseen prompt", 7)
    dense = denoise(model, cfg.video, cfg.sampling, inputs).float()
    mine = denoise(model, cfg.video, cfg.sampling, inputs, TokenwiseTransformer(programs, list(got.tokens))).float()
    want = psnr(float(((mine - dense) ** 2).mean()), float(dense.max() - dense.min()))
    assert h["per_sample"]["p1_s7"] == pytest.approx(want, abs=1e-4)
    assert h["drop_db"] == pytest.approx(h["search_psnr"] - h["psnr"]) and h["search_psnr"] == got.quality.psnr
    assert Schedule.read(tmp_path / "search" / got.key / "schedule.json").search.holdout == h
    with pytest.raises(config.ConfigError, match="search.holdout_seeds: must not repeat sampling's"):
        tiny_config("wan", "tiny", sampling={"seeds": [0, 1]}, search={"holdout_seeds": [1]})


def test_searched_schedule_beats_uniform_on_the_bundled_model(tmp_path):
    """A regression test with a margin: a small search (8 candidates, seeded with the uniform
    and front-loaded schedules) at a 50% mean budget, never above it, beats the uniform
    schedule (every step after the dense first at 50%: a 56% mean) in PSNR."""

    cfg = config.bundled_config(["a red circle moving left over a striped background"], steps=8)
    cfg = dataclasses.replace(cfg, target=config.TargetSpec(budget=0.5), search=config.SearchSpec(
        population=4, children=2, generations=2, repair_high=1.0, levels=11), bench=config.BenchSpec(warmup=0, repeats=1))
    model = loader.load_model(cfg)
    ref = reference.run(cfg, model, tmp_path, progress=False)
    n = model.layout(cfg.video).video_tokens
    programs = build_programs(model, cfg, level_tokens(11, n), progress=False)
    result = plan(cfg, model, ref, tmp_path, progress=False, programs=programs).to_json()
    assert result["mean_budget"] <= 0.5 + 1e-9
    samples = calibration_samples(model, cfg, ref, tmp_path / "embeddings")
    ev = Evaluator(model, cfg, programs, samples, 11, n, 0)
    uniform = (10,) + (5,) * 7  # mean 0.5625 >= the searched schedule's
    mse = ev.evaluate([uniform], math.inf, Counters())[uniform][0]
    uniform_psnr = 10 * math.log10(samples[0].peak ** 2 / mse)
    assert result["psnr"] > uniform_psnr + 0.5, (result["psnr"], uniform_psnr)  # measured: +0.75 dB
    assert torch.isfinite(torch.tensor(result["psnr"]))


def _distributed_worker(rank: int, world: int, init: str, folder: str, results: str):
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        cfg, model, n, programs = _tiny_search_model()
        from pathlib import Path

        out = Path(folder)
        ref = reference.run(cfg, model, out, progress=False)  # computed by the parent: reused
        samples = calibration_samples(model, cfg, ref, out / "embeddings")
        c = Constraint("budget", 0.5, cfg.search.repair_low, cfg.search.repair_high, LEVELS)
        ev = Evaluator(model, cfg, programs, samples, LEVELS, n, 2**30, True)
        st = Search(cfg, ev, c, out / f"dist{rank}", "k").run(progress=False)
        Path(results, f"rank{rank}.json").write_text(json.dumps({
            "population": [[list(s), f] for s, f in st.population], "candidates": st.counters.candidates}))
    finally:
        dist.destroy_process_group()


def test_two_processes_share_the_work_and_agree(tiny, tmp_path):
    """torch.distributed (gloo, 2 CPU processes): every rank ends with the in-process result."""
    import json

    import torch.multiprocessing as mp

    cfg, model, n, programs, samples, out = tiny
    local = _search(tiny, tmp_path / "local").run(progress=False)
    mp.spawn(_distributed_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(out), str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [(tuple(s), f) for s, f in got["population"]] == local.population
        assert got["candidates"] == local.counters.candidates  # summed over ranks: each did a share


def test_spearman_against_its_definition():
    from astraea.metrics import spearman

    rng = np.random.default_rng(0)
    for n in (3, 7, 40):
        x, y = rng.normal(size=n), rng.normal(size=n)
        rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
        want = 1 - 6 * float(((rx - ry) ** 2).sum()) / (n * (n * n - 1))  # no ties: the closed form
        assert spearman(x, y) == pytest.approx(want, abs=1e-12)
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0)  # ties on both sides, same order
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_a_proxy_search_is_rescored_and_chosen_at_the_full_video(tiny, tmp_path):
    """search.proxy_video: candidates are evaluated at a smaller video; the best and a spread
    of the ranking are re-evaluated at the full video, and the schedule chosen and every
    number reported for it are the full video's (checked against an independent evaluation)."""
    cfg, model, n, programs, samples, out = tiny
    cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, proxy_video=(5, 16, 32), rescore=3, validate=3,
                                                              generations=1))
    ref = reference.run(cfg, model, out, progress=False)
    result = plan(cfg, model, ref, tmp_path, progress=False, programs=programs).to_json()
    proxy = result["proxy"]
    assert proxy["video"] == [5, 16, 32] and proxy["tokens"] < n == result["tokens"]
    assert proxy["samples_a_batch"] == len(samples) == 2  # search.batch_samples: both seeds in one batch
    roles = [r["role"] for r in proxy["candidates"]]
    assert roles.count("best") == roles.count("spread") == 3 and proxy["rescored"] == len(roles)
    assert [r["proxy_rank"] for r in proxy["candidates"] if r["role"] == "best"] == [0, 1, 2]
    # the hand-made schedules the search started from are re-scored too, as a floor: as its first
    # population held them, repaired into the band (here the uniform one is over it and repaired)
    c = Constraint("budget", cfg.target.budget, cfg.search.repair_low, cfg.search.repair_high, LEVELS)
    rng = np.random.default_rng(cfg.search.seed)
    hand = list(dict.fromkeys(seed_schedules(c, cfg.sampling.steps)))[: max(1, cfg.search.population // 2)]
    started = [repair(s, c, rng) for s in hand]
    assert not c.ok(hand[0]) and c.ok(started[0]) and started[0] != hand[0]
    rescored = {tuple(r["schedule"]) for r in proxy["candidates"]}
    assert set(started) <= rescored
    assert {tuple(r["schedule"]) for r in proxy["candidates"] if r["role"] == "seed"} <= set(started)
    chosen = tuple(round(b * (LEVELS - 1)) for b in result["budget_per_step"])
    assert result["mse"] == min(r["mse"] for r in proxy["candidates"])
    assert list(chosen) == min(proxy["candidates"], key=lambda r: r["mse"])["schedule"]
    want = _evaluator(tiny, share=False).evaluate([chosen], math.inf, Counters())[chosen]
    assert [result["per_sample"][s.name]["mse"] for s in samples] == want
    assert result["tokens_per_step"] == [level_tokens(LEVELS, n)[v] for v in chosen]
    lo, hi = result["constraint"]["bounds"]
    assert lo <= result["mean_budget"] <= hi
    # the proxy really is another video: its fitness differs from the full one
    assert any(r["proxy_mse"] != r["mse"] for r in proxy["candidates"])
    assert -1 <= proxy["spearman"] <= 1
    assert 0 < proxy["rescore_steps"] <= 6 * len(samples) * STEPS
    assert result["cost"]["steps_executed"] > proxy["rescore_steps"]
    folder = tmp_path / "search" / result["key"]
    assert (folder / "rescore.json").is_file()
    import logging

    from astraea.cli import _search_line
    from astraea.schedule import Schedule

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log = logging.getLogger("astraea")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        _search_line(Schedule.from_json(result), tmp_path)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert any(m.startswith("proxy 5x16x32: 6 candidates re-scored") and "Spearman" in m for m in seen), seen
    # a resumed run reuses the re-scored candidates: the same result, no more full-video steps
    (folder / "schedule.json").unlink()
    again = plan(cfg, model, ref, tmp_path, resume=True, progress=False, programs=programs).to_json()
    assert again["proxy"]["rescore_steps"] == proxy["rescore_steps"]
    assert again["budget_per_step"] == result["budget_per_step"] and again["mse"] == result["mse"]



def test_a_refined_proxy_search_evolves_on_at_the_full_video(tiny, tmp_path):
    """search.refine_generations: after the proxy's re-scoring, generations at the full video
    from the re-scored candidates. The proxy stage is the unrefined search's (reused, not run
    again), the result can only improve on the re-scored choice, and the chosen schedule's
    numbers match an independent full-video evaluation."""
    cfg, model, n, programs, samples, out = tiny
    proxy_spec = dataclasses.replace(cfg.search, proxy_video=(5, 16, 32), rescore=2, validate=2, generations=1)
    plain = dataclasses.replace(cfg, search=proxy_spec)
    ref = reference.run(cfg, model, out, progress=False)
    first = plan(plain, model, ref, tmp_path, progress=False, programs=programs).to_json()
    stage = tmp_path / "search" / first["key"]
    state_before = (stage / "state.json").read_bytes()
    refined_cfg = dataclasses.replace(cfg, search=dataclasses.replace(proxy_spec, refine_generations=2, refine_children=3))
    result = plan(refined_cfg, model, ref, tmp_path, progress=False, programs=programs).to_json()
    assert result["key"] != first["key"]
    assert (stage / "state.json").read_bytes() == state_before  # the proxy stage reused as it was
    folder = tmp_path / "search" / result["key"]
    assert (stage / "refine-3.json").is_file() and not (folder / "state.json").exists()
    f = result["proxy"]["refine"]
    assert f["parents"] == first["proxy"]["rescored"] >= 4  # the proxy's 2 best, 2 spread, the hand-made seeds
    assert f["generations"] == 2 and f["children"] == 3 and 0 < f["candidates"] <= 6
    assert f["start_psnr"] == pytest.approx(first["psnr"])
    assert f["psnr"] == pytest.approx(result["psnr"]) and result["mse"] <= first["mse"]
    chosen = tuple(round(b * (LEVELS - 1)) for b in result["budget_per_step"])
    want = _evaluator(tiny, share=False).evaluate([chosen], math.inf, Counters())[chosen]
    assert [result["per_sample"][s.name]["mse"] for s in samples] == want
    lo, hi = result["constraint"]["bounds"]
    assert lo <= result["mean_budget"] <= hi
    assert result["cost"]["candidates_evaluated"] == first["cost"]["candidates_evaluated"] + f["candidates"]
    # more generations continue the refinement's checkpoint, to what one longer run gives
    longer_cfg = dataclasses.replace(cfg, search=dataclasses.replace(refined_cfg.search, refine_generations=3))
    longer = plan(longer_cfg, model, ref, tmp_path, progress=False, programs=programs).to_json()
    assert longer["proxy"]["refine"]["history"][:3] == f["history"]
    straight_dir = tmp_path / "straight"
    (straight_dir / "search" / first["key"]).mkdir(parents=True)
    for name in ("state.json", "rescore.json"):  # the proxy stage only
        (straight_dir / "search" / first["key"] / name).write_bytes((stage / name).read_bytes())
    straight = plan(longer_cfg, model, ref, straight_dir, progress=False, programs=programs).to_json()
    assert straight["budget_per_step"] == longer["budget_per_step"] and straight["mse"] == longer["mse"]
    assert [h["best_mse"] for h in straight["proxy"]["refine"]["history"]] == \
        [h["best_mse"] for h in longer["proxy"]["refine"]["history"]]
    # fewer generations than the checkpoint holds: run again over its evaluations (none new)
    shorter = plan(refined_cfg, model, ref, straight_dir, progress=False, programs=programs).to_json()
    assert shorter["budget_per_step"] == result["budget_per_step"] and shorter["mse"] == result["mse"]
    assert shorter["proxy"]["refine"]["candidates"] == 0


def test_samples_in_one_batch_give_the_separate_runs_fitness(tiny):
    """batch_samples: both seeds sampled as one batch (programs captured at batch 4) give each
    sample's MSE of its own run, up to float rounding, in fewer transformer calls."""
    cfg, model, n, programs, samples, _ = tiny
    batched = build_programs(model, cfg, level_tokens(LEVELS, n), progress=False,
                             example=batched_example(model, cfg, samples))
    rng = np.random.default_rng(3)
    c = Constraint("budget", 0.5, 0.8, 1.2, LEVELS)
    batch = [repair(random_schedule(STEPS, LEVELS, rng), c, rng) for _ in range(4)]
    one, apart = Counters(), Counters()
    got = Evaluator(model, cfg, batched, samples, LEVELS, n, 2**30, True, batch_samples=True).evaluate(batch, math.inf, one)
    want = _evaluator(tiny).evaluate(batch, math.inf, apart)
    for s in batch:
        assert len(got[s]) == 2 and got[s][0] != got[s][1]
        np.testing.assert_allclose(got[s], want[s], rtol=1e-4)
    assert one.steps == apart.steps and one.transformer_calls * 2 == apart.transformer_calls


def test_compiled_fitness_programs_give_the_eager_fitness(tiny):
    """search.compile: the programs compiled by Inductor give each schedule's MSE of the eager
    programs up to float rounding; the setting enters the search key when on."""
    cfg, model, n, programs, samples, _ = tiny
    rng = np.random.default_rng(5)
    # levels 0, 2 and 4 only: two programs to compile
    batch = [(LEVELS - 1,) + tuple(int(v) for v in rng.choice([0, 2, LEVELS - 1], STEPS - 1)) for _ in range(3)]
    got = Evaluator(model, cfg, compiled(programs), samples, LEVELS, n, 2**30, True).evaluate(batch, math.inf, Counters())
    want = _evaluator(tiny).evaluate(batch, math.inf, Counters())
    assert len({tuple(v) for v in want.values()}) == len(batch)
    for s in batch:
        np.testing.assert_allclose(got[s], want[s], rtol=1e-4)
    c = Constraint("budget", 0.5, 0.8, 1.2, LEVELS)
    on = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, compile=True))
    assert search_key("r", on, c, "eager") != search_key("r", cfg, c, "eager")


def test_cuda_graph_fitness_is_refused_on_the_cpu_and_keyed_when_on(tiny):
    """search.cuda_graphs (tests/test_gpu.py replays them): a CPU model's config is refused in
    one line naming the key; the setting enters the search key only when on."""
    from astraea.errors import ConfigError

    with pytest.raises(ConfigError, match="search.cuda_graphs"):
        tiny_config("wan", "tiny", search={"cuda_graphs": True})
    cfg = tiny[0]
    c = Constraint("budget", 0.5, 0.8, 1.2, LEVELS)
    on = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, cuda_graphs=True))
    assert search_key("r", on, c, "eager") != search_key("r", cfg, c, "eager")


def test_graph_replay_bookkeeping_gives_the_eager_fitness(tiny):
    """GraphReplay's own logic on the CPU, its CUDA graph replaced by one that runs the
    program again on the captured inputs into the captured outputs (what a replay does):
    the step's tensors copied in, the weights read in place, so every schedule's MSE is the
    eager programs'. (The real capture: tests/test_gpu.py.)"""
    from astraea import tokenwise

    class Rerun:
        def __init__(self, fn, call, out):
            self.fn, self.call, self.out = fn, call, out

        def replay(self):
            for dst, new in zip(self.out, self.fn(*self.call)):
                dst.copy_(new)

    class OnCpu(tokenwise.GraphReplay):
        def _record(self, call):
            out = self.fn(*call)
            return Rerun(self.fn, call, out), out

    cfg, model, n, programs, samples, _ = tiny
    replayed = {k: dataclasses.replace(tp, graph=OnCpu(tp.graph, None)) for k, tp in programs.items()}
    rng = np.random.default_rng(6)
    c = Constraint("budget", 0.5, 0.8, 1.2, LEVELS)
    batch = [repair(random_schedule(STEPS, LEVELS, rng), c, rng) for _ in range(6)]
    got = Evaluator(model, cfg, replayed, samples, LEVELS, n, 2**30, True).evaluate(batch, math.inf, Counters())
    want = _evaluator(tiny).evaluate(batch, math.inf, Counters())
    assert got == want
    graphs = [tp.graph for tp in replayed.values()]
    assert sum(g.replays for g in graphs) > len(batch)
    fixed = [f for g in graphs for entry in g.captures.values() if entry[0] != "warm" for f in entry[2]]
    assert any(f is not None for f in fixed) and any(f is None for f in fixed)  # weights in place, the rest copied


H100_BENCH = ROOT / "docs/results/bench-h100/searched-schedules/bench.json"


def test_cost_model_from_a_measured_bench_predicts_its_rows():
    """search.cost_from: the H100's per-level engine calls (aoti, CUDA graphs) predict every
    measured row's 50-step sample within 2% (5% from another machine), the independent end-to-end CUDA-event time; a
    level the bench never called, or a file that is not a bench report, is one line."""
    from astraea.costmodel import from_bench
    from astraea.errors import AstraeaError

    report = json.loads(H100_BENCH.read_text())
    n = report["setup"]["video_tokens"]
    cm = from_bench(H100_BENCH, 5, [0, 1, 2, 3, 4])
    assert cm.dense_ms == report["rows"][0]["step_ms"]["dense"] and cm.level_ms[0] < 2  # skip: no transformer call
    assert cm.level_ms == sorted(cm.level_ms)
    rows = [r for r in report["rows"] if r["method"] == "astraea-compiled"]
    assert len(rows) == 4
    for r in rows:  # the 70% row ran on another machine of the card type, 3-4% slower a call
        levels = [round(k / n * 4) for k in r["tokens_per_step"]]
        rel = 0.05 if r["setting"].startswith("searched 70%") else 0.02
        assert cm.schedule_ms(levels) == pytest.approx(r["sample_ms"], rel=rel), r["setting"]
    with pytest.raises(AstraeaError, match="no compiled call at 10%"):
        from_bench(H100_BENCH, 11, list(range(11)))
    with pytest.raises(AstraeaError, match="not an astraea-bench bench.json"):
        from_bench(ROOT / "pyproject.toml", 5, [0, 1, 2, 3, 4])


def test_a_speedup_target_searches_against_the_deployment_cards_calls(tiny, tmp_path):
    """target.speedup with search.cost_from: the search's time is the bench file's (not this
    machine's), the schedule meets the speedup under it, and the times read from the file key the search."""
    cfg, model, n, programs, _, out = tiny
    ref = reference.run(cfg, model, out, progress=False)
    level_ms = [1.0, 300.0, 480.0, 640.0, 800.0]  # a card's calls a CFG step at 0, 25, 50, 75, 100%

    raw = {k: v for k, v in json.loads(json.dumps(config.to_dict(cfg))).items() if k in config.SECTIONS}
    raw["target"] = {"speedup": 2.0}
    # search.repair_high left to its default, which for a speedup target keeps at least the speedup
    raw["search"] = {k: v for k, v in raw["search"].items() if k != "repair_high"} | {"cost_from": "bench.json"}
    bench_report(tmp_path / "bench.json", LEVELS, level_ms)
    speed = config.from_dict(raw, base=tmp_path)
    result = plan(speed, model, ref, out, progress=False, programs=programs).to_json()
    levels = [round(b * (LEVELS - 1)) for b in result["budget_per_step"]]
    assert result["predicted_ms"] == pytest.approx(sum(level_ms[v] for v in levels))
    assert result["predicted_ms"] <= STEPS * 1000.0 / 2.0 + 1e-6 and result["dense_ms"] == STEPS * 1000.0
    assert result["cost_source"] == str(tmp_path / "bench.json") and result["device"] == "H100"
    from astraea.cli import _search_line
    from astraea.schedule import Schedule

    line = _search_line(Schedule.from_json(result), out)
    assert ", predicted " in line and "asked" not in line
    slower = json.loads(json.dumps(result))  # a band over the target (repair_high > 1) lets the time exceed it: said
    slower["constraint"]["value"] = slower["predicted_ms"] = 1.05 * result["constraint"]["target"]
    assert "under the 2.00x asked" in _search_line(Schedule.from_json(slower), out)
    bench_report(tmp_path / "bench.json", LEVELS, [1.0, 200.0, 400.0, 600.0, 800.0])  # another card: another search
    assert plan(speed, model, ref, out, progress=False, programs=programs).key != result["key"]
    raw["search"]["cost_from"] = "missing.json"
    with pytest.raises(config.ConfigError, match="search.cost_from"):
        config.from_dict(raw, base=tmp_path)


# ---- search.precision joint: FP8 steps beside model-dtype ones ---------------------------

def _fp8_model(model):
    """The tiny model with every block's Linear layers in FP8 (channel scales from the weights
    themselves, as modelopt's channel calibration takes them; no calibration run needed)."""
    from astraea import quantize

    names = {n: m for n, m in quantize.candidates(model.transformer).items() if n.startswith("blocks.")}
    amax = {f"{n}.weight_amax": m.weight.detach().abs().amax(dim=1) for n, m in names.items()}
    transformer = quantize.convert(model.transformer, amax, set(names))
    return dataclasses.replace(model, transformer=transformer, identity=model.identity | {"precision": "fp8"})


@pytest.fixture(scope="module")
def fp8_tiny(tiny):
    """The FP8 model of `tiny` and its programs at every level."""
    cfg, model, n, *_ = tiny
    fp8 = _fp8_model(model)
    return fp8, build_programs(fp8, cfg, level_tokens(LEVELS, n), progress=False)


class _Handoff:
    """The oracle of a mixed-precision run: two plain runners, one a precision, the block state
    handed from one to the other (snapshot, restore) at every step that changes precision."""

    def __init__(self, programs, fp8_programs, tokens, precisions):
        self.runners = {"model": TokenwiseTransformer(programs, tokens), "fp8": TokenwiseTransformer(fp8_programs, tokens)}
        self.precisions, self.step, self.holder = precisions, 0, self.runners["model"]

    def __call__(self, **kwargs):
        runner = self.runners[self.precisions[self.step]]
        if runner is not self.holder:
            runner.restore(self.holder.snapshot())
        self.step, self.holder = self.step + 1, runner
        return runner(**kwargs)


def test_a_mixed_precision_run_hands_one_block_state_between_its_program_sets(tiny, fp8_tiny):
    """TokenwiseTransformer with a precision a step runs the FP8 programs where marked over
    the same block state: it equals two plain runners handing the state over, and differs
    from both single-precision runs (the marks are not ignored)."""
    from astraea.sampling import denoise

    cfg, model, n, programs, samples, _ = tiny
    _, fp8_programs = fp8_tiny
    k = level_tokens(LEVELS, n)[2]
    tokens, precisions = [n, k, k, n, 0, k], ["model", "fp8", "model", "fp8", "fp8", "fp8"]
    assert len(tokens) == STEPS
    inputs = samples[0].inputs

    def run(runner):
        return denoise(model, cfg.video, cfg.sampling, inputs, runner)

    got = run(TokenwiseTransformer(programs, tokens, precisions, fp8_programs))
    torch.testing.assert_close(got, run(_Handoff(programs, fp8_programs, tokens, precisions)), atol=0, rtol=0)
    for plain in (TokenwiseTransformer(programs, tokens), TokenwiseTransformer(fp8_programs, tokens)):
        assert (got - run(plain)).abs().max() > 1e-6
    with pytest.raises(ValueError, match=r"no fp8 program for budgets"):
        TokenwiseTransformer(programs, tokens, precisions, {n: fp8_programs[n]})


def test_a_joint_search_picks_precision_and_budget_per_step_against_both_cost_models(tiny, fp8_tiny, tmp_path):
    """search.precision joint with a speedup target: each gene a level in the model's dtype or
    in FP8, timed by cost_from and fp8_cost_from (a card whose FP8 calls are 30% cheaper).
    The schedule's predicted time is the sum of its steps' times by (level, precision) from
    the two files and meets the target; its PSNR is the mixed run's against dense; the values
    are ordered by time with the dense model-dtype step last."""
    from astraea.metrics import psnr
    from astraea.sampling import denoise
    from astraea.schedule import Choices

    cfg, model, n, programs, samples, out = tiny
    ref = reference.run(cfg, model, out, progress=False)
    model_ms = [1.0, 300.0, 480.0, 640.0, 800.0]
    fp8_ms = [1.0] + [0.7 * v for v in model_ms[1:]]
    bench_report(tmp_path / "bf16.json", LEVELS, model_ms)
    bench_report(tmp_path / "fp8.json", LEVELS, fp8_ms, ", fp8")
    raw = {k: v for k, v in json.loads(json.dumps(config.to_dict(cfg))).items() if k in config.SECTIONS}
    raw["target"] = {"speedup": 2.5}
    raw["build"] = {**raw["build"], "precision": "fp8"}
    raw["search"] = {**raw["search"], "precision": "joint", "cost_from": "bf16.json", "fp8_cost_from": "fp8.json",
                     "repair_high": 1.0, "population": 6, "children": 4, "generations": 2}
    joint = config.from_dict(raw, base=tmp_path)
    fp8, fp8_programs = fp8_tiny
    s = plan(joint, model, ref, out, progress=False, programs=programs, fp8=(fp8, fp8_programs))
    raw_s = s.to_json()
    assert len(s.precisions) == STEPS and s.precisions[0] == "model" and raw_s["precision_per_step"] == list(s.precisions)
    levels = [round(b * (LEVELS - 1)) for b in s.budgets]
    want_ms = sum((fp8_ms if p == "fp8" else model_ms)[v] for v, p in zip(levels, s.precisions))
    assert s.search.predicted_ms == pytest.approx(want_ms) and want_ms <= STEPS * 1000.0 / 2.5 + 1e-6
    assert list(s.search.fp8_level_ms) == pytest.approx(fp8_ms)
    runner = TokenwiseTransformer(programs, list(s.tokens), list(s.precisions), fp8_programs)
    got = denoise(model, cfg.video, cfg.sampling, samples[0].inputs, runner)
    value = psnr(float(((got.float() - samples[0].reference) ** 2).mean()), samples[0].peak)
    assert value == pytest.approx(s.quality.per_sample[samples[0].name]["psnr"], abs=1e-4)
    choices = Choices.joint(LEVELS, model_ms, fp8_ms)
    assert choices.options[-1] == (LEVELS - 1, "model") and len(choices) == 2 * LEVELS - 1
    ms = choices.step_ms(model_ms, fp8_ms)
    assert list(ms[:-1]) == sorted(ms[:-1]) and choices.options[0] == (0, "model")
    assert Schedule.from_json(raw_s) == s  # schedule.json keeps the precisions and the FP8 times
    (tmp_path / "s.json").write_text(json.dumps(raw_s))  # as astraea-bench --schedules reads it: its precisions kept
    (name, again), = read_schedules(tmp_path / "s.json", STEPS, n).items()
    assert name.endswith(" joint") and again.precisions == s.precisions and again.tokens == s.tokens


def test_joint_precision_is_refused_where_it_cannot_mean_anything(tmp_path):
    base = {"target": {"speedup": 2.0}, "build": {"precision": "fp8"}, "search": {"precision": "joint"}}
    tiny_config("wan", "tiny", **base)
    cases = [({"build": {"precision": "model"}}, "search.precision: joint searches FP8 steps"),
             ({"target": {"budget": 0.5, "speedup": None}}, "search.precision: joint needs target.speedup"),
             ({"search": {"precision": "joint", "cost_from": "x.json"}}, "search.cost_from: .* does not exist"),
             ({"search": {"precision": "model", "fp8_cost_from": str(tmp_path)}}, "search.fp8_cost_from")]
    for change, message in cases:
        raw = tiny_raw(**base)
        for section, values in change.items():
            raw[section].update(values)
        raw["target"] = {k: v for k, v in raw["target"].items() if v is not None}
        with pytest.raises(config.ConfigError, match=message):
            config.from_dict(raw, base=tmp_path)
    (tmp_path / "b.json").write_text("{}")
    raw = tiny_raw(**base)
    raw["search"]["cost_from"] = "b.json"
    with pytest.raises(config.ConfigError, match="search.fp8_cost_from: with precision joint give both"):
        config.from_dict(raw, base=tmp_path)


def test_a_hand_made_seed_that_beats_the_proxys_picks_is_chosen_and_flagged(caplog):
    """The re-scored set's floor: when a hand-made seed is better at the full video than every
    schedule the proxy chose (a proxy blind to what the full video pays), it is the schedule,
    and the proxy is reported invalid whatever its finalists' rank correlation."""
    import types

    from astraea.proxy import Rescored

    top, spread, seed = (4, 2, 1, 0), (4, 0, 0, 0), (4, 4, 1, 0)
    full_mse = {top: [0.02, 0.02], spread: [0.05, 0.05], seed: [0.01, 0.01]}
    proxy_mse = {top: 0.001, spread: 0.004, seed: 0.002}  # the proxy ranks the three as the full video does not
    full = types.SimpleNamespace(samples=[types.SimpleNamespace(peak=1.0)] * 2)
    rescored = Rescored(full, [top], [spread], full_mse, Counters(), [seed])
    assert rescored.chosen == seed
    ranked = sorted((f, s) for s, f in proxy_mse.items())
    spec = dataclasses.replace(config.SearchSpec(), proxy_video=(1, 8, 8), proxy_min_spearman=-1.0)
    proxy = types.SimpleNamespace(tokens=64, groups=[[0, 1]])
    with caplog.at_level("WARNING", logger="astraea"):
        report = rescored.report(spec, proxy, ranked, lambda s: 40.0, 1.0)
    assert report["seed_chosen"] and not report["valid"] and report["chosen_proxy_rank"] == 1
    assert [r["role"] for r in report["candidates"]] == ["best", "spread", "seed"]
    assert "a hand-made seed (20.00 dB) beats every schedule the proxy video [1, 8, 8] chose (best 16.99 dB)" in caplog.text
