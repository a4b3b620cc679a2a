"""One Wan 2.1 1.3B-size block, dense against hand-wired token-wise at budgets 10% ... 100%.

The token-wise block is `astraea.handwired.wan_block_tokenwise` (the three astraea ops wired
by hand); its latency is fitted as a + b*k (least squares): a is the fixed cost (K/V over
all N rows, selection), b the cost per recomputed row. Peak memory is measured per variant
over the block's inputs and state. Writes bench_block.json / .md / .png under --out, the JSON
after every budget so a cut-off run keeps what it measured.

    python3 tools/bench_block.py --out $OUT/block [--frames 65]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from astraea.families import get_family  # noqa: E402
from astraea.handwired import BlockState, wan_block_tokenwise  # noqa: E402


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def peak_gb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--frames", type=int, default=65)
    p.add_argument("--budgets", type=float, nargs="*", default=[0.1 * i for i in range(1, 11)])
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    fam = get_family("wan")
    preset = fam.preset("wan2.1-t2v-1.3b")
    config = dict(preset.config, num_layers=1)
    model = fam.build_random(type(preset)("one-block", config, 512, preset.video), torch.device("cuda"), torch.bfloat16, 0)
    captured = {}
    model.blocks[0].register_forward_pre_hook(lambda m, a, kw: captured.update(args=a), with_kwargs=True)
    lat = torch.randn(2, 16, (args.frames - 1) // 4 + 1, 60, 104, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        model(lat, torch.tensor([500.0, 500.0], device="cuda"), torch.randn(2, 512, 4096, device="cuda", dtype=torch.bfloat16))
    x, enc, temb, rope = captured["args"]
    block, n = model.blocks[0], x.shape[1]
    state = BlockState.empty(x)
    with torch.no_grad():
        wan_block_tokenwise(block, x, enc, temb, rope, state, n)  # a dense first step fills the state
        dense_ms = bench(lambda: block(x, enc, temb, rope))
        dense_gb = peak_gb(lambda: block(x, enc, temb, rope))
        result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": n, "batch": 2,
                  "dense_ms": dense_ms, "dense_peak_gb": dense_gb, "budgets": []}
        x2 = x + 0.05 * torch.randn_like(x)
        for frac in args.budgets:
            k = max(1, round(frac * n))
            ms = bench(lambda: wan_block_tokenwise(block, x2, enc, temb, rope, state, k))
            gb = peak_gb(lambda: wan_block_tokenwise(block, x2, enc, temb, rope, state, k))
            result["budgets"].append({"budget": frac, "k": k, "ms": ms, "peak_gb": gb})
            print(f"k/N={frac:.1f} {ms:.2f} ms (dense {dense_ms:.2f}) peak {gb:.2f} GiB", flush=True)
            (args.out / "bench_block.json").write_text(json.dumps(result, indent=1))
    ks = np.array([r["k"] for r in result["budgets"]], dtype=float)
    ts = np.array([r["ms"] for r in result["budgets"]])
    b, a = np.polyfit(ks, ts, 1)
    r2 = 1 - ((ts - (a + b * ks)) ** 2).sum() / ((ts - ts.mean()) ** 2).sum()
    result["fit"] = {"a_ms": a, "b_ms_per_row": b, "r2": r2, "a_over_dense": a / dense_ms}
    (args.out / "bench_block.json").write_text(json.dumps(result, indent=1))
    lines = [f"Card: {result['device']}, torch {torch.__version__}; one Wan 2.1 1.3B block, bf16, batch 2, N = {n}.",
             "", "| k/N | token-wise (ms) | dense (ms) | speedup | peak over inputs (GiB) |", "|---|---|---|---|---|"]
    for r in result["budgets"]:
        lines.append(f"| {r['budget']:.1f} | {r['ms']:.2f} | {dense_ms:.2f} | {dense_ms / r['ms']:.2f}x | {r['peak_gb']:.2f} |")
    lines.append(f"\nFit: latency = {a:.2f} ms + {b * 1000:.3f} us x k, R^2 = {r2:.4f}; a = {a / dense_ms:.0%} of the dense block; "
                 f"dense peak {dense_gb:.2f} GiB.")
    (args.out / "bench_block.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=110)
    ax.plot(ks / n, ts, "o", label="token-wise block")
    ax.plot(ks / n, a + b * ks, "-", label=f"a + b k (R^2 {r2:.3f})")
    ax.axhline(dense_ms, ls="--", c="gray", label="dense block")
    ax.set_xlabel("budget k/N")
    ax.set_ylabel("ms")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "bench_block.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
