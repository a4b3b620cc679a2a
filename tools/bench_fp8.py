"""Where FP8 can gain on a GPU: the Linear layers and the attention of a real-size step.

GEMMs at the Wan 2.1 1.3B block's shapes (rows M = all tokens of one CFG branch at
832x480x65, and 40% of them), timed with triton.testing.do_bench (median, warm-up first):
  bf16            F.linear in bf16 (the baseline)
  fp8_gemm_row    torch._scaled_mm alone on inputs already in e4m3, row-wise scales
  fp8_gemm_tensor torch._scaled_mm alone, tensor-wise scales
  fp8_op_eager    astraea::fp8_linear (channel scheme: each token's scale on the fly) eager
  fp8_op_compiled the op as Inductor compiles it (fp8_linear._math: the quantization fused)
  quantize        the per-token amax and cast alone, compiled
Attention at the block's shape (B 1, 12 heads, head dim 128), all queries and 40%: cuDNN
in bf16 (what astraea::sparse_attention runs on Hopper), our Triton kernel in bf16, and the
FP8 Triton kernel (kernels/attention_fp8.py) alone and with its quantization, each with its
relative error against cuDNN's output. The FP8 attention entry points of this torch are
listed (aten ops by name). Writes bench_fp8.json and bench_fp8.md under --out.

    python3 tools/bench_fp8.py --out $OUT/fp8-kernels
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
from astraea.plugins import attention_fp8 as a8  # noqa: E402
from astraea.plugins import fp8_linear as f8  # noqa: E402
from astraea.plugins import sparse_attention as sa  # noqa: E402
from astraea.timing import device_name  # noqa: E402

TOKENS = 26520  # one branch of Wan 2.1 1.3B at 832x480x65
LINEARS = {"qkvo 1536->1536": (1536, 1536), "ffn up 1536->8960": (1536, 8960), "ffn down 8960->1536": (8960, 1536)}


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def gemm_rows(m: int) -> list[dict]:
    rows = []
    for name, (k, n) in LINEARS.items():
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        w_amax = w.float().abs().amax(dim=1)
        layer = f8.Fp8Linear.from_linear(torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
                                         .requires_grad_(False), w_amax, None)
        layer.weight.copy_(f8.quantize(w, (w_amax / f8.E4M3_MAX)[:, None]))
        xs = f8.row_scale(x)
        xq = f8.quantize(x, xs)
        ws_row = layer.w_scale.reshape(1, -1)
        one = torch.ones((), device="cuda")
        compiled = torch.compile(lambda x: f8._math(x, layer.weight, layer.w_scale, None, None), dynamic=False)
        quant = torch.compile(lambda x: f8.quantize(x, f8.row_scale(x)), dynamic=False)
        flops = 2 * m * k * n
        variants = {
            "bf16": lambda: F.linear(x, w),
            "fp8_gemm_row": lambda: torch._scaled_mm(xq, layer.weight.t(), scale_a=xs, scale_b=ws_row,
                                                     out_dtype=torch.bfloat16),
            "fp8_gemm_tensor": lambda: torch._scaled_mm(xq, layer.weight.t(), scale_a=one, scale_b=one,
                                                        out_dtype=torch.bfloat16),
            "fp8_op_eager": lambda: layer(x),
            "fp8_op_compiled": lambda: compiled(x),
            "quantize": lambda: quant(x),
        }
        want = F.linear(x.float(), layer.weight.float() * layer.w_scale[:, None])
        err = (compiled(x).float() - want).norm() / want.norm()
        for variant, fn in variants.items():
            ms = bench(fn)
            rows.append({"kind": "gemm", "shape": name, "m": m, "variant": variant, "ms": ms,
                         "tflops": None if variant == "quantize" else flops / ms / 1e9,
                         "rel_err": float(err) if variant == "fp8_op_compiled" else None})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def attention_rows(m_frac: float) -> list[dict]:
    n, h, d = TOKENS, 12, 128
    m = round(m_frac * n)
    # laid out (B, N, H, D) and viewed (B, H, N, D), as the model's projections make them
    q = torch.randn(1, m, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    flops = 4 * m * n * d * h
    scale = d**-0.5
    want = sa._cudnn(q, k, v, scale)[0].float()
    out, lse = torch.empty_like(q), torch.empty(1, h, m, device="cuda")
    qs, ks, vs = a8.head_scales(q), a8.head_scales(k), a8.head_scales(v)
    q8, k8, vt8 = a8.quantize_heads(q, qs), a8.quantize_heads(k, ks), a8.quantize_heads(v, vs).transpose(2, 3).contiguous()
    variants = {
        "cudnn_bf16": lambda: sa._cudnn(q, k, v, scale),
        "triton_bf16": lambda: sa.launch(q, k, v, None, scale, out, lse),
        "triton_fp8_kernel": lambda: a8.launch(q8, k8, vt8, qs, ks, vs, scale, out, lse),
        "triton_fp8_with_quantize": lambda: a8.attention(q, k, v, scale),
    }
    rows = []
    for variant, fn in variants.items():
        fn()
        got = sa._cudnn(q, k, v, scale)[0] if variant == "cudnn_bf16" else out
        if variant == "triton_fp8_with_quantize":
            got = a8.attention(q, k, v, scale)[0]
        ms = bench(fn)
        rows.append({"kind": "attention", "shape": f"{m}x{n} h{h} d{d}", "m": m, "variant": variant, "ms": ms,
                     "tflops": flops / ms / 1e9, "rel_err": float((got.float() - want).norm() / want.norm())})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(report: dict) -> str:
    lines = [f"Card: {report['device']}, torch {report['torch']}; median of triton.testing.do_bench.", "",
             "| kind | shape | rows | variant | ms | TFLOP/s | note |", "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        note = r.get("error") or (f"rel. error {r['rel_err']:.4f}" if r.get("rel_err") is not None else "")
        ms = f"{r['ms']:.3f}" if "ms" in r else "-"
        tf = f"{r['tflops']:.0f}" if r.get("tflops") else "-"
        lines.append(f"| {r['kind']} | {r['shape']} | {r.get('m', '')} | {r['variant']} | {ms} | {tf} | {note} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"device": device_name(torch.device("cuda")), "torch": torch.__version__, "rows": [],
              "attention_ops": sorted(n for n in torch._C._dispatch_get_all_op_names()
                                      if "attention" in n and n.startswith("aten::"))}
    print(json.dumps({"attention_ops": report["attention_ops"]}), flush=True)

    def save() -> None:
        (args.out / "bench_fp8.json").write_text(json.dumps(report, indent=1))

    with torch.no_grad():
        for frac in (1.0, 0.4):
            report["rows"] += attention_rows(frac)
            save()
        for m in (TOKENS, round(0.4 * TOKENS)):
            report["rows"] += gemm_rows(m)
            save()
    md = markdown(report)
    (args.out / "bench_fp8.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
