"""astraea-bench's report: bench.json, bench.md and the PNGs, merged across invocations.

A report is {"setup": ..., "rows": [...]}; the setup's key hashes the model, video,
sampling, device and torch. Rows of an earlier bench.json with the same key are kept
unless measured again, so a benchmark longer than one device call splits over several
invocations. The dense eager row and its final latents (the baseline of every speedup
and PSNR) are stored beside the report under that key and reused.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from . import plots
from .io import atomic_file, read_json, read_tensors, write_json
from .plots import quality_of

__all__ = ["markdown", "merge", "quality_of", "store_dense", "stored_dense", "write"]


def merge(path: Path, setup: dict, rows: list[dict]) -> dict:
    """This invocation's rows (dense first) and an earlier report's other rows, if it has
    the same setup."""
    if path.is_file():
        old = read_json(path, "move it away (or use another --out) to start a new report")
        if old.get("setup", {}).get("key") == setup["key"]:
            mine = {(r["method"], r["setting"]) for r in rows}
            rows = rows[:1] + [r for r in old["rows"] if (r["method"], r["setting"]) not in mine] + rows[1:]
    return {"setup": setup, "rows": rows}


def store_dense(folder: Path, key: str, row: dict, latents: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".dense-latents.tmp"
    save_file({name: t.contiguous() for name, t in latents.items()}, str(tmp), metadata={"key": key})
    tmp.replace(folder / "dense-latents.safetensors")
    write_json(folder / "dense-row.json", {"key": key, "row": row})


def stored_dense(folder: Path, key: str) -> tuple[dict, dict] | None:
    """The dense row and final latents an earlier invocation stored for this setup."""
    from safetensors import safe_open

    path, row = folder / "dense-latents.safetensors", folder / "dense-row.json"
    if not (path.is_file() and row.is_file()):
        return None
    with safe_open(str(path), "pt") as fh:
        if (fh.metadata() or {}).get("key") != key:
            return None
    stored = read_json(row, "delete it (and dense-latents.safetensors) to measure dense again")
    return (stored["row"], read_tensors(path, "delete it to measure dense again")) if stored.get("key") == key else None


def markdown(report: dict) -> str:
    s = report["setup"]
    v = s["video"]
    pixels = s["decoder"]
    head = (f"{s['model'].get('preset') or s['model'].get('checkpoint')} ({s['model']['family']}, "
            f"{s['model']['dtype']}), {v['width']}x{v['height']}x{v['frames']} ({s['video_tokens']} tokens), "
            f"{s['sampling']['steps']} steps, guidance {s['sampling']['guidance']}; {s['samples']} sample(s), "
            f"{s['repeats']} timed generation(s) each after warm-up; {s['device']}, torch {s['torch']}; {s['date']}. "
            f"Quality against the dense eager sample: {'decoded frames (PSNR, SSIM) and ' if pixels else ''}"
            "final latents (PSNR); no LPIPS (its backbone cannot be downloaded here). Block work: the fraction of "
            "the dense blocks' Linear calls a peer made (and of the rows through them, where a peer computes some "
            "rows of a call).\n\n")
    cols = ("| method | setting | mean budget | sample (ms) | speedup | block work | per call ms (by budget) | peak GiB "
            "| extra GiB |")
    cols += " PSNR pixels | SSIM | PSNR latents |\n" if pixels else " PSNR latents |\n"
    sep = "|---" * (cols.count("|") - 1) + "|\n"
    lines = []
    for r in report["rows"]:
        calls = ", ".join(f"{k}: {v:.1f}" for k, v in r["step_ms"].items())
        budget = "-" if r["mean_budget"] is None else f"{r['mean_budget']:.2f}"
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        extra = "-" if r.get("extra_peak_gib") is None else f"{r['extra_peak_gib']:+.2f}"
        q = f" {_db(r['psnr_pixels'])} | {_num(r['ssim_pixels'])} | {_db(r['psnr_latent'])} |" if pixels else \
            f" {_db(r['psnr_latent'])} |"
        work = "-" if r.get("work_fraction") is None else f"{r['work_fraction']:.2f}"
        rows = r.get("row_work_fraction")
        if rows is not None and abs(rows - r["work_fraction"]) > 0.005:
            work += f" (rows {rows:.2f})"
        lines.append(f"| {r['method']} | {r['setting']} | {budget} | {r['sample_ms']:.0f} | {r['speedup']:.2f}x | {work} | "
                     f"{calls} | {peak} | {extra} |{q}")
    return head + cols + sep + "\n".join(lines) + "\n"


def _db(x) -> str:
    return "-" if x is None else ("inf" if math.isinf(x) else f"{x:.2f}")


def _num(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def write(report: dict, folder: Path, with_plots: bool = True) -> None:
    write_json(folder / "bench.json", report)
    with atomic_file(folder / "bench.md") as fh:
        fh.write(markdown(report))
    if with_plots:
        plots.bench_report(report, folder)
