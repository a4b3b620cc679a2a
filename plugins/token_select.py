"""astraea::token_select: which rows a block recomputes this step (ASTRAEA.md section 2).

    idx = token_select(lse, x, x_ref, skips, k, w_beta, forced)
    lse (B, N) float: the row's attention LSE from its last compute (mean over heads)
    x, x_ref (B, N, D): the block input now and at the row's last compute
    skips (B, N) int: consecutive steps the row has skipped this block
    forced (N,) bool or None: rows always selected (e.g. text rows of joint attention)
    idx (B, k) int64: per batch row (each CFG branch selects its own), ascending

    score = lse * ||x - x_ref||_2 + w_beta * exp(skips)        (w_alpha = 1)

Top-k by score with ties broken by the lower row index, so the choice is the same on every
device. On CUDA two Triton kernels (kernels/select.py) do it: one pass over x and x_ref
for the scores, then a radix select that writes the k rows in ascending order (no sort, no
int64 keys; torch.topk over int64 keys cost most of the selection on the H100). The radix
select runs as one program a batch row (measured on the H100: 0.13 ms at Wan's N; a form
spread over N / 1024 programs a pass, five launches, measured about twice as slow and was
removed: docs/benchmarks.md). Elsewhere
the reference below: the float32 score mapped to an order-preserving integer and combined
with the row index into one int64 key for torch.topk, then sorted. k is static (one
engine per budget); values are data-dependent. The skip counters are updated by
astraea::cache_update, where the selection is applied.
"""

from __future__ import annotations

import torch

try:
    import triton
except ImportError:
    triton = None
if triton is not None:
    from torch.library import wrap_triton

    from .kernels import select as _kernels
else:
    _kernels = None


def sketch(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x (..., D) -> (..., dim) float32: x times a fixed random +-1/sqrt(dim) matrix, so
    ||sketch(a) - sketch(b)|| estimates ||a - b|| (Johnson-Lindenstrauss; relative error
    about sqrt(2 / dim)). The rewrite can keep the sketch of a row's block input instead of
    the input itself for Delta. The matrix is a hash of (d, j) in aten integer ops: the same
    on every device, no stored constant, and traced into any export."""
    # A 16-bit multiply-xorshift hash: every constant and product stays below 2**31, since
    # Inductor may lower this index arithmetic to int32 Triton code (larger constants fail
    # to compile there).
    rows = torch.arange(x.shape[-1], device=x.device, dtype=torch.int64)[:, None]
    cols = torch.arange(dim, device=x.device, dtype=torch.int64)[None, :]
    h = (rows * 7919 + cols * 104729 + 12345) & 0xFFFF
    h = ((h ^ (h >> 7)) * 31321) & 0xFFFF
    h = ((h ^ (h >> 5)) * 27073) & 0xFFFF
    h = ((h ^ (h >> 9)) * 19991) & 0xFFFF
    sign = ((h ^ (h >> 8)) >> 3 & 1).to(torch.float32) * 2 - 1
    return x.to(torch.float32) @ (sign * dim**-0.5)


def scores(lse, x, x_ref, skips, w_beta: float, forced=None) -> torch.Tensor:
    """The reference scores, (B, N), in float32 (float64 for float64 inputs)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    delta = torch.linalg.vector_norm(x.to(acc) - x_ref.to(acc), dim=-1)
    s = lse.to(acc) * delta + w_beta * torch.exp(skips.to(acc))
    if forced is not None:
        s = s.masked_fill(forced.bool()[None, :], float("inf"))
    return s


def _scores_triton(lse, x, x_ref, skips, w_beta, forced) -> torch.Tensor:
    b, n, d = x.shape
    out = torch.empty((b, n), dtype=torch.float32, device=x.device)
    forced_arg = forced if forced is not None else out  # unread when HAS_FORCED is False
    grid = (triton.cdiv(b * n, 32),)
    wrap_triton(_kernels.score_kernel)[grid](
        x.contiguous(), x_ref.contiguous(), lse.contiguous(), skips.contiguous(), forced_arg, out, w_beta, b * n, n, d,
        HAS_FORCED=forced is not None, BLOCK_R=32, BLOCK_D=128,
    )
    return out


def _top_k_triton(score: torch.Tensor, k: int, tuned: bool = True) -> torch.Tensor:
    """The radix-select kernel; autotuned over its chunk size on CUDA (tuned=False: the first
    config, for the interpreter)."""
    b, n = score.shape
    out = torch.empty((b, k), dtype=torch.int64, device=score.device)
    if tuned:
        wrap_triton(_kernels.tuned_top_k_kernel)[(b,)](score.contiguous(), out, n, k)
    else:
        config = _kernels.TOP_K_CONFIGS[0]
        wrap_triton(_kernels.top_k_kernel)[(b,)](score.contiguous(), out, n, k, **config.kwargs,
                                                 num_warps=config.num_warps)
    return out


def top_k_rows(score: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending indices of the k best rows per batch row; ties go to the lower index."""
    bits = score.contiguous().view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # float order as int order
    n = score.shape[-1]
    key = ordered * (1 << 32) + (n - 1 - torch.arange(n, device=score.device))
    return torch.sort(torch.topk(key, k, dim=-1, sorted=False).indices, dim=-1).values


@torch.library.triton_op("astraea::token_select", mutates_args=())
def token_select(
    lse: torch.Tensor, x: torch.Tensor, x_ref: torch.Tensor, skips: torch.Tensor, k: int, w_beta: float,
    forced: torch.Tensor | None = None,
) -> torch.Tensor:
    b, n = lse.shape
    if x.shape[:2] != (b, n) or x_ref.shape != x.shape or skips.shape != (b, n) or not 1 <= k <= n:
        raise ValueError(f"token_select: lse {tuple(lse.shape)}, x {tuple(x.shape)}, x_ref {tuple(x_ref.shape)}, "
                         f"skips {tuple(skips.shape)}, k={k} do not agree")
    if x.device.type == "cuda" and _kernels is not None:
        score = _scores_triton(lse, x, x_ref, skips, w_beta, forced)
        return _top_k_triton(score, k)
    return top_k_rows(scores(lse, x, x_ref, skips, w_beta, forced).float(), k).contiguous()
