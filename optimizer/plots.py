"""The PNGs people compare: the search's progress and front, the chosen schedule, and
astraea-bench's latency and quality plots. Plain data in (no stage objects), written
atomically; matplotlib with the Agg backend (no screen)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from .io import atomic_file


def pyplot():
    """matplotlib.pyplot on the Agg backend (no screen); tools use it too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> None:
    """`fig` as a PNG at `path`, written atomically, then closed."""
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png")
    pyplot().close(fig)


def search_progress(path: Path, history: list[dict], evaluated: list[tuple[float, float]], chosen: tuple[float, float],
                    band: tuple[float, float], budget_axis: bool, proxy: dict | None = None) -> None:
    """Best and mean fitness per generation; every fully evaluated schedule's PSNR against
    its cost (`evaluated`: (cost, PSNR)), the chosen one and the target band; with a proxy,
    the re-scored candidates' PSNR at the full video against the proxy's."""
    plt = pyplot()
    panels = 3 if proxy is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8), dpi=110)
    a, b = axes[0], axes[1]
    gens = [h["generation"] for h in history]
    a.plot(gens, [h["best_mse"] for h in history], "-o", ms=3, label="best")
    a.plot(gens, [h["mean_mse"] for h in history], "--", label="population mean")
    refine = (proxy or {}).get("refine")
    if refine:  # its generations continue the proxy's, in the full video's MSE
        last = gens[-1] if gens else 0
        a.plot([last + h["generation"] for h in refine["history"]], [h["best_mse"] for h in refine["history"]], "-o",
               ms=3, c="tab:red", label="best, refined at the full video")
    a.set_yscale("log")
    a.set_xlabel("generation")
    a.set_ylabel("MSE against dense")
    a.grid(alpha=0.3)
    a.legend()
    if evaluated:
        b.scatter(*zip(*evaluated), s=6, alpha=0.5, label="evaluated")
    b.scatter([chosen[0]], [chosen[1]], s=40, c="red", label="chosen")
    b.axvspan(*band, color="green", alpha=0.08, label="target band")
    b.set_xlabel("mean budget" if budget_axis else "predicted ms")
    b.set_ylabel("PSNR against dense (dB)" + (" at the proxy video" if proxy is not None else ""))
    b.grid(alpha=0.3)
    b.legend(fontsize=8)
    if proxy is not None:
        ax = axes[2]
        labels = {"best": "proxy's best", "spread": "spread over its ranking", "seed": "hand-made seeds"}
        for (role, label), colour in zip(labels.items(), ("tab:red", "tab:blue", "tab:green")):
            rows = [x for x in proxy["candidates"] if x["role"] == role]
            if rows:
                ax.scatter([x["proxy_psnr"] for x in rows], [x["psnr"] for x in rows], s=14, c=colour, label=label)
        if refine:
            ax.axhline(refine["psnr"], ls="--", c="tab:red", lw=1,
                       label=f"refined at the full video: {refine['psnr']:.2f} dB")
        ax.set_xlabel(f"PSNR at the proxy video {'x'.join(map(str, proxy['video']))} (dB)")
        ax.set_ylabel("PSNR at the full video (dB)")
        ax.set_title(f"Spearman {proxy['spearman']:.2f} over {proxy['rescored']} candidates", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def schedule_bars(path: Path, budgets: list[float], mean: float, psnr: float) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3), dpi=110)
    ax.bar(range(len(budgets)), budgets, color="tab:blue")
    ax.axhline(mean, ls="--", color="grey", label=f"mean {mean:.2f}")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("budget k/N")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"searched schedule: PSNR {psnr:.2f} dB against dense", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def quality_of(row: dict) -> float:
    """A bench row's headline quality: pixel PSNR where frames were decoded, else latent PSNR."""
    return row["psnr_pixels"] if row.get("psnr_pixels") is not None else row["psnr_latent"]


def bench_report(report: dict, folder: Path) -> None:
    """latency-vs-budget.png, quality-vs-speedup.png and step-latency.png of a bench report."""
    plt = pyplot()
    rows, s = report["rows"], report["setup"]
    title = (f"{s['model'].get('preset') or 'checkpoint'}, {s['video']['width']}x{s['video']['height']}x"
             f"{s['video']['frames']}, {s['sampling']['steps']} steps; {s['device']}")

    def finish(fig, ax, name: str, xlabel: str, ylabel: str) -> None:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        save_png(fig, folder / name)

    def dense_lines(ax, value) -> None:
        for r in rows:
            if r["method"] in ("dense", "dense-compiled"):
                ax.axhline(value(r), color="k", linestyle="--" if r["method"] == "dense" else ":", label=r["method"])

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for method, style in (("astraea", "-o"), ("astraea-compiled", "-s")):
        pts = sorted((r["mean_budget"], r["sample_ms"] / 1e3) for r in rows if r["method"] == method)
        if pts:
            ax.plot(*zip(*pts), style, label=method)
    dense_lines(ax, lambda r: r["sample_ms"] / 1e3)
    finish(fig, ax, "latency-vs-budget.png", "mean budget (fraction of tokens computed)", "seconds a sample")

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for method in dict.fromkeys(r["method"] for r in rows if not r["method"].startswith("dense")):
        pts = sorted((r["speedup"], quality_of(r)) for r in rows if r["method"] == method
                     and math.isfinite(quality_of(r)))
        if pts:
            ax.plot(*zip(*pts), "-o" if method.startswith("astraea") else "--^", label=method)
    finish(fig, ax, "quality-vs-speedup.png", "speedup over the dense eager sample",
           ("pixel" if s["decoder"] else "latent") + " PSNR against dense (dB)")

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for method, style in (("astraea", "o"), ("astraea-compiled", "s")):
        pts: dict[float, list[float]] = {}
        for r in rows:
            if r["method"] == method:
                for label, ms in r["step_ms"].items():
                    if label.endswith("%"):
                        pts.setdefault(float(label[:-1]) / 100, []).append(ms)
        if pts:
            xs = sorted(pts)
            ax.plot(xs, [statistics.median(pts[x]) for x in xs], "-" + style, label=method)
    dense_lines(ax, lambda r: r["step_ms"][r["method"]])
    finish(fig, ax, "step-latency.png", "budget of the step", "ms a transformer call")
