"""Does a smaller video rank budget schedules like the full one? (search.proxy_video)

On the bundled reference model: a fixed set of schedules at one target (random repaired
ones, and crossings of them with the uniform schedule then mutated, the kind of candidates
the evolution makes) is evaluated through the search's Evaluator at the full video and at
each proxy video. Reported per proxy: Spearman's rank correlation of the fitness with the
full video's (over all schedules and over the full video's best 10), where the proxy's best
6 rank at the full video, the best full-video PSNR among them against the overall best,
and the seconds. Writes proxy.json, proxy.md and proxy.png under --out.

    python tools/measure_proxy.py --out docs/results/proxy-cpu --proxy 9 64 64 --proxy 5 64 64 --proxy 17 32 32
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

import numpy as np  # noqa: E402

from astraea import bundled, config, loader, reference  # noqa: E402
from astraea.fitness import Counters, Evaluator, calibration_samples  # noqa: E402
from astraea.metrics import psnr, spearman  # noqa: E402
from astraea.schedule import level_tokens  # noqa: E402
from astraea.search import Constraint, crossover, mutate, random_schedule, repair  # noqa: E402
from astraea.tokenwise import build_programs  # noqa: E402

PROMPTS = ["a red circle moving left over a striped background", "a green ring growing over a gradient background"]
TOP = 6


def schedules(steps: int, levels: int, target: float, count: int, seed: int) -> list[tuple]:
    rng = np.random.default_rng(seed)
    c = Constraint("budget", target, 0.9, 1.1, levels)
    uniform = repair((levels - 1,) + (round(target * (levels - 1)),) * (steps - 1), c, rng)
    randoms = [repair(random_schedule(steps, levels, rng), c, rng) for _ in range(count - count // 3)]
    children = [repair(mutate(crossover(randoms[int(rng.integers(len(randoms)))], uniform, rng), 0.3, levels, rng), c, rng)
                for _ in range(count // 3)]
    return list(dict.fromkeys(randoms + children))


def evaluate(base, model, video, scheds, work: Path, levels: int) -> dict:
    cfg = dataclasses.replace(base, video=config.VideoSpec(*video))
    ref = reference.run(cfg, model, work, progress=False)
    n = model.layout(cfg.video).video_tokens
    programs = build_programs(model, cfg, level_tokens(levels, n), progress=False)
    samples = calibration_samples(model, cfg, ref, work / "embeddings")
    ev = Evaluator(model, cfg, programs, samples, levels, n, 2**30)
    t0 = time.perf_counter()
    mse = ev.evaluate(scheds, math.inf, Counters())
    seconds = time.perf_counter() - t0
    fitness = [float(np.mean(mse[s])) for s in scheds]
    psnrs = [float(np.mean([psnr(v, x.peak) for v, x in zip(mse[s], samples)])) for s in scheds]
    return {"video": list(video), "tokens": n, "seconds": seconds, "mse": fitness, "psnr": psnrs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--proxy", type=int, nargs=3, action="append", required=True, metavar=("FRAMES", "HEIGHT", "WIDTH"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--schedules", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("runs/measure-proxy"), help="references, embeddings (reused)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = config.bundled_config(PROMPTS, steps=args.steps)
    for video in args.proxy:
        bundled_video = dataclasses.replace(base, video=config.VideoSpec(*video))
        from astraea.families import get_family

        get_family("wan").validate(bundled_video)
    model = loader.load_model(base)
    levels = base.search.levels
    scheds = schedules(args.steps, levels, args.target, args.schedules, args.seed)
    report = {"model": "bundled", "device": "cpu", "steps": args.steps, "target": args.target, "samples": len(PROMPTS),
              "schedules": [list(s) for s in scheds], "videos": []}
    work = args.work
    full = evaluate(base, model, bundled.VIDEO, scheds, work, levels)
    report["videos"].append(full)
    print(f"full {full['video']}: {full['seconds']:.0f} s", flush=True)
    m = np.array(full["mse"])
    best10 = np.argsort(m, kind="stable")[:10]
    for video in args.proxy:
        row = evaluate(base, model, video, scheds, work, levels)
        x = np.array(row["mse"])
        top = np.argsort(x, kind="stable")[:TOP]
        full_rank = np.argsort(np.argsort(m, kind="stable"), kind="stable")
        row.update({"spearman": spearman(x, m), "spearman_best10": spearman(x[best10], m[best10]),
                    "proxy_top_full_ranks": sorted(int(full_rank[i]) for i in top),
                    "best_psnr_in_proxy_top": max(full["psnr"][i] for i in top), "best_psnr": max(full["psnr"])})
        report["videos"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("mse", "psnr")}), flush=True)
        (args.out / "proxy.json").write_text(json.dumps(report, indent=1))
    (args.out / "proxy.json").write_text(json.dumps(report, indent=1))
    write_outputs(report, args.out)


def write_outputs(report: dict, out: Path) -> None:
    full = report["videos"][0]
    lines = [f"Bundled reference model, CPU, {report['steps']} steps, {report['samples']} samples, "
             f"{len(report['schedules'])} schedules at a {report['target']:.0%} target; full video "
             f"{'x'.join(map(str, full['video']))} ({full['tokens']} tokens, {full['seconds']:.0f} s).", "",
             f"| proxy video | tokens | Spearman (all) | Spearman (full's best 10) | proxy's best {TOP} at full ranks | "
             f"best PSNR among them / overall (dB) | seconds |", "|---|---|---|---|---|---|---|"]
    for r in report["videos"][1:]:
        lines.append(f"| {'x'.join(map(str, r['video']))} | {r['tokens']} | {r['spearman']:.2f} | {r['spearman_best10']:.2f} | "
                     f"{', '.join(map(str, r['proxy_top_full_ranks']))} | {r['best_psnr_in_proxy_top']:.2f} / "
                     f"{r['best_psnr']:.2f} | {r['seconds']:.0f} |")
    md = "\n".join(lines) + "\n"
    (out / "proxy.md").write_text(md)
    print(md)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["videos"][1:]
    fig, axes = plt.subplots(1, len(rows), figsize=(3.6 * len(rows), 3.4), dpi=110, squeeze=False)
    for ax, r in zip(axes[0], rows):
        ax.scatter(r["psnr"], full["psnr"], s=10)
        ax.set_xlabel(f"PSNR at {'x'.join(map(str, r['video']))} (dB)")
        ax.set_ylabel("PSNR at the full video (dB)")
        ax.set_title(f"Spearman {r['spearman']:.2f}", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "proxy.png")
    plt.close(fig)


if __name__ == "__main__":
    main()
