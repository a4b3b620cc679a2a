"""Token scores in one pass over the block input: score = lse * ||x - x_ref||_2 + w_beta * exp(skips).

One program per BLOCK_R rows; the hidden dim streams through in BLOCK_D chunks with float32
accumulation, so x and x_ref are read once and nothing (B, N, D)-sized is written.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def score_kernel(X, XR, LSE, SKIPS, FORCED, OUT, w_beta, R, N, D,
                 HAS_FORCED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (cols[None, :] < D)
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        diff = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32) - tl.load(XR + offs, mask=ok, other=0.0).to(tl.float32)
        acc += tl.sum(diff * diff, 1)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0).to(tl.float32)
    skips = tl.load(SKIPS + rows, mask=row_ok, other=0).to(tl.float32)
    score = lse * tl.sqrt(acc) + w_beta * tl.exp(skips)
    if HAS_FORCED:
        forced = tl.load(FORCED + rows % N, mask=row_ok, other=0)
        score = tl.where(forced != 0, float("inf"), score)
    tl.store(OUT + rows, score, mask=row_ok)
