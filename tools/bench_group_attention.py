"""Benchmark astraea::group_attention on a GPU: factored attention's query-only form.

At Open-Sora v1.2's paper size (STDiT3-XL/2, 480x848x51: 15 latent frames x 1,590 tokens,
16 heads x 72) and budgets k/N 10% ... 100%, each implementation is first checked against
float32 factored attention on every row at the selected rows, then timed (do_bench, median,
warm-up first):
  varlen    one variable-length flash-attention call, a frame a sequence (spatial only)
  scatter   the queries scattered into N rows, factored attention on every row, rows gathered
  every_row astraea::factored_attention on all N rows (what the rewrite ran before: the dense op)
  auto      the op's own choice (`group_attention.backend`)
Where varlen stops paying is the op's VARLEN_BELOW. Writes bench_group_attention.json,
.md and .png under --out.

    python3 tools/bench_group_attention.py --out $OUT/group
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import astraea.plugins  # noqa: E402,F401
from astraea.plots import pyplot, save_png  # noqa: E402
from astraea.plugins import group_attention as ga  # noqa: E402

SHAPES = {  # name: (batch, heads, frames, tokens a frame, head dim)
    "stdit3-xl-2 480x848x51": (2, 16, 15, 1590, 72),
}
BUDGETS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def forced(name: str, fn):
    """fn with the op's implementation forced to `name` (read when the op runs)."""
    def run():
        with mock.patch.dict(os.environ, {"ASTRAEA_GROUP_ATTENTION": name}):
            return fn()
    return run


def rows_for(name: str, shape, budgets, temporal: bool) -> list[dict]:
    b, h, frames, s, d = shape
    n = frames * s
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    rows = []
    for frac in budgets:
        m = max(1, round(frac * n))
        idx = torch.sort(torch.stack([torch.randperm(n, device="cuda")[:m] for _ in range(b)]), dim=-1).values
        q_sel = q.gather(2, idx[:, None, :, None].expand(b, h, m, d))
        # the reference: float32 factored attention on every row (grouped by views), the selected rows
        full, full_lse = torch.ops.astraea.factored_attention(q.float(), k.float(), v.float(), frames, temporal)
        ref = full.gather(2, idx[:, None, :, None].expand(b, h, m, d))
        ref_lse = full_lse.gather(2, idx[:, None, :].expand(b, h, m))
        del full, full_lse
        row = {"shape": name, "temporal": temporal, "budget": frac, "k": m, "n": n,
               "auto_backend": ga.backend(q_sel, n, temporal)}
        variants = {"scatter": forced("scatter", lambda: ga.group_attention(q_sel, k, v, idx, frames, temporal)),
                    "auto": lambda: ga.group_attention(q_sel, k, v, idx, frames, temporal),
                    "every_row": lambda: torch.ops.astraea.factored_attention(q, k, v, frames, temporal)}
        if not temporal:
            variants["varlen"] = forced("varlen", lambda: ga.group_attention(q_sel, k, v, idx, frames, temporal))
        for key, fn in variants.items():
            if key != "every_row":
                out, lse = fn()
                row[f"{key}_rel_err"] = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                row[f"{key}_lse_err"] = (lse - ref_lse).abs().max().item()
            row[f"{key}_ms"] = bench(fn)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"Card: {device}, torch {torch.__version__}; bf16, batch 2 (CFG); median of do_bench; errors against "
             "float32 factored attention on every row, at the selected rows.", "",
             "| shape | groups | k/N | varlen (ms) | scatter (ms) | every row (ms) | auto: choice, ms | auto vs every row "
             "| max rel. error |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        errs = max(v for key, v in r.items() if key.endswith("_rel_err"))
        lines.append(f"| {r['shape']} | {'temporal' if r['temporal'] else 'spatial'} | {r['budget']:.1f} | "
                     f"{r.get('varlen_ms', float('nan')):.3f} | {r['scatter_ms']:.3f} | {r['every_row_ms']:.3f} | "
                     f"{r['auto_backend']}, {r['auto_ms']:.3f} | {r['every_row_ms'] / r['auto_ms']:.2f}x | {errs:.1e} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    for ax, temporal in zip(axes, (False, True)):
        sub = [r for r in rows if r["temporal"] == temporal]
        for key, style in (("varlen", "-o"), ("scatter", "--s"), ("every_row", ":^"), ("auto", "-.x")):
            pts = [(r["budget"], r[f"{key}_ms"]) for r in sub if f"{key}_ms" in r]
            if pts:
                ax.plot(*zip(*pts), style, ms=3, label=key)
        ax.set_title(f"{sub[0]['shape']}: {'temporal' if temporal else 'spatial'} groups", fontsize=9)
        ax.set_xlabel("budget k/N")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_png(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budgets", type=float, nargs="*", default=BUDGETS)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rows = [r for name, shape in SHAPES.items() for temporal in (False, True)
            for r in rows_for(name, shape, args.budgets, temporal)]
    device = torch.cuda.get_device_name()
    (args.out / "bench_group_attention.json").write_text(json.dumps(
        {"device": device, "torch": torch.__version__, "varlen_below": ga.VARLEN_BELOW, "rows": rows}, indent=1))
    md = markdown(rows, device)
    (args.out / "bench_group_attention.md").write_text(md)
    plot(rows, args.out / "bench_group_attention.png")
    print(md)


if __name__ == "__main__":
    main()
