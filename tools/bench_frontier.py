"""Astraea against the peers at equal speedup: quality from one astraea-bench report (the
bundled reference model: trained weights, so quality means something) and speed from
another (a real-size random-weight model on the GPU: speed does not depend on the weights),
joined by method and setting. Both runs must use the same steps, schedules and peer settings.

Speed of a row is the GPU report's speedup over its dense eager sample, except for peers
whose skipping depends on the data (first_block_cache, mag_cache: random weights make them
skip nothing or nearly everything). Theirs is projected from the quality run's block work
(the fraction of the dense blocks' Linear calls they made on the trained model): 1 / work,
an upper bound that ignores their overhead, so it favours them.

An Astraea schedule the GPU run did not sample is timed from that run's measured calls by
budget (each step at its budget's median call, plus the dense sample's time outside the
calls): on the ten schedules it did sample, this is within 0.2% of the measured time.

Astraea's quality at a peer's speedup is read off Astraea's front (the best PSNR reached at
that speedup or more, linear between measured schedules); the margin is Astraea minus peer.

    python3 tools/bench_frontier.py --quality docs/results/bench-bundled/bench.json \\
        --speed docs/results/bench-h100/s10/bench.json --out docs/results/bench-frontier
Writes frontier.json, frontier.md and frontier.png under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from astraea.plots import quality_of  # noqa: E402

DATA_DEPENDENT = ("first_block_cache", "mag_cache")


def front(points: list[tuple[float, float]]):
    """(speedup, psnr) points -> f(s): the best psnr at speedup >= s, linear between points
    of the upper front; None beyond the fastest point."""
    pts = sorted(points)
    hull = []  # the non-dominated points, by speedup: psnr falls as speedup rises
    for s, q in reversed(pts):
        if not hull or q > hull[-1][1]:
            hull.append((s, q))
    hull.reverse()

    def at(s: float):
        if s > hull[-1][0]:
            return None
        if s <= hull[0][0]:
            return hull[0][1]
        for (s0, q0), (s1, q1) in zip(hull, hull[1:]):
            if s0 <= s <= s1:
                return q0 + (q1 - q0) * (s - s0) / (s1 - s0)
        return None

    return at, hull


def predictor(speed: dict):
    """An Astraea schedule's eager sample time from the speed report's measured calls: each
    step at its budget's median call time, plus the dense sample's time outside the calls.
    None if a budget was never measured."""
    dense = next(r for r in speed["rows"] if r["method"] == "dense")
    steps = speed["setup"]["sampling"]["steps"]
    outside = dense["sample_ms"] - steps * dense["step_ms"]["dense"]
    calls: dict = {}
    for r in speed["rows"]:
        if r["method"] == "astraea":
            for label, ms in r["step_ms"].items():
                calls.setdefault(label, []).append(ms)
    median = {k: sorted(v)[len(v) // 2] for k, v in calls.items()}

    def sample_ms(budgets: list[float]):
        labels = [f"{b:.0%}" if b else "skip" for b in budgets]
        if any(label != "skip" and label not in median for label in labels):
            return None
        return sum(median.get(label, 0.0) for label in labels) + outside

    return sample_ms, dense["sample_ms"]


def join(quality: dict, speed: dict) -> list[dict]:
    fast = {(r["method"], r["setting"]): r for r in speed["rows"]}
    predict, dense_ms = predictor(speed)
    qn = quality["setup"]["video_tokens"]
    rows = []
    for r in quality["rows"]:
        if r["method"] in ("dense", "dense-compiled"):
            continue
        g = fast.get((r["method"], r["setting"]))
        if r["method"] in DATA_DEPENDENT:
            s, how = (1 / r["work_fraction"], "projected: 1 / block work on the trained model") \
                if r.get("work_fraction") else (None, "no block work recorded")
        elif g is not None:
            s, how = g["speedup"], "measured"
        elif r["method"] == "astraea" and predict([k / qn for k in r["tokens_per_step"]]):
            s = dense_ms / predict([k / qn for k in r["tokens_per_step"]])
            how = "predicted from the measured calls by budget"
        else:
            s, how = None, "not in the speed report"
        rows.append({"method": r["method"], "setting": r["setting"], "speedup": s, "speed": how,
                     "gpu_speedup": None if g is None else g["speedup"], "work_fraction": r.get("work_fraction"),
                     "psnr": quality_of(r), "ssim": r.get("ssim_pixels"), "psnr_latent": r["psnr_latent"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quality", type=Path, required=True)
    p.add_argument("--speed", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    quality, speed = json.loads(args.quality.read_text()), json.loads(args.speed.read_text())
    for key in ("steps", "guidance"):
        if quality["setup"]["sampling"][key] != speed["setup"]["sampling"][key]:
            sys.exit(f"bench_frontier: the reports differ in sampling.{key}: measure both with the same one")
    rows = join(quality, speed)
    astraea = [(r["speedup"], r["psnr"]) for r in rows if r["method"] == "astraea" and r["speedup"]]
    at, hull = front(astraea)
    for r in rows:
        if r["method"] != "astraea" and r["speedup"] is not None and math.isfinite(r["psnr"]):
            mine = at(r["speedup"])
            r["astraea_psnr"] = mine
            r["margin_db"] = None if mine is None else mine - r["psnr"]
    report = {"quality": str(args.quality), "speed": str(args.speed), "quality_setup": quality["setup"],
              "speed_setup": speed["setup"], "astraea_front": hull, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "frontier.json").write_text(json.dumps(report, indent=1))
    qs, ss = quality["setup"], speed["setup"]
    lines = [f"Quality: {qs['model']['preset']} ({qs['video']['width']}x{qs['video']['height']}x{qs['video']['frames']}, "
             f"{qs['samples']} samples, {qs['device']}); speed: {ss['model']['preset']} "
             f"({ss['video']['width']}x{ss['video']['height']}x{ss['video']['frames']}, {ss['device']}); "
             f"{qs['sampling']['steps']} steps, eager for every method. PSNR of decoded frames against dense.", "",
             "| method | setting | speedup | speed from | PSNR (dB) | SSIM | Astraea at that speedup (dB) | margin (dB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda x, f="{:.2f}": "-" if x is None else ("inf" if isinstance(x, float) and math.isinf(x) else f.format(x))  # noqa: E731
        lines.append(f"| {r['method']} | {r['setting']} | {fmt(r['speedup'], '{:.2f}x')} | {r['speed']} | "
                     f"{fmt(r['psnr'])} | {fmt(r['ssim'], '{:.3f}')} | {fmt(r.get('astraea_psnr'))} | "
                     f"{fmt(r.get('margin_db'), '{:+.2f}')} |")
    md = "\n".join(lines) + "\n"
    (args.out / "frontier.md").write_text(md)
    print(md)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    ax.plot(*zip(*hull), "-", color="C0", alpha=0.5, label="astraea front")
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        pts = [(r["speedup"], r["psnr"]) for r in rows if r["method"] == method and r["speedup"]
               and math.isfinite(r["psnr"])]
        if pts:
            ax.scatter(*zip(*pts), marker="o" if method == "astraea" else "^", color=f"C{i}",
                       label=method + (" (speed projected)" if method in DATA_DEPENDENT else ""))
    ax.set_xlabel(f"speedup over dense, eager ({ss['device']}, {ss['model']['preset']})")
    ax.set_ylabel("frame PSNR vs dense (dB), bundled model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "frontier.png")
    plt.close(fig)


if __name__ == "__main__":
    main()
