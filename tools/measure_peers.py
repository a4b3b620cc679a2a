"""Astraea against the peers diffusers ships, on the bundled reference model: PSNR of the
final latents against the dense model and speed against the dense sample, same prompts,
seeds and steps (a first measurement for `astraea-bench`; the H100 speed comes from the
engines there).

  astraea   the rewritten programs (eager) with a uniform schedule at each --budgets (the
            dense first step, then flat), and the searched schedules of --searched
  peers     astraea.peers at a few settings each, from mild to aggressive
Speed here is the CPU's wall time of a whole sample (median of --repeats after a warm-up),
eager for everyone: it ranks methods by work skipped, not by what a GPU would give.
Writes peers.json, peers.md, peers.png under --out.

    python tools/measure_peers.py --out docs/results/peers-cpu
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from measure_search import PROMPTS  # noqa: E402

from astraea import bundled, loader  # noqa: E402
from astraea.peers import PeerTransformer  # noqa: E402
from astraea.sampling import denoise, prompt_inputs  # noqa: E402
from astraea.search import build_programs, level_tokens, psnr  # noqa: E402
from astraea.tokenwise import TokenwiseTransformer  # noqa: E402

PEER_SETTINGS = {
    "pab": [{"skip": 2}, {"skip": 3}, {"skip": 4}],
    "first_block_cache": [{"threshold": 0.1}, {"threshold": 0.2}, {"threshold": 0.3}],
    "taylorseer": [{"interval": 2, "warmup": 3}, {"interval": 3, "warmup": 3}],
    "faster_cache": [{"skip": 2}, {"skip": 3}],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--budgets", type=float, nargs="*", default=[0.4, 0.5, 0.7])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--searched", type=Path, default=Path("docs/results/search-cpu/search_bundled.json"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = bundled.run_config(PROMPTS[: args.prompts], steps=args.steps)
    model = loader.load_model(cfg)
    samples = [prompt_inputs(model, cfg.video, cfg.sampling, prompt, 0) for prompt in cfg.sampling.prompts]
    n, levels = model.layout(cfg.video).video_tokens, cfg.search.levels
    tokens = level_tokens(levels, n)
    programs = build_programs(model, cfg, tokens, progress=False)

    def run(make) -> tuple[list, float]:
        """Final latents of every sample and the median seconds a sample."""
        outs, times, current = [], [], None

        def fresh():  # a new generation: the peers' hooks and Astraea's state start over
            nonlocal current
            if current is not None and hasattr(current, "close"):
                current.close()
            current = make()
            return current

        for i, inputs in enumerate(samples):
            if i == 0:
                denoise(model, cfg.video, cfg.sampling, inputs, fresh())  # warm-up
            for _ in range(args.repeats):
                transformer = fresh()
                t0 = time.perf_counter()
                out = denoise(model, cfg.video, cfg.sampling, inputs, transformer)
                times.append(time.perf_counter() - t0)
            outs.append(out)
        if current is not None and hasattr(current, "close"):
            current.close()
        return outs, statistics.median(times)

    dense, dense_s = run(lambda: None)

    def score(outs) -> float:
        vals = [psnr(float(((got - want) ** 2).mean()), float(want.max() - want.min())) for got, want in zip(outs, dense)]
        return sum(vals) / len(vals)

    schedules = {f"uniform {b:.0%}": [levels - 1] + [round(b * (levels - 1))] * (args.steps - 1) for b in args.budgets}
    if args.searched.is_file():
        for row in json.loads(args.searched.read_text())["rows"]:
            if len(row["searched"]["schedule"]) == args.steps:
                schedules[f"searched {row['target']:.0%}"] = [round(b * (levels - 1)) for b in row["searched"]["schedule"]]
    rows = []
    for name, sched in schedules.items():
        ks = [tokens[v] for v in sched]
        outs, secs = run(lambda ks=ks: TokenwiseTransformer(programs, ks))
        rows.append({"method": "astraea", "setting": name, "mean_budget": sum(sched) / ((levels - 1) * len(sched)),
                     "psnr": score(outs), "seconds": secs, "speedup": dense_s / secs})
        print(json.dumps(rows[-1]), flush=True)
    for peer, settings in PEER_SETTINGS.items():
        for knobs in settings:
            outs, secs = run(lambda peer=peer, knobs=knobs: PeerTransformer(model.transformer, peer,
                                                                             model.family.block_containers, **knobs))
            rows.append({"method": peer, "setting": json.dumps(knobs), "psnr": score(outs), "seconds": secs,
                         "speedup": dense_s / secs})
            print(json.dumps(rows[-1]), flush=True)
    report = {"device": "cpu", "steps": args.steps, "samples": len(samples), "dense_seconds": dense_s, "rows": rows}
    (args.out / "peers.json").write_text(json.dumps(report, indent=1))
    write_outputs(report, args.out)


def write_outputs(report: dict, out: Path) -> None:
    lines = [f"Bundled reference model, CPU, {report['steps']} steps, {report['samples']} samples; dense sample "
             f"{report['dense_seconds']:.2f} s (eager). PSNR of the final latents against dense.", "",
             "| method | setting | PSNR (dB) | s a sample | speedup |", "|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['method']} | {r['setting']} | {r['psnr']:.2f} | {r['seconds']:.2f} | {r['speedup']:.2f}x |")
    md = "\n".join(lines) + "\n"
    (out / "peers.md").write_text(md)
    print(md)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for method in dict.fromkeys(r["method"] for r in report["rows"]):
        pts = sorted((r["speedup"], r["psnr"]) for r in report["rows"] if r["method"] == method and math.isfinite(r["psnr"]))
        ax.plot([x for x, _ in pts], [y for _, y in pts], "-o" if method == "astraea" else "--^", label=method)
    ax.set_xlabel("speedup over the dense sample (CPU, eager)")
    ax.set_ylabel("PSNR against dense (dB)")
    ax.set_title("bundled reference model: Astraea and diffusers' caches", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "peers.png")
    plt.close(fig)


if __name__ == "__main__":
    main()
