"""Query-only attention with Q, K, V in FP8 (e4m3): the host side of kernels/attention_fp8.py.

    out, lse = attention(q, k, v, scale)      q (B, H, M, D), k, v (B, H, N, D) in bf16/fp16

Each of q, k, v is scaled a (batch, head) by its own amax (computed on the fly), V is
written transposed for the kernel, and the kernel runs both products on FP8 tensor cores.
`reference` is the same arithmetic in float32 PyTorch (q, k, v rounded to e4m3 at those
scales, P rounded to e4m3 against its row's maximum): what the kernel is tested against.
"""

from __future__ import annotations

import math

import torch

from .fp8_linear import E4M3_MAX, FP8

try:
    import triton

    from .kernels import attention_fp8 as _kernels
except ImportError:  # no triton: only the reference
    triton = _kernels = None


def head_scales(t: torch.Tensor) -> torch.Tensor:
    """(B, H) float32: each (batch, head)'s amax / 448."""
    return (t.detach().abs().amax(dim=(2, 3)).to(torch.float32) / E4M3_MAX).clamp_min(1e-12)


def quantize_heads(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (t.to(torch.float32) / s[:, :, None, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)


def supported(q: torch.Tensor) -> bool:
    d = q.shape[-1]
    return (_kernels is not None and q.device.type == "cuda" and q.dtype in (torch.bfloat16, torch.float16)
            and 16 <= d <= 128 and d & (d - 1) == 0 and torch.cuda.get_device_capability(q.device) >= (8, 9))


def reference(q, k, v, scale=None):
    """Float32 math with the kernel's roundings: q, k, v and P in e4m3."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    deq = [quantize_heads(t, s).to(torch.float32) * s[:, :, None, None] for t in (q, k, v) for s in [head_scales(t)]]
    s_ = torch.einsum("bhmd,bhnd->bhmn", deq[0], deq[1]) * scale
    row_max = s_.amax(dim=-1, keepdim=True)
    p = torch.exp(s_ - row_max)
    lse = (row_max[..., 0] + torch.log(p.sum(dim=-1)))
    p8 = (p * E4M3_MAX).to(FP8).to(torch.float32) / E4M3_MAX
    out = torch.einsum("bhmn,bhnd->bhmd", p8, deq[2]) / p.sum(dim=-1, keepdim=True)
    return out.to(q.dtype), lse


def launch(q8, k8, vt8, qs, ks, vs, scale, out, lse, tuned: bool = True) -> None:
    """Run the kernel on quantized inputs (vt8 (B, H, D, N)) into `out` and `lse`."""
    from torch.library import wrap_triton

    b, h, m, d = q8.shape
    n = k8.shape[2]
    kernel = _kernels.tuned_fp8_attention_kernel if tuned else _kernels.fp8_attention_kernel
    extra = {} if tuned else {"BLOCK_M": 32, "BLOCK_N": 32}

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), b * h)

    wrap_triton(kernel)[grid](
        q8, k8, vt8, qs, ks, vs, out, lse, scale,
        *q8.stride(), *k8.stride(), *vt8.stride(), *out.stride(), *lse.stride(),
        h, m, n, HEAD_DIM=d, **extra,
    )


def attention(q, k, v, scale=None, tuned: bool = True):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qs, ks, vs = head_scales(q), head_scales(k), head_scales(v)
    q8, k8 = quantize_heads(q, qs), quantize_heads(k, ks)
    vt8 = quantize_heads(v, vs).transpose(2, 3).contiguous()
    out = torch.empty_like(q, memory_format=torch.preserve_format)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    launch(q8, k8, vt8, qs.contiguous(), ks.contiguous(), vs.contiguous(), scale, out, lse, tuned=tuned)
    return out, lse
