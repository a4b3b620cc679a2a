"""astraea::sparse_attention: query-only attention over all keys, returning the row LSE.

    out, lse = sparse_attention(q, k, v, key_mask, scale)
    q (B, H, M, D): the M selected query rows; k, v (B, H, N, D): all N rows
    key_mask (B, N) bool or None: False removes a key (padded text)
    out (B, H, M, D) in q's dtype, laid out in memory like q (as SDPA does: a graph that
    permutes SDPA's output back and views it relies on that); lse (B, H, M) float32

The queries arrive already gathered: the graph gathers the block input's selected rows
before the Q projection, so Q is only ever computed for M rows (gathering inside the
kernel would need the full N-row Q first: (N - M) x D x D wasted projection FLOPs).
Implementations, chosen per call by `backend()` (measured, docs/benchmarks.md):
- `cudnn`: on Hopper and later without a key mask, the cuDNN attention kernel that torch
  SDPA itself dispatches to there, through `aten._scaled_dot_product_cudnn_attention` with
  the LSE requested: 1.00-1.03x of SDPA on the H100 at the Wan and CogVideoX layouts, where
  our Triton kernel reaches 0.76-1.0x of it and PyTorch's FA2 0.6-0.75x
  (tools/probe_sdpa_backends.py, docs/benchmarks.md).
- `triton`: the kernel of kernels/attention.py (bf16/fp16, head dim a power of two from 16
  to 128), visible to Inductor and AOTInductor through `triton_op`; it serves the key mask
  (HunyuanVideo's padded text) and is the kernel the TensorRT plugin runs.
- `cpu`: on the CPU, PyTorch's CPU flash-attention kernel
  (`aten._scaled_dot_product_flash_attention_for_cpu`), which returns the LSE too: 5x
  faster than the reference at the bundled model's size, never an M x N buffer.
- `reference`: float32 PyTorch math (the definition the others are tested against).
ASTRAEA_ATTENTION=auto|triton|cudnn|cpu|reference forces one where it applies (read when a
graph is traced or compiled, so set it before building engines).
"""

from __future__ import annotations

import math
import os

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


def cudnn_supported(q: torch.Tensor, key_mask) -> bool:
    d = q.shape[-1]
    return (q.device.type == "cuda" and key_mask is None and q.dtype in (torch.bfloat16, torch.float16)
            and d % 8 == 0 and d <= 128 and torch.backends.cudnn.is_available()
            and torch.cuda.get_device_capability(q.device)[0] >= 9)


def backend(q: torch.Tensor, key_mask) -> str:
    """Which implementation runs for these inputs: cudnn, triton, cpu or reference."""
    want = os.environ.get("ASTRAEA_ATTENTION", "auto")
    if want not in ("auto", "triton", "cudnn", "cpu", "reference"):
        raise ValueError(f"ASTRAEA_ATTENTION={want!r}: use auto, triton, cudnn, cpu or reference")
    if q.device.type == "cpu" and want in ("auto", "cpu"):
        return "cpu"
    if want in ("auto", "cudnn") and cudnn_supported(q, key_mask):
        return "cudnn"
    if want != "reference" and q.device.type == "cuda" and kernel_supported(q):
        return "triton"
    return "reference"


def _cudnn(q, k, v, scale):
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)
    b, h, m, _ = q.shape
    return res[0], res[1].reshape(b, h, m)


def _cpu(q, k, v, key_mask, scale):
    mask = None
    if key_mask is not None:  # additive, in q's dtype, broadcast over heads and queries
        mask = torch.zeros(key_mask.shape[0], 1, 1, key_mask.shape[1], dtype=q.dtype, device=q.device)
        mask = mask.masked_fill(~key_mask[:, None, None, :].bool(), float("-inf"))
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask, scale=scale)


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
    impl = backend(q, key_mask)
    if impl in ("cudnn", "cpu"):
        f_out, f_lse = _cudnn(q, k, v, scale) if impl == "cudnn" else _cpu(q, k, v, key_mask, scale)
        if f_out.stride() != out.stride():  # keep the contract: laid out like q
            f_out = out.copy_(f_out)
        return f_out, f_lse.contiguous()
    lse = torch.empty((b, h, m), dtype=torch.float32, device=q.device)
    if impl == "triton":
        launch(q, k, v, key_mask, scale, out, lse)
    else:
        ref_out, ref_lse = reference(q, k, v, key_mask, scale)
        out.copy_(ref_out)
        lse.copy_(ref_lse)
    return out, lse
