"""FP8 on the bundled model: which groups of Linear layers FP8 costs most, and what it costs the
searched schedules (build.precision fp8; quality needs a trained model, so this is where it is
measured; speed is the GPU's, tools/bench_step.py --precision fp8 and astraea-bench).

For each scaling scheme (channel, tensor) the build's own selection (`build.fp8_keep: auto`:
each group alone, then the most groups that keep the dense FP8 model at build.fp8_min_psnr)
on the config's prompts; then every schedule of --schedules sampled with the model's own
programs and with the FP8 model's, PSNR of the final latents against the dense reference.
Writes fp8.json, fp8.md and fp8.png (PSNR per schedule, model dtype against FP8).

    python tools/measure_fp8.py --out docs/results/fp8-cpu --steps 50 \\
        --schedules docs/results/search-cpu-50steps/searched-schedules.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from astraea import config, loader, quantize, reference  # noqa: E402
from astraea.fitness import calibration_samples, schedule_psnrs  # noqa: E402
from astraea.schedule import read_schedules  # noqa: E402

PROMPTS = ["a red circle moving left over a striped background", "a green ring growing over a gradient background"]


def schedule_psnr(model, cfg, samples, schedules: dict) -> dict[str, float]:
    """Mean PSNR of each schedule."""
    return {name: sum(v) / len(v) for name, v in schedule_psnrs(model, cfg, samples, schedules.items()).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--schedules", type=Path, required=True, help="{name: [budget per step]} or a schedule.json")
    p.add_argument("--schemes", nargs="+", default=["channel", "tensor"], choices=("channel", "tensor"))
    p.add_argument("--min-psnr", type=float, default=40.0, help="build.fp8_min_psnr")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = config.bundled_config(PROMPTS, steps=args.steps)
    model = loader.load_model(base)
    n = model.layout(base.video).video_tokens
    ref = reference.run(base, model, args.out / "run", progress=False)
    samples = calibration_samples(model, base, ref, args.out / "run" / "embeddings")
    schedules = read_schedules(args.schedules, args.steps, n)
    report = {"steps": args.steps, "prompts": PROMPTS, "min_psnr": args.min_psnr,
              "model_dtype": schedule_psnr(model, base, samples, schedules), "schemes": {}}
    for scheme in args.schemes:
        cfg = dataclasses.replace(base, build=dataclasses.replace(base.build, precision="fp8", fp8_scaling=scheme,
                                                                  fp8_min_psnr=args.min_psnr))
        q = quantize.run(cfg, model, ref, args.out / "run", progress=False)
        report["schemes"][scheme] = {"record": q.record, "schedules": schedule_psnr(q.model, cfg, samples, schedules)}
        (args.out / "fp8.json").write_text(json.dumps(report, indent=1))
        print(json.dumps({scheme: report["schemes"][scheme]["schedules"], "kept": q.record["kept"]}), flush=True)
    write(report, args.out)


def write(report: dict, out: Path) -> None:
    lines = [f"Bundled model, {report['steps']} steps, {len(report['prompts'])} prompts; PSNR of the final latents "
             "against the dense model (fp32), each schedule sampled with the model's own programs and with the FP8 "
             "model's.", "", "| schedule | model dtype (dB) | " + " | ".join(
                 f"FP8 {s} (dB) | loss" for s in report["schemes"]) + " |",
             "|---" * (2 + 2 * len(report["schemes"])) + "|"]
    for name, base in report["model_dtype"].items():
        cells = " | ".join(f"{r['schedules'][name]:.2f} | {base - r['schedules'][name]:+.2f}"
                           for r in report["schemes"].values())
        lines.append(f"| {name} | {base:.2f} | {cells} |")
    lines.append("")
    for scheme, r in report["schemes"].items():
        rec = r["record"]
        sens = ", ".join(f"{g} {v:.1f}" for g, v in sorted((rec.get("sensitivity") or {}).items(), key=lambda x: x[1]))
        lines.append(f"- {scheme}: quantized {', '.join(rec['quantized']) or 'none'}; kept {', '.join(rec['kept']) or 'none'};"
                     f" dense FP8 {rec['psnr']:.2f} dB (min {rec['min_psnr']}); each group alone: {sens}")
    (out / "fp8.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["model_dtype"])
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    width = 0.8 / (1 + len(report["schemes"]))
    ax.bar([i for i in range(len(names))], [report["model_dtype"][x] for x in names], width, label="model dtype")
    for j, (scheme, r) in enumerate(report["schemes"].items(), start=1):
        ax.bar([i + j * width for i in range(len(names))], [r["schedules"][x] for x in names], width, label=f"FP8 {scheme}")
    ax.set_xticks([i + width * len(report["schemes"]) / 2 for i in range(len(names))], names, fontsize=7)
    ax.set_ylabel("PSNR against dense (dB)")
    ax.set_title("FP8 engines' quality on the bundled model", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "fp8.png")
    plt.close(fig)


if __name__ == "__main__":
    main()
