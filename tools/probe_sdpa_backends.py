"""Which of PyTorch's attention kernels the op should call on this card, with the row LSE.

Times, at the Wan 2.1 1.3B (12 x 128) and CogVideoX-2B (30 x 64) layouts and a few k/N:
F.scaled_dot_product_attention as dispatched (no LSE), each backend forced through
sdpa_kernel, the private aten entry points that return the LSE (flash, cuDNN, efficient),
and the op's Triton kernel; checks each output against the float32 reference first.

    python3 tools/probe_sdpa_backends.py --out $OUT/probe
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from astraea.plugins import sparse_attention as sa  # noqa: E402

SHAPES = {"wan2.1-1.3b 832x480x65": (2, 12, 26520, 128), "cogvideox-2b 720x480x49": (2, 30, 17776, 64)}


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budgets", type=float, nargs="*", default=[0.1, 0.5, 1.0])
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    aten = torch.ops.aten
    rows = []
    for name, (b, h, n, d) in SHAPES.items():
        k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
        for frac in args.budgets:
            m = max(1, round(frac * n))
            q = torch.randn(b, m, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
            out, lse = torch.empty_like(q), torch.empty(b, h, m, device="cuda")
            variants = {
                "sdpa_default": lambda: (F.scaled_dot_product_attention(q, k, v), None),
                "aten_flash_lse": lambda: aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[:2],
                "aten_cudnn_lse": lambda: aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)[:2],
                "aten_efficient_lse": lambda: aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2],
                "triton": lambda: (sa.launch(q, k, v, None, d ** -0.5, out, lse), None),
            }
            for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
                def forced(backend=backend):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q, k, v), None
                variants[f"sdpa_{backend.name.lower()}"] = forced
            ref, ref_lse = sa.reference(q[:, :, :256], k, v)
            for vname, fn in variants.items():
                row = {"shape": name, "budget": frac, "variant": vname}
                try:
                    res = fn()
                    o = out if vname == "triton" else res[0]
                    row["rel_err"] = ((o[:, :, :256].float() - ref.float()).norm() / ref.float().norm()).item()
                    lse_v = lse if vname == "triton" else res[1]
                    if lse_v is not None:
                        row["lse_shape"] = list(lse_v.shape)
                        row["lse_err"] = (lse_v.reshape(b, h, -1)[:, :, :256] - ref_lse).abs().max().item()
                    row["ms"] = bench(fn)
                except Exception as e:  # a backend this build or card lacks
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
    (args.out / "probe_sdpa_backends.json").write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                                   "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
