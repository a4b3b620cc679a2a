"""The bundled models' flow-matching loss at fixed noise levels: where each has learned.

Each shipped model (Wan's and the STDiT3 one, or a file given with --stdit3) is asked for its
training target on the same rendered training videos, noise and captions at each noise level
sigma (x = (1 - sigma) x0 + sigma noise), the mean squared error over the batch. The noise
level is the actual one, so the numbers compare across the two models whatever shift each was
trained and is sampled at: high noise is where a sample's shape and motion are decided.
Writes sigma_loss.json, sigma_loss.md and sigma_loss.png under --out (CPU, about a minute):

    python tools/measure_sigma_loss.py --out docs/reference-model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_reference import Objective, render_pool  # noqa: E402

from astraea import bundled  # noqa: E402
from astraea.io import atomic_file, write_json  # noqa: E402

SIGMAS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)


def sigma_losses(family: str, weights: Path, x0, captions, noise) -> list[float]:
    objective = Objective(family, torch.device("cpu"), 0)
    model = objective.model.eval().requires_grad_(False)
    _, text, _ = bundled.load_model(model, torch.device("cpu"), torch.float32, weights)
    with torch.no_grad():
        return [objective.loss(model, text, captions, x0, noise, torch.full((len(x0),), s)).item() for s in SIGMAS]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--videos", type=int, default=32)
    p.add_argument("--stdit3", type=Path, default=bundled.STDIT3_WEIGHTS, help="the STDiT3 weights file")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    pool, captions = render_pool(args.videos, 0, torch.device("cpu"))
    x0 = pool.float()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    rows = {"wan": sigma_losses("wan", bundled.WEIGHTS, x0, captions, noise),
            "opensora": sigma_losses("opensora", args.stdit3, x0, captions, noise)}
    result = {"sigmas": list(SIGMAS), "videos": args.videos, "loss": rows, "stdit3_weights": str(args.stdit3),
              "stdit3_transform_scale": bundled.transform_scale(args.stdit3)}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "sigma_loss.json", result)
    lines = ["| model | " + " | ".join(f"{s:g}" for s in SIGMAS) + " |", "|---" * (len(SIGMAS) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{v:.4f}" for v in vals) + " |" for name, vals in rows.items()]
    with atomic_file(args.out / "sigma_loss.md") as fh:
        fh.write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for name, vals in rows.items():
        ax.plot(SIGMAS, vals, marker="o", label={"wan": "Wan (bundled)", "opensora": "STDiT3 (bundled)"}[name])
    ax.set_xlabel("noise level sigma")
    ax.set_ylabel("flow-matching MSE")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(args.out / "sigma_loss.png", "wb") as fh:
        fig.savefig(fh, format="png")
    plt.close(fig)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
