"""What one fitness evaluation of the budget search costs, at the full video and at proxy
videos, and the paper-size search projected from it in GPU-hours.

For the config's video and each `--proxy FRAMES HEIGHT WIDTH`: the dense reference of the
first prompt and seed, the rewritten programs of the levels the timed schedule uses, and
one fitness evaluation (all `sampling.steps` steps through the search's own Evaluator) of
the uniform schedule at the target (a dense first step, then every step at the target's
level) timed twice: the first warms up (Triton kernels, allocator), the second is reported.
The projection of the paper's search (population + children x generations candidates, x
`--samples` prompts) with a proxy: every candidate at the proxy, less the share of steps
that shared prefixes saved (`--prefix-saving`, measured on the bundled model), plus
`search.rescore + search.validate` candidates at the full video.
`--fitness` times the proxies' evaluations with the search's faster programs
(search.compile, search.cuda_graphs: compiled, replayed as CUDA graphs, or both; the first
evaluation compiles or captures, the second is reported). Writes search_cost.json and
search_cost.md under --out.

    python tools/measure_search_cost.py tools/configs/wan-1.3b-search-cost.yaml --proxy 33 240 416 --out runs/cost
    python3 tools/measure_search_cost.py tools/configs/wan-1.3b-search-cost.yaml --full-from FULL.json \
        --proxy 5 480 832 --fitness compile cuda_graphs --out $OUT/cost-graphs     (on the GPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from astraea import config, loader, reference  # noqa: E402
from astraea.families import get_family  # noqa: E402
from astraea.fitness import Counters, Evaluator, batched_example, calibration_samples  # noqa: E402
from astraea.schedule import level_tokens  # noqa: E402
from astraea.search import faster  # noqa: E402
from astraea.timing import Clock, device_name  # noqa: E402
from astraea.tokenwise import build_programs  # noqa: E402


def time_video(cfg: config.RunConfig, model, work: Path, samples: int = 1) -> dict:
    """One fitness evaluation of the uniform schedule at the target, timed warm; with
    `samples` > 1, that many seeds of the first prompt in one batch (search.batch_samples);
    the programs as cfg.search's compile and cuda_graphs make them."""
    spec, steps = cfg.search, cfg.sampling.steps
    top = spec.levels - 1
    level = min(top, max(1, round(cfg.target.budget * top)))
    schedule = (top,) + (level,) * (steps - 1)
    cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, prompts=cfg.sampling.prompts[:1],
                                                                seeds=tuple(range(samples))))
    n = model.layout(cfg.video).video_tokens
    tokens = level_tokens(spec.levels, n)
    t0 = time.perf_counter()
    ref = reference.run(cfg, model, work, progress=False)
    ref_s = time.perf_counter() - t0
    cal = calibration_samples(model, cfg, ref, work / "embeddings")
    batched = samples > 1
    t0 = time.perf_counter()
    programs = build_programs(model, cfg, [tokens[v] for v in set(schedule)], progress=False,
                              example=batched_example(model, cfg, cal) if batched else None)
    rewrite_s = time.perf_counter() - t0
    programs = faster(programs, spec)
    ev = Evaluator(model, cfg, programs, cal, spec.levels, n, 0, share_prefixes=False, batch_samples=batched)
    seconds, mse = [], None
    for _ in range(2):
        start, end = Clock(model.device), Clock(model.device)
        start.record()
        mse = ev.evaluate([schedule], math.inf, Counters())[schedule]
        end.record()
        seconds.append(start.until(end) / 1e3)
    peak = torch.cuda.max_memory_allocated(model.device) / 2**30 if model.device.type == "cuda" else None
    fitness = "+".join(k for k in ("compile", "cuda_graphs") if getattr(spec, k)) or "eager"
    return {"video": [cfg.video.frames, cfg.video.height, cfg.video.width], "tokens": n, "samples_a_batch": samples,
            "fitness": fitness,
            "schedule_level": level, "evaluation_s": seconds[1], "first_evaluation_s": seconds[0],
            "per_sample_s": seconds[1] / samples, "step_ms": 1000 * seconds[1] / steps, "reference_s": ref_s,
            "rewrite_s": rewrite_s, "mse": mse, "peak_gib_so_far": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, nargs="?")
    p.add_argument("--proxy", type=int, nargs=3, action="append", default=[], metavar=("FRAMES", "HEIGHT", "WIDTH"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--samples", type=int, default=4, help="prompts x seeds of the projected search (the paper: 4); "
                   "each proxy is also timed with this many samples in one batch")
    p.add_argument("--prefix-saving", type=float, help="share of sample-steps shared prefixes save (default 0.16; "
                   "with --report-only: the report's own unless given, e.g. measured by a paper-size search)")
    p.add_argument("--full-from", type=Path, help="a search_cost.json of an earlier run on the same machine: take its "
                   "full-video row instead of timing it again")
    p.add_argument("--fitness", nargs="+", choices=("eager", "compile", "cuda_graphs"), default=["eager"],
                   help="the proxies' fitness programs: eager, or compiled and/or replayed as CUDA graphs "
                        "(search.compile, search.cuda_graphs)")
    p.add_argument("--report-only", type=Path, metavar="JSON", help="no timing: the projection and table of an earlier "
                   "search_cost.json (one cut short included), written under --out")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        report = json.loads(args.report_only.read_text())
        if args.prefix_saving is not None:
            report["prefix_saving"] = args.prefix_saving
        return finish(report, args.out)
    args.prefix_saving = 0.16 if args.prefix_saving is None else args.prefix_saving
    if args.config is None:
        p.error("give a CONFIG to time, or --report-only JSON")
    cfg = config.load(args.config)
    if cfg.target.budget is None:
        sys.exit("error: target.budget: this tool times the uniform schedule at a mean budget; set one")
    model = loader.load_model(cfg)
    paper = config.SearchSpec()  # the projection is of a paper-size search, whatever the config's search is
    candidates = paper.population + paper.children * paper.generations
    report = {"device": device_name(model.device), "torch": torch.__version__, "config": str(args.config),
              "steps": cfg.sampling.steps, "target": cfg.target.budget, "samples": args.samples,
              "candidates": candidates, "rescored": paper.rescore + paper.validate,
              "prefix_saving": args.prefix_saving, "videos": []}
    work = args.out / "run"

    def save(row):
        report["videos"].append(row)
        print(json.dumps(row), flush=True)
        (args.out / "search_cost.json").write_text(json.dumps(report, indent=1))

    if args.full_from:
        earlier = json.loads(args.full_from.read_text())
        if earlier["device"] != report["device"]:
            sys.exit(f"error: --full-from: {args.full_from} was measured on {earlier['device']}, not {report['device']}")
        save({**earlier["videos"][0], "from": str(args.full_from)})
    else:
        save(time_video(cfg, model, work))
    fast = {k: k in args.fitness for k in ("compile", "cuda_graphs")}
    if "eager" in args.fitness and any(fast.values()):
        p.error("--fitness: eager, or compile and/or cuda_graphs")
    if fast["cuda_graphs"] and model.device.type != "cuda":
        p.error(f"--fitness cuda_graphs: the model is on {model.device}; CUDA graphs need model.device cuda")
    for video in args.proxy:
        c = dataclasses.replace(cfg, video=config.VideoSpec(*video), search=dataclasses.replace(cfg.search, **fast))
        get_family(cfg.model.family).validate(c)  # a video the family can sample, or a one-line error
        for samples in sorted({1, args.samples}):
            save(time_video(c, model, work, samples))
    finish(report, args.out)


def finish(report: dict, out: Path) -> None:
    """The projection and the markdown table from the timed rows (also of a run cut short:
    --report-only). Shared prefixes save the same share of steps at every video, the full
    one included (conservative for the proxy: at the full video fewer snapshots fit)."""
    full = report["videos"][0]["per_sample_s"]
    candidates, samples, saving = report["candidates"], report["samples"], report["prefix_saving"]
    naive = candidates * samples * full * (1 - saving) / 3600
    report["projection"] = [{"video": "full", "samples_a_batch": 1, "gpu_hours": naive, "ratio": 1.0}]
    for row in report["videos"][1:]:
        search = candidates * samples * row["per_sample_s"] * (1 - saving)
        rescore = report["rescored"] * samples * full
        hours = (search + rescore) / 3600
        report["projection"].append({"video": "x".join(map(str, row["video"])), "samples_a_batch": row["samples_a_batch"],
                                     "gpu_hours": hours, "search_hours": search / 3600, "rescore_hours": rescore / 3600,
                                     "ratio": naive / hours})
    (out / "search_cost.json").write_text(json.dumps(report, indent=1))
    lines = [f"{report['device']}, torch {report['torch']}, {report['steps']} steps, target {report['target']:.0%}; "
             f"projection: {candidates} candidates x {samples} samples (shared prefixes saving {saving:.0%} of the "
             f"steps at every video), {report['rescored']} re-scored at the full video.",
             "", "| video | tokens | samples a batch | fitness programs | one evaluation (s) | a sample (s) | ms a step "
             "| rewrite (s) |", "|---|---|---|---|---|---|---|---|"]
    for row in report["videos"]:
        lines.append(f"| {'x'.join(map(str, row['video']))} | {row['tokens']} | {row['samples_a_batch']} | "
                     f"{row.get('fitness', 'eager')} | "
                     f"{row['evaluation_s']:.1f} | {row['per_sample_s']:.2f} | {row['step_ms']:.0f} | {row['rewrite_s']:.0f} |")
    lines += ["", "| search at | samples a batch | GPU-hours | of which re-scoring | cheaper than at the full video |",
              "|---|---|---|---|---|"]
    for row in report["projection"]:
        lines.append(f"| {row['video']} | {row['samples_a_batch']} | {row['gpu_hours']:.2f} | "
                     f"{row.get('rescore_hours', 0):.2f} | {row['ratio']:.1f}x |")
    md = "\n".join(lines) + "\n"
    (out / "search_cost.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
