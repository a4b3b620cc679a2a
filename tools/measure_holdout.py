"""Schedules scored on a config's own samples and on the prompts and seeds it holds out.

Each schedule of a JSON file ({name: [budget per step, ...]}, e.g. the shipped
docs/results/search-cpu-50steps/searched-schedules.json, or a schedule.json's
`budget_per_step`) is sampled with the config's rewritten programs through the search's own
evaluator: PSNR of the final latents against dense, the mean over the config's prompts x
seeds (what the search optimised) and over every unseen pair of `search.holdout_prompts` /
`holdout_seeds` (what it never saw), and the drop between them. One evaluator for all, so
schedules searched on different machines compare on equal terms.
Writes holdout.json and holdout.md under --out.

    python tools/measure_holdout.py tools/configs/search-bundled-paper.yaml --device cpu \\
        --schedules docs/results/search-cpu-50steps/searched-schedules.json --out /tmp/holdout

With `--validate`, a validation split is tried on the result (or on an earlier holdout.json
given as `--from`): for each split (held-out sample names joined by commas), the schedule a
search would choose on its own samples plus the split (the mean PSNR over both), against the
one it chooses on its own samples alone, each scored on the held-out samples outside the
split (validation.json, validation.md):

    python tools/measure_holdout.py --from docs/results/validation-cpu/holdout.json \\
        --validate p0_s1,p1_s1 p2_s0,p2_s1 p2_s0,p3_s0 --out docs/results/validation-cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from astraea import config, loader, reference  # noqa: E402
from astraea.fitness import Counters, Evaluator, calibration_samples  # noqa: E402
from astraea.metrics import psnr  # noqa: E402
from astraea.schedule import level_tokens  # noqa: E402
from astraea.search import holdout  # noqa: E402
from astraea.tokenwise import build_programs  # noqa: E402


def schedules_of(path: Path) -> dict[str, list[float]]:
    """{name: budgets}: a {name: budgets} file, or a schedule.json (its budget_per_step)."""
    raw = json.loads(path.read_text())
    if "budget_per_step" in raw:
        return {path.parent.name: raw["budget_per_step"]}
    return {name: list(v) for name, v in raw.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, nargs="?", help="model.yaml with search.holdout_prompts and/or holdout_seeds")
    p.add_argument("--schedules", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", help="model.device instead of the config's")
    p.add_argument("--validate", nargs="+", default=[], metavar="SAMPLES",
                   help="validation splits to try, each held-out sample names joined by commas (p0_s1,p1_s1)")
    p.add_argument("--from", dest="source", type=Path, help="an earlier holdout.json instead of sampling")
    args = p.parse_args()
    if args.source is not None:
        report = json.loads(args.source.read_text())
    elif args.config is None or not args.schedules:
        sys.exit("give a config and --schedules, or --from an earlier holdout.json")
    else:
        report = measure(args)
    if args.validate:
        validation(report, [split.split(",") for split in args.validate], args.out)


def validation(report: dict, splits: list[list[str]], out: Path) -> None:
    """Per split: the search's choice on its own samples alone and on them plus the split,
    each scored on the held-out samples outside the split."""
    out.mkdir(parents=True, exist_ok=True)
    rows, own = report["rows"], len(report["samples"])
    held = list(rows[0]["holdout"])
    results = []
    for split in splits:
        unknown = [x for x in split if x not in held]
        if unknown:
            sys.exit(f"--validate: {', '.join(unknown)} not among the held-out samples ({', '.join(held)})")
        test = [x for x in held if x not in split]

        def with_split(r: dict, split=split) -> float:
            return (r["psnr"] * own + sum(r["holdout"][x] for x in split)) / (own + len(split))

        def on_test(r: dict, test=test) -> float:
            return sum(r["holdout"][x] for x in test) / len(test)

        alone, validated = max(rows, key=lambda r: r["psnr"]), max(rows, key=with_split)
        best = max(rows, key=on_test)
        results.append({"split": split, "test": test, "alone": alone["name"], "alone_test_psnr": on_test(alone),
                        "validated": validated["name"], "validated_test_psnr": on_test(validated),
                        "best_on_test": best["name"], "best_test_psnr": on_test(best)})
    (out / "validation.json").write_text(json.dumps({"source": report.get("config"), "splits": results}, indent=1))
    lines = ["| validation split | test samples | chosen on its own samples: test dB | with the split: test dB | "
             "best of the candidates on test |", "|---|---|---|---|---|"]
    lines += [f"| {', '.join(r['split'])} | {len(r['test'])} | {r['alone']}: {r['alone_test_psnr']:.2f} | "
              f"{r['validated']}: {r['validated_test_psnr']:.2f} | {r['best_on_test']}: {r['best_test_psnr']:.2f} |"
              for r in results]
    (out / "validation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def measure(args) -> dict:
    cfg = config.load(args.config)
    if args.device:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device=args.device))
    if not (cfg.search.holdout_prompts or cfg.search.holdout_seeds):
        sys.exit(f"{args.config}: set search.holdout_prompts or search.holdout_seeds")
    levels = cfg.search.levels
    schedules = {}
    for path in args.schedules:
        for name, budgets in schedules_of(path).items():
            cand = tuple(round(b * (levels - 1)) for b in budgets)
            if len(cand) != cfg.sampling.steps or any(abs(c / (levels - 1) - b) > 1e-6 for c, b in zip(cand, budgets)):
                sys.exit(f"{path}: {name!r} is not {cfg.sampling.steps} budgets on search.levels {levels}")
            schedules[name] = cand
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "run"
    model = loader.load_model(cfg)
    ref = reference.run(cfg, model, work)
    n = model.layout(cfg.video).video_tokens
    programs = build_programs(model, cfg, level_tokens(levels, n))
    samples = calibration_samples(model, cfg, ref, work / "embeddings")
    ev = Evaluator(model, cfg, programs, samples, levels, n, 0, False)
    rows = []
    for name, cand in schedules.items():
        mse = ev.evaluate([cand], math.inf, Counters())[cand]
        own = sum(psnr(v, x.peak) for v, x in zip(mse, samples)) / len(samples)
        held = holdout(cfg, model, programs, cand, work, own, progress=False)
        rows.append({"name": name, "mean_budget": sum(cand) / ((levels - 1) * len(cand)), "psnr": own,
                     "holdout_psnr": held["psnr"], "drop_db": held["drop_db"], "holdout": held["per_sample"]})
        print(json.dumps({k: rows[-1][k] for k in ("name", "mean_budget", "psnr", "holdout_psnr")}), flush=True)
    report = {"config": str(args.config), "device": str(model.device), "steps": cfg.sampling.steps,
              "samples": [x.name for x in samples], "rows": rows}
    (args.out / "holdout.json").write_text(json.dumps(report, indent=1))
    lines = [f"{args.config}, {report['device']}, {cfg.sampling.steps} steps; PSNR of the final latents against dense "
             f"(mean over samples).", "",
             "| schedule | mean budget | search's samples (dB) | held out (dB) | drop (dB) |", "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['mean_budget']:.3f} | {r['psnr']:.2f} | {r['holdout_psnr']:.2f} | {r['drop_db']:.2f} |"
              for r in rows]
    (args.out / "holdout.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
