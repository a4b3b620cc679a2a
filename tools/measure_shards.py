"""Per-shard top-k against global top-k on the bundled model: what sequence parallelism over
P ranks costs in quality when each rank selects its share of a step's rows among its own
(`selection.shards: P`, the rows in P contiguous shards), for the searched schedules. The
rest of a sequence-parallel step (row-local ops, attention over all keys) is the one-GPU
computation, so this is the whole difference. PSNR of the final latents against dense.
Writes shards.json, shards.md and shards.png.

    python tools/measure_shards.py --out docs/results/shards-cpu --shards 1 2 4 8 \\
        --schedules docs/results/search-cpu-50steps/searched-schedules.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from astraea import config, loader, reference  # noqa: E402
from astraea.fitness import calibration_samples, schedule_psnrs  # noqa: E402
from astraea.plots import pyplot, save_png  # noqa: E402
from astraea.schedule import read_schedules  # noqa: E402

PROMPTS = ["a red circle moving left over a striped background", "a green ring growing over a gradient background",
           "a blue square bouncing over a plain background"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--schedules", type=Path, required=True, help="{name: [budget per step]} or a schedule.json")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = config.bundled_config(PROMPTS, steps=args.steps)
    model = loader.load_model(base)
    n = model.layout(base.video).video_tokens
    ref = reference.run(base, model, args.out / "run", progress=False)
    samples = calibration_samples(model, base, ref, args.out / "run" / "embeddings")
    schedules = read_schedules(args.schedules, args.steps, n)
    report = {"steps": args.steps, "prompts": PROMPTS, "video_tokens": n, "psnr": {}}
    for shards in args.shards:
        cfg = dataclasses.replace(base, selection=dataclasses.replace(base.selection, shards=shards))
        row = {name: {"mean": sum(values) / len(values), "per_prompt": values}
               for name, values in schedule_psnrs(model, cfg, samples, schedules.items()).items()}
        report["psnr"][str(shards)] = row
        (args.out / "shards.json").write_text(json.dumps(report, indent=1))
        print(json.dumps({"shards": shards, **{k: round(v["mean"], 2) for k, v in row.items()}}), flush=True)
    write(report, args.out)


def write(report: dict, out: Path) -> None:
    shards = list(report["psnr"])
    names = list(report["psnr"][shards[0]])
    lines = [f"Bundled model, {report['steps']} steps, {len(report['prompts'])} prompts, {report['video_tokens']} video "
             "rows; mean PSNR of the final latents against dense (dB), each rank of P choosing its share of a step's "
             "rows among its own contiguous shard (P = 1: the global top-k).", "",
             "| schedule | " + " | ".join(f"P = {s}" for s in shards) + " |", "|---" * (1 + len(shards)) + "|"]
    for name in names:
        base = report["psnr"][shards[0]][name]["mean"]
        cells = [f"{report['psnr'][s][name]['mean']:.2f}" + ("" if s == shards[0] else
                 f" ({report['psnr'][s][name]['mean'] - base:+.2f})") for s in shards]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / "shards.md").write_text("\n".join(lines) + "\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=110)
    for name in names:
        ax.plot([int(s) for s in shards], [report["psnr"][s][name]["mean"] for s in shards], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("shards (ranks), each with its own top-k")
    ax.set_ylabel("PSNR against dense (dB)")
    ax.set_title("Per-shard selection on the bundled model", fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, out / "shards.png")


if __name__ == "__main__":
    main()
