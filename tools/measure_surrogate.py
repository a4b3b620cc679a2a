"""Could a surrogate model of a schedule's loss screen the search's children? (issue: a cheaper fitness)

Reads finished searches' checkpoints (state.json: every candidate evaluated, in the order the
evolution evaluated it, and the per-generation history) and replays them: before each
generation g (from the third), a surrogate is fitted on every candidate evaluated before g
and predicts the candidates that g evaluated. Reported per surrogate, over generations:
Spearman's rank correlation between predicted and measured log-MSE, and the screening
recall (of g's best 5 measured candidates, how many are in the surrogate's best half of g:
what a search that evaluates only that half would keep; 2.5 of 5 is chance).

Surrogates (numpy, the levels of steps 2.. as features; step 1 is always dense):
  ridge-onehot  ridge regression on one indicator per (step, level)
  ridge-level   ridge regression on each step's level and its square
  knn-l1        mean of the 5 nearest evaluated schedules (L1 distance over levels),
                weighted 1 / (1 + distance)

Writes surrogate.json, surrogate.md and surrogate.png under --out.

    python tools/measure_surrogate.py --out docs/results/surrogate-cpu \\
        docs/results/search-paper-cpu/{40,50,70}/state.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from astraea.io import write_json  # noqa: E402
from astraea.metrics import spearman  # noqa: E402
from astraea.plots import pyplot, save_png  # noqa: E402

TOP, FIRST, RIDGE, NEIGHBOURS = 5, 3, 3.0, 5


def load(path: Path) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Schedules (candidates x steps), mean MSE (inf: stopped early) and the cumulative
    candidate count after each generation."""
    raw = json.loads(path.read_text())
    n = len(raw["sample_order"])
    schedules = np.array([[int(v) for v in k.split(",")] for k in raw["memo"]])
    mse = np.array([float(np.mean(v)) if len(v) == n else math.inf for v in raw["memo"].values()])
    return schedules, mse, [h["candidates"] for h in raw["history"]]


def _ridge(a: np.ndarray, b: np.ndarray, test: np.ndarray) -> np.ndarray:
    mu = b.mean()
    w = np.linalg.solve(a.T @ a + RIDGE * np.eye(a.shape[1]), a.T @ (b - mu))
    return test @ w + mu


def onehot(x: np.ndarray, levels: int) -> np.ndarray:
    return (x[:, 1:, None] == np.arange(levels)).reshape(len(x), -1).astype(float)


def predict(name: str, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, levels: int) -> np.ndarray:
    if name == "ridge-onehot":
        return _ridge(onehot(train_x, levels), train_y, onehot(test_x, levels))
    if name == "ridge-level":
        f = lambda x: np.c_[x[:, 1:], x[:, 1:] ** 2].astype(float)  # noqa: E731
        return _ridge(f(train_x), train_y, f(test_x))
    if name == "knn-l1":
        d = np.abs(test_x[:, None, 1:] - train_x[None, :, 1:]).sum(-1)
        idx = np.argsort(d, axis=1)[:, :NEIGHBOURS]
        w = 1.0 / (1.0 + np.take_along_axis(d, idx, 1))
        return (train_y[idx] * w).sum(1) / w.sum(1)
    raise ValueError(name)


SURROGATES = ("ridge-onehot", "ridge-level", "knn-l1")


def replay(x: np.ndarray, mse: np.ndarray, cumulative: list[int]) -> dict:
    levels = int(x.max()) + 1
    log_mse = np.log(mse)
    out = {name: {"spearman": [], "recall": []} for name in SURROGATES}
    out["generations"] = []
    for g in range(FIRST, len(cumulative)):
        before = np.arange(cumulative[g - 1])
        before = before[np.isfinite(log_mse[before])]
        now = np.arange(cumulative[g - 1], cumulative[g])
        now = now[np.isfinite(log_mse[now])]  # stopped early: no exact value to rank against
        if len(now) < 2 * TOP:
            continue
        out["generations"].append(g)
        best = set(now[np.argsort(log_mse[now])[:TOP]].tolist())
        for name in SURROGATES:
            p = predict(name, x[before], log_mse[before], x[now], levels)
            out[name]["spearman"].append(spearman(p.tolist(), log_mse[now].tolist()))
            kept = set(now[np.argsort(p)[: len(now) // 2]].tolist())
            out[name]["recall"].append(len(best & kept))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("states", type=Path, nargs="+", help="finished searches' state.json")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    report = {"top": TOP, "ridge": RIDGE, "neighbours": NEIGHBOURS, "searches": {}}
    for path in args.states:
        if not path.is_file():
            sys.exit(f"measure_surrogate: {path} is not a search's state.json (give finished searches' checkpoints)")
        x, mse, cumulative = load(path)
        report["searches"][str(path)] = {"candidates": len(x), **replay(x, mse, cumulative)}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "surrogate.json", report)
    lines = [f"Surrogates replayed over finished searches: each generation's candidates predicted from every earlier "
             f"one; Spearman of predicted vs measured log-MSE (mean over generations, and over the last 5), and how "
             f"many of the generation's best {TOP} the surrogate's best half keeps ({TOP / 2:.1f} is chance).", "",
             "| search | candidates | surrogate | Spearman (mean) | Spearman (last 5) | best 5 kept by half |",
             "|---|---|---|---|---|---|"]
    for path, r in report["searches"].items():
        for name in SURROGATES:
            s, k = r[name]["spearman"], r[name]["recall"]
            lines.append(f"| {path} | {r['candidates']} | {name} | {np.mean(s):.2f} | {np.mean(s[-5:]):.2f} | "
                         f"{np.mean(k):.1f} |")
    (args.out / "surrogate.md").write_text("\n".join(lines) + "\n")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(report["searches"]), figsize=(5 * len(report["searches"]), 3.6), squeeze=False)
    for ax, (path, r) in zip(axes[0], report["searches"].items()):
        for name in SURROGATES:
            ax.plot(r["generations"], r[name]["spearman"], marker=".", label=name)
        ax.axhline(0, color="grey", lw=0.5)
        name = Path(path).parent.name
        ax.set_title(f"search at {name}%" if name.isdigit() else path, fontsize=9)
        ax.set_xlabel("generation")
        ax.set_ylabel("Spearman, predicted vs measured")
        ax.set_ylim(-1, 1)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, args.out / "surrogate.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
