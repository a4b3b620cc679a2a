"""astraea::sparse_attention: query-only attention over all keys, returning the row LSE.

    out, lse = sparse_attention(q, k, v, key_mask, scale)
    q (B, H, M, D): the M selected query rows; k, v (B, H, N, D): all N rows
    key_mask (B, N) bool or None: False removes a key (padded text)
    out (B, H, M, D) in q's dtype, laid out in memory like q (as SDPA does: a graph that
    permutes SDPA's output back and views it relies on that); lse (B, H, M) float32

The queries arrive already gathered: the graph gathers the block input's selected rows
before the Q projection, so Q is only ever computed for M rows (gathering inside the
kernel would need the full N-row Q first: (N - M) x D x D wasted projection FLOPs).
On CUDA (bf16/fp16, head dim a power of two from 16 to 128) the Triton kernel of
kernels/attention.py runs, visible to Inductor and AOTInductor through `triton_op`;
everywhere else the PyTorch reference below.
"""

from __future__ import annotations

import math

import torch
from torch.library import triton_op, wrap_triton

try:
    import triton
except ImportError:  # no triton: the reference serves every device
    triton = None
if triton is not None:
    from .kernels import attention as _kernels
else:
    _kernels = None


def reference(q, k, v, key_mask=None, scale=None):
    """Float32 math, the definition the kernel is tested against."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bhmd,bhnd->bhmn", q.float(), k.float()) * scale
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :].bool(), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bhmn,bhnd->bhmd", torch.exp(s - lse[..., None]), v.float())
    return out.to(q.dtype), lse


def kernel_supported(q: torch.Tensor) -> bool:
    d = q.shape[-1]
    return _kernels is not None and q.dtype in (torch.bfloat16, torch.float16) and 16 <= d <= 128 and d & (d - 1) == 0


def launch(q, k, v, key_mask, scale, out, lse, tuned: bool = True) -> None:
    """Run the Triton kernel into `out` and `lse` (also on CPU tensors under TRITON_INTERPRET=1)."""
    b, h, m, d = q.shape
    n = k.shape[2]
    mask = key_mask if key_mask is not None else q.new_empty((1, 1), dtype=torch.bool)
    kernel = _kernels.tuned_sparse_attention_kernel if tuned else _kernels.sparse_attention_kernel
    extra = {} if tuned else {"BLOCK_M": 32, "BLOCK_N": 32}

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), b * h)

    wrap_triton(kernel)[grid](
        q, k, v, mask, out, lse, scale,
        *q.stride(), *k.stride(), *v.stride(), *mask.stride(), *out.stride(), *lse.stride(),
        h, m, n, HAS_MASK=key_mask is not None, HEAD_DIM=d, **extra,
    )


@triton_op("astraea::sparse_attention", mutates_args=())
def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, m, d = q.shape
    if k.shape[:2] != (b, h) or k.shape[-1] != d or v.shape != k.shape:
        raise ValueError(f"sparse_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not agree")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q, memory_format=torch.preserve_format)
    lse = torch.empty((b, h, m), dtype=torch.float32, device=q.device)
    if q.device.type == "cuda" and kernel_supported(q):
        launch(q, k, v, key_mask, scale, out, lse)
    else:
        ref_out, ref_lse = reference(q, k, v, key_mask, scale)
        out.copy_(ref_out)
        lse.copy_(ref_lse)
    return out, lse
