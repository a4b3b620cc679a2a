"""The budget search measured on the bundled reference model: searched against uniform and
against a hand-made schedule, and what the exact savings save.

For each target mean budget (default 40%, 50%, 70%) it runs the search (model.yaml-style
settings below, CPU or GPU) and evaluates, through the same evaluator:
  uniform     the dense first step, then every step at the level nearest the target
  handmade    the first 20% of the steps dense, then flat at the level that meets the target
and reports each schedule's mean budget, PSNR against dense and predicted latency. At the
first target it also reruns the search without shared prefixes and early rejection (the
same schedule, checked) to report the steps and seconds they save.
Writes search_bundled.json, search_bundled.md and search_bundled.png under --out.

    python tools/measure_search.py --out docs/results/search-cpu
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

from astraea import config, loader, reference  # noqa: E402
from astraea.fitness import Counters, Evaluator, calibration_samples  # noqa: E402
from astraea.metrics import psnr  # noqa: E402
from astraea.schedule import level_tokens  # noqa: E402
from astraea.schema import default_repair_high  # noqa: E402
from astraea.search import Constraint, Search, measure_cost, plan  # noqa: E402
from astraea.tokenwise import build_programs  # noqa: E402

PROMPTS = ["a red circle moving left over a striped background", "a green ring growing over a gradient background",
           "a blue square bouncing over a plain background", "a yellow triangle moving right over a checkered background"]


def fixed_schedules(target: float, steps: int, levels: int) -> dict[str, tuple]:
    top = levels - 1
    uniform = (top,) + (min(top, max(0, round(target * top))),) * (steps - 1)
    dense = max(1, math.ceil(0.2 * steps))
    rest = (target * steps - dense) / (steps - dense)
    handmade = (top,) * dense + (min(top, max(0, round(rest * top))),) * (steps - dense)
    return {"uniform": uniform, "handmade": handmade}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--targets", type=float, nargs="*", default=[0.4, 0.5, 0.7])
    p.add_argument("--speedups", type=float, nargs="*", default=[], help="speedup targets, searched after the "
                   "--targets (give --targets with no value for only these)")
    p.add_argument("--cost-from", type=Path, help="search.cost_from: an astraea-bench bench.json of the deployment "
                   "card, whose compiled calls by budget predict every schedule's time (and the speedups)")
    p.add_argument("--population", type=int, default=10)
    p.add_argument("--children", type=int, default=6)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--levels", type=int, default=None, help="search.levels (default the config's, 11): fewer levels, "
                   "fewer distinct budgets, fewer engines to build")
    p.add_argument("--repair-high", type=float, default=None, help="search.repair_high (default model.yaml's: 1.1 "
                   "for a mean budget, 1.0 for a speedup); 1.0 keeps every searched mean budget at or under its target")
    p.add_argument("--no-ablation", action="store_true")
    p.add_argument("--seed", type=int, default=0, help="search.seed (the evolution's own randomness)")
    p.add_argument("--proxy", type=int, nargs=3, metavar=("FRAMES", "HEIGHT", "WIDTH"),
                   help="search at this proxy video (search.proxy_video), the best re-scored at the full one")
    p.add_argument("--rescore", type=int, default=4, help="search.rescore with --proxy")
    p.add_argument("--validate", type=int, default=4, help="search.validate with --proxy")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = config.bundled_config(PROMPTS[: args.prompts], steps=args.steps, device=args.device)
    base = dataclasses.replace(base, bench=config.BenchSpec(warmup=1, repeats=3))
    base = dataclasses.replace(base, search=dataclasses.replace(
        base.search, levels=args.levels or base.search.levels, cost_from=str(args.cost_from.resolve()) if args.cost_from else None))
    model = loader.load_model(base)
    work = args.out / "run"
    ref = reference.run(base, model, work)
    n = model.layout(base.video).video_tokens
    levels = base.search.levels
    programs = build_programs(model, base, level_tokens(levels, n))
    samples = calibration_samples(model, base, ref, work / "embeddings")
    ev = Evaluator(model, base, programs, samples, levels, n, 0, share_prefixes=False)
    report = {"device": args.device, "steps": args.steps, "samples": len(samples), "levels": levels,
              "repair": [base.search.repair_low, args.repair_high or "1.1 for a budget, 1.0 for a speedup"],
              "proxy_video": args.proxy, "cost_from": str(args.cost_from) if args.cost_from else None,
              "search": {"population": args.population, "children": args.children, "generations": args.generations,
                         "seed": args.seed},
              "rows": []}
    goals = [("budget", t) for t in args.targets] + [("speedup", t) for t in args.speedups]
    for ti, (kind, target) in enumerate(goals):
        goal = config.TargetSpec(**{kind: target})
        cfg = dataclasses.replace(base, target=goal, search=dataclasses.replace(
            base.search, population=args.population, children=args.children, generations=args.generations,
            seed=args.seed, proxy_video=tuple(args.proxy or ()), rescore=args.rescore, validate=args.validate,
            repair_high=args.repair_high or default_repair_high(goal)))  # model.yaml's
        t0 = time.perf_counter()
        result = plan(cfg, model, ref, work, programs=programs).to_json()
        wall = time.perf_counter() - t0
        row = {"target": target, "kind": kind, "searched": {"mean_budget": result["mean_budget"], "psnr": result["psnr"],
                                              "predicted_ms": result["predicted_ms"], "schedule": result["budget_per_step"]},
               "cost": result["cost"], "plan_seconds": wall, "dense_ms": result["dense_ms"], "proxy": result["proxy"]}
        cost_ms = measure_cost(cfg, model, programs, level_tokens(levels, n), work, False).level_ms  # every level
        # a speedup target's fixed schedules: at the searched schedule's mean budget
        fixed = fixed_schedules(target if kind == "budget" else result["mean_budget"], args.steps, levels)
        for name, sched in fixed.items():
            mse = ev.evaluate([sched], math.inf, Counters())[sched]
            row[name] = {"mean_budget": sum(sched) / ((levels - 1) * len(sched)),
                         "psnr": sum(psnr(v, samples[i].peak) for i, v in enumerate(mse)) / len(mse),
                         "predicted_ms": sum(cost_ms[v] for v in sched), "schedule": [v / (levels - 1) for v in sched]}
        if ti == 0 and kind == "budget" and not args.no_ablation and not args.proxy:
            c = Constraint("budget", target, cfg.search.repair_low, cfg.search.repair_high, levels)
            naive = Search(cfg, Evaluator(model, cfg, programs, samples, levels, n, 0, share_prefixes=False),
                           c, work / "ablation", "ablation", early_stop=False)
            t0 = time.perf_counter()
            st = naive.run()
            best = [v / (levels - 1) for v in st.population[0][0]]
            row["ablation"] = {"steps_executed": st.counters.steps, "seconds": time.perf_counter() - t0,
                               "candidates": st.counters.candidates, "same_schedule": best == result["budget_per_step"]}
        report["rows"].append(row)
        (args.out / "search_bundled.json").write_text(json.dumps(report, indent=1))
        print(json.dumps({k: row[k] for k in ("target", "searched", "uniform", "handmade")}), flush=True)
    write_outputs(report, args.out)


def _goal(row: dict) -> str:
    return f"{row['target']:g}x" if row.get("kind") == "speedup" else f"{row['target']:.0%}"


def write_outputs(report: dict, out: Path) -> None:
    lines = [f"Bundled reference model, {report['device']}, {report['steps']} steps, {report['samples']} samples; "
             f"search population {report['search']['population']}, {report['search']['children']} children, "
             f"{report['search']['generations']} generations.", "",
             f"Predicted times: {report.get('cost_from') or 'the cost model measured on ' + report['device']}.", "",
             "| target | schedule | mean budget | skipped steps | PSNR vs dense (dB) | predicted (ms) | predicted speedup |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        for name in ("searched", "uniform", "handmade"):
            x = r[name]
            lines.append(f"| {_goal(r)} | {name} | {x['mean_budget']:.3f} | {x['schedule'].count(0)} | {x['psnr']:.2f} | "
                         f"{x['predicted_ms']:.0f} | {r['dense_ms'] / x['predicted_ms']:.2f}x |")
    lines += ["", "| target | candidates | stopped early | steps executed | naive steps | search s | "
              "without sharing/early stop: steps, s | same schedule |", "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        c, a = r["cost"], r.get("ablation")
        ab = f"{a['steps_executed']}, {a['seconds']:.0f}" if a else "-"
        lines.append(f"| {_goal(r)} | {c['candidates_evaluated']} | {c['stopped_early']} | {c['steps_executed']} | "
                     f"{c['naive_steps']} | {c['wall_seconds']:.0f} | {ab} | {a['same_schedule'] if a else '-'} |")
    if report.get("proxy_video"):
        lines += ["", f"Proxy video {'x'.join(map(str, report['proxy_video']))}: the search's candidates there, "
                  "the best and a spread of its ranking re-scored at the full video.", "",
                  "| target | re-scored | Spearman | chosen's proxy rank | search s | re-score s | re-score steps |",
                  "|---|---|---|---|---|---|---|"]
        for r in report["rows"]:
            x = r["proxy"]
            lines.append(f"| {_goal(r)} | {x['rescored']} | {x['spearman']:.2f} | {x['chosen_proxy_rank']} | "
                         f"{x['search_seconds']:.0f} | {x['rescore_seconds']:.0f} | {x['rescore_steps']} |")
    md = "\n".join(lines) + "\n"
    (out / "search_bundled.md").write_text(md)
    print(md)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
    speed = bool(report.get("cost_from"))  # against the deployment card's predicted speedup, else the mean budget
    for name, style in (("searched", "-o"), ("uniform", "--s"), ("handmade", ":^")):
        pts = sorted((r["dense_ms"] / r[name]["predicted_ms"] if speed else r[name]["mean_budget"], r[name]["psnr"])
                     for r in report["rows"])
        ax.plot([x for x, _ in pts], [y for _, y in pts], style, label=name)
    ax.set_xlabel(f"predicted speedup ({Path(report['cost_from']).name})" if speed else "mean budget")
    ax.set_ylabel("PSNR against dense (dB)")
    ax.set_title("bundled reference model: schedules by " + ("speed" if speed else "budget"), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "search_bundled.png")
    plt.close(fig)


if __name__ == "__main__":
    main()
