"""Benchmark the astraea ops on a GPU: query-only attention against torch SDPA, selection cost.

For each real-size head layout and budget k/N in 10% ... 100% it checks the Triton kernel
against SDPA's rows first, then times (triton.testing.do_bench, median, warm-up first):
  astraea      torch.ops.astraea.sparse_attention(q_sel, k, v)   (its `auto` choice, with LSE)
  triton       the op's Triton kernel alone (sparse_attention.launch, with LSE)
  sdpa         F.scaled_dot_product_attention(q_sel, k, v)             (default dispatch: cuDNN on the H100; no LSE)
  gather_sdpa  gather q rows from the full Q, SDPA, scatter into a full output (PyTorch)
and token_select at the same (B, N, hidden) against one dense diffusers Wan block, at the
CFG batch (2) and one branch (1, as per-branch engines call it): its scoring pass, and the
scores followed by each top-k (the one-program radix select token_select runs, and the
torch.topk path it replaced), each timed after the scores pass that feeds it. Timed this
way or alone, the parts do not add up to the whole token_select (do_bench flushes the L2
cache before every run, and the lambdas allocate); read the whole op, and the engines'
own profile (tools/bench_step.py --profile), as the reliable figures.
Writes bench_kernels.json, bench_kernels.md and bench_kernels.png under --out.

    python3 tools/bench_kernels.py --out $OUT/kernels
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import astraea.plugins  # noqa: E402,F401
from astraea.plugins import sparse_attention as sa  # noqa: E402

SHAPES = {  # name: (batch, heads, N keys, head dim, hidden)
    "wan2.1-1.3b 832x480x65": (2, 12, 26520, 128, 1536),
    "wan2.1-1.3b 832x480x81": (2, 12, 32760, 128, 1536),
    "cogvideox-2b 720x480x49": (2, 30, 17776, 64, 1920),
}
BUDGETS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def attention_rows(name: str, shape, budgets) -> list[dict]:
    b, h, n, d, _ = shape
    # laid out (B, N, H, D) and viewed (B, H, N, D), as the model's projections make them
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    rows = []
    for frac in budgets:
        m = max(1, round(frac * n))
        idx = torch.sort(torch.stack([torch.randperm(n, device="cuda")[:m] for _ in range(b)]), dim=-1).values
        gather_idx = idx[:, :, None, None].expand(b, m, h, d)  # rows of the (B, N, H, D) storage

        def gather_rows():
            return torch.gather(q.transpose(1, 2), 1, gather_idx).transpose(1, 2)

        q_sel = gather_rows()
        out, _ = torch.ops.astraea.sparse_attention(q_sel, k, v, None, None)
        ref = F.scaled_dot_product_attention(q_sel, k, v)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()

        def gather_sdpa():
            full = torch.zeros_like(q.transpose(1, 2))
            out = F.scaled_dot_product_attention(gather_rows(), k, v).transpose(1, 2)
            return full.scatter_(1, gather_idx, out)

        tri_out, tri_lse = torch.empty_like(q_sel), torch.empty(b, h, m, device="cuda")

        t = {
            "astraea": bench(lambda: torch.ops.astraea.sparse_attention(q_sel, k, v, None, None)),
            "triton": bench(lambda: sa.launch(q_sel, k, v, None, d ** -0.5, tri_out, tri_lse)),
            "sdpa": bench(lambda: F.scaled_dot_product_attention(q_sel, k, v)),
            "gather_sdpa": bench(gather_sdpa),
        }
        flops = 4 * b * h * m * n * d
        rows.append({"shape": name, "budget": frac, "k": m, "n": n, "rel_err_vs_sdpa": err,
                     **{f"{k}_ms": v for k, v in t.items()},
                     **{f"{k}_tflops": flops / v / 1e9 for k, v in t.items()},
                     "astraea_over_sdpa": t["sdpa"] / t["astraea"],
                     "triton_over_sdpa": t["sdpa"] / t["triton"], "backend": sa.backend(q_sel, None)})
        print(f"{name:26s} k/N={frac:.1f} astraea {t['astraea']:7.3f} ms  sdpa {t['sdpa']:7.3f} ms  "
              f"triton {t['triton']:7.3f} ms  gather+sdpa {t['gather_sdpa']:7.3f} ms  ratio {t['sdpa'] / t['astraea']:.2f}  err {err:.1e}", flush=True)
    return rows


def selection_rows(name: str, shape) -> dict:
    from diffusers import WanTransformer3DModel

    from astraea.plugins import token_select as ts

    b, h, n, d, hidden = shape
    x, x_ref = (torch.randn(b, n, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lse = torch.rand(b, n, device="cuda")
    skips = torch.randint(0, 5, (b, n), device="cuda", dtype=torch.int32)
    k = n // 2
    row = {"shape": name}
    for batch in (b, 1):  # the CFG batch, and one branch
        args = (lse[:batch], x[:batch], x_ref[:batch], skips[:batch])
        s = ts._scores_triton(*args, 0.5, None)
        want = ts.top_k_rows(s, k)
        assert torch.equal(ts._top_k_triton(s, k), want)
        row[f"b{batch}"] = {
            "select_ms": bench(lambda: torch.ops.astraea.token_select(*args, k, 0.5, None)),
            "scores_ms": bench(lambda: ts._scores_triton(*args, 0.5, None)),
            "with_top_k_kernel_ms": bench(lambda: ts._top_k_triton(ts._scores_triton(*args, 0.5, None), k)),
            "with_torch_topk_ms": bench(lambda: ts.top_k_rows(ts._scores_triton(*args, 0.5, None), k)),
        }
    select_ms = row["select_ms"] = row[f"b{b}"]["select_ms"]  # token_select at the CFG batch
    if name.startswith("wan"):  # one dense diffusers Wan 2.1 1.3B block at this token count
        frames = {26520: 17, 32760: 21}[n]
        with torch.device("cuda"):
            model = WanTransformer3DModel.from_config(dict(
                patch_size=(1, 2, 2), num_attention_heads=h, attention_head_dim=d, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=1, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)).to(torch.bfloat16).eval()
        captured = {}
        model.blocks[0].register_forward_pre_hook(lambda m, a, kw: captured.update(args=a, kwargs=kw), with_kwargs=True)
        latents = torch.randn(b, 16, frames, 60, 104, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            model(latents, torch.tensor([500.0] * b, device="cuda"), torch.randn(b, 512, 4096, device="cuda", dtype=torch.bfloat16))
            block_ms = bench(lambda: model.blocks[0](*captured["args"], **captured["kwargs"]))
        row |= {"block_ms": block_ms, "block_over_select": block_ms / select_ms}
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict], sel: list[dict], device: str, version: str = torch.__version__) -> str:
    lines = [f"Card: {device}, torch {version}; bf16, batch 2 (CFG) unless said; median of do_bench."]
    if rows:
        lines += ["", "| shape | k/N | astraea op (ms) | its Triton kernel (ms) | SDPA (ms) | gather+SDPA+scatter (ms) "
                  "| op / SDPA speed | Triton / SDPA speed | op TFLOP/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['budget']:.1f} | {r['astraea_ms']:.3f} | {r['triton_ms']:.3f} | {r['sdpa_ms']:.3f} | "
                     f"{r['gather_sdpa_ms']:.3f} | {r['astraea_over_sdpa']:.2f}x | {r['triton_over_sdpa']:.2f}x | "
                     f"{r['astraea_tflops']:.0f} |")
    lines += ["", "| shape | token_select, k = N/2 (ms) | one dense block (ms) | block / select |", "|---|---|---|---|"]
    for s in sel:
        lines.append(f"| {s['shape']} | {s['select_ms']:.3f} | {s.get('block_ms', float('nan')):.2f} | "
                     f"{s.get('block_over_select', float('nan')):.0f}x |")
    lines += ["", "Scores, then each top-k (ms); in brackets the top-k's share, the scores pass taken off.", "",
              "| shape | batch | token_select | scores | + radix-select top-k | + torch.topk path |",
              "|---|---|---|---|---|---|"]
    for s in sel:
        for key in (k for k in s if k.startswith("b") and k[1:].isdigit()):
            t = s[key]
            cells = [f"{t[c]:.3f} ({t[c] - t['scores_ms']:.3f})" for c in
                     ("with_top_k_kernel_ms", "with_torch_topk_ms")]
            lines.append(f"| {s['shape']} | {key[1:]} | {t['select_ms']:.3f} | {t['scores_ms']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), dpi=110, squeeze=False)
    for ax, name in zip(axes[0], names):
        sub = [r for r in rows if r["shape"] == name]
        for variant, style in (("astraea", "-o"), ("triton", "-.x"), ("sdpa", "--s"), ("gather_sdpa", ":^")):
            ax.plot([r["budget"] for r in sub], [r[f"{variant}_ms"] for r in sub], style, ms=3, label=variant)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("budget k/N")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budgets", type=float, nargs="*", default=BUDGETS)
    p.add_argument("--selection-only", action="store_true", help="skip the attention table")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rows = [] if args.selection_only else [
        r for name, shape in SHAPES.items() for r in attention_rows(name, shape, args.budgets)]
    sel = [selection_rows(name, shape) for name, shape in SHAPES.items()]
    device = torch.cuda.get_device_name()
    (args.out / "bench_kernels.json").write_text(json.dumps({"device": device, "torch": torch.__version__,
                                                             "attention": rows, "selection": sel}, indent=1))
    md = markdown(rows, sel, device)
    (args.out / "bench_kernels.md").write_text(md)
    if rows:
        plot(rows, args.out / "bench_kernels.png")
    print(md)


if __name__ == "__main__":
    main()
