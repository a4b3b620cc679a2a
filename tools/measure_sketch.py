"""Delta from a sketch of the block input against the full input, and a float8 cache against
one in the model's dtype, on the bundled reference model: PSNR against dense of the same
schedules with `selection.delta: full` and with `sketch` at several sketch dimensions
(--float8: also `selection.cache: float8`, with the full Delta and with the largest
sketch), and the state each keeps per block.

Schedules: uniform and hand-made (tools/measure_search.py) at each target, plus the searched
schedules recorded in --searched (a search_bundled.json), all evaluated through the search's
evaluator (the rewritten programs, every calibration sample). The hidden size of the bundled
model is 192: a sketch of 16-64 values a row is 3-12x smaller here and 24-96x smaller at Wan
2.1 1.3B's 1,536 (bf16 input against float32 sketch).
Writes sketch.json, sketch.md and sketch.png under --out.

    python tools/measure_sketch.py --out docs/results/sketch-cpu --prompts 4
    python tools/measure_sketch.py --out docs/results/cache-float8-cpu --prompts 4 --dims 64 --float8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from measure_search import PROMPTS, fixed_schedules  # noqa: E402

from astraea import config, loader, reference  # noqa: E402
from astraea.fitness import Counters, Evaluator, calibration_samples  # noqa: E402
from astraea.metrics import psnr  # noqa: E402
from astraea.schedule import level_tokens  # noqa: E402
from astraea.tokenwise import build_programs  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--targets", type=float, nargs="*", default=[0.4, 0.5, 0.7])
    p.add_argument("--dims", type=int, nargs="*", default=[16, 32, 64])
    p.add_argument("--float8", action="store_true", help="also the float8 cache (selection.cache: float8)")
    p.add_argument("--searched", type=Path, default=Path("docs/results/search-cpu-4prompts/search_bundled.json"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = config.bundled_config(PROMPTS[: args.prompts], steps=args.steps, device=args.device)
    model = loader.load_model(base)
    ref = reference.run(base, model, args.out / "run")
    samples = calibration_samples(model, base, ref, args.out / "run" / "embeddings")
    n, levels = model.layout(base.video).video_tokens, base.search.levels
    top = levels - 1
    schedules = {}
    for t in args.targets:
        for name, sched in fixed_schedules(t, args.steps, levels).items():
            schedules[f"{name} {t:.0%}"] = sched
    if args.searched.is_file():
        for row in json.loads(args.searched.read_text())["rows"]:
            if len(row["searched"]["schedule"]) == args.steps:
                schedules[f"searched {row['target']:.0%}"] = tuple(round(b * top) for b in row["searched"]["schedule"])
    d = model.transformer.config.num_attention_heads * model.transformer.config.attention_head_dim
    report = {"device": args.device, "steps": args.steps, "samples": len(samples), "hidden": d, "variants": {}}
    variants = [(f"sketch {dim}" if dim else "full", dim, "model") for dim in [0, *args.dims]]
    if args.float8:
        variants += [("float8 cache", 0, "float8")] + [(f"float8, sketch {dim}", dim, "float8") for dim in args.dims[-1:]]
    item = next(model.transformer.parameters()).element_size()
    for name, dim, cache in variants:
        cfg = dataclasses.replace(base, selection=config.SelectionSpec(delta="sketch" if dim else "full",
                                                                       sketch_dim=dim or 64, cache=cache))
        programs = build_programs(model, cfg, level_tokens(levels, n), progress=False)
        ev = Evaluator(model, cfg, programs, samples, levels, n, 0, share_prefixes=True)
        mse = ev.evaluate(list(schedules.values()), math.inf, Counters())
        report["variants"][name] = {
            "ref_values_per_row": dim or d, "ref_bytes_per_row": 4 * dim if dim else item * d,
            "cache_bytes_per_row": d + 4 if cache == "float8" else item * d,
            "psnr": {s: sum(psnr(v, samples[i].peak) for i, v in enumerate(mse[sched])) / len(samples)
                     for s, sched in schedules.items()}}
        (args.out / "sketch.json").write_text(json.dumps(report, indent=1))
        print(name, json.dumps(report["variants"][name]["psnr"]), flush=True)
    write_outputs(report, list(schedules), args.out)


def write_outputs(report: dict, names: list[str], out: Path) -> None:
    variants = report["variants"]
    full = variants["full"]["psnr"]
    lines = [f"Bundled reference model (hidden {report['hidden']}), {report['device']}, {report['steps']} steps, "
             f"{report['samples']} samples. PSNR against dense (dB); in brackets the change against full.", "",
             "| schedule | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
    for s in names:
        cells = [f"{v['psnr'][s]:.2f}" + ("" if k == "full" else f" ({v['psnr'][s] - full[s]:+.2f})") for k, v in variants.items()]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    mean = {k: sum(v["psnr"][s] - full[s] for s in names) / len(names) for k, v in variants.items()}
    lines.append("| mean change | " + " | ".join(f"{m:+.2f}" for m in mean.values()) + " |")
    lines.append("| reference state a row (bytes) | " + " | ".join(str(v["ref_bytes_per_row"]) for v in variants.values()) + " |")
    if any("cache_bytes_per_row" in v for v in variants.values()):
        lines.append("| cached output a row (bytes) | " + " | ".join(str(v.get("cache_bytes_per_row", "")) for v in variants.values())
                     + " |")
    md = "\n".join(lines) + "\n"
    (out / "sketch.md").write_text(md)
    print(md)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=110)
    width = 0.8 / len(variants)
    for j, (k, v) in enumerate(variants.items()):
        ax.bar([i + j * width for i in range(len(names))], [v["psnr"][s] for s in names], width, label=k)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("PSNR against dense (dB)")
    ax.set_ylim(bottom=min(v["psnr"][s] for v in variants.values() for s in names) - 2)
    ax.set_title("Delta from the full block input or a sketch of it; the cache's dtype", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sketch.png")
    plt.close(fig)


if __name__ == "__main__":
    main()
