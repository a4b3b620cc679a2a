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


@triton.jit
def _order_key(score):
    """float32 -> uint32 with the same order (negative floats flip every bit, the rest the sign)."""
    bits = score.to(tl.uint32, bitcast=True)
    return bits ^ tl.where((bits >> 31) == 1, 0xFFFFFFFF, 0x80000000).to(tl.uint32)


@triton.jit
def top_k_kernel(S, OUT, N, K, BLOCK: tl.constexpr):
    """One program per batch row: the ascending indices of the K largest of S[b, :N], ties to
    the lower index (the same set as top-k over the key (score, -index)).

    A radix select finds the K-th largest key in four 8-bit passes (a 256-bin histogram of
    the rows still matching the chosen prefix), which leaves T and how many rows equal to T
    to take; one more pass writes every row above T and the first of those equal to T, in
    row order, through a running prefix sum. No sort, no int64 keys: five reads of the
    (N,) scores, which stay in L2.
    """
    b = tl.program_id(0).to(tl.int64)
    row = S + b * N
    out = OUT + b * K
    bins = tl.arange(0, 256)
    lanes = tl.arange(0, BLOCK)
    prefix = tl.full([], 0, tl.uint32)
    need = K
    for p in tl.static_range(4):
        shift = 24 - 8 * p
        hist = tl.zeros([256], dtype=tl.int32)
        for start in range(0, N, BLOCK):
            offs = start + lanes
            ok = offs < N
            key = _order_key(tl.load(row + offs, mask=ok, other=0.0))
            if p == 0:
                cand = ok
            else:
                cand = ok & ((key >> (shift + 8)) == prefix)
            digit = tl.where(cand, (key >> shift) & 0xFF, 0).to(tl.int32)
            hist += tl.histogram(digit, 256)
            hist -= tl.where(bins == 0, BLOCK - tl.sum(cand.to(tl.int32), 0), 0)  # the others counted at 0
        at_least = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # candidates with digit >= d
        d = tl.max(tl.where(at_least >= need, bins, 0), 0)  # the K-th largest's digit
        need -= tl.sum(tl.where(bins > d, hist, 0), 0)
        prefix = (prefix << 8) | d.to(tl.uint32)
    taken = 0
    equal_seen = 0
    for start in range(0, N, BLOCK):
        offs = start + lanes
        ok = offs < N
        key = _order_key(tl.load(row + offs, mask=ok, other=0.0))
        equal = ok & (key == prefix)
        sel = (ok & (key > prefix)) | (equal & (equal_seen + tl.cumsum(equal.to(tl.int32), 0) <= need))
        pos = taken + tl.cumsum(sel.to(tl.int32), 0) - 1
        tl.store(out + pos, offs.to(tl.int64), mask=sel)
        taken += tl.sum(sel.to(tl.int32), 0)
        equal_seen += tl.sum(equal.to(tl.int32), 0)


# Larger chunks mean fewer sequential iterations of the five passes (the kernel is latency
# bound: one program per batch row); the first config is the one measured untuned.
TOP_K_CONFIGS = [triton.Config({"BLOCK": blk}, num_warps=w) for blk, w in [(2048, 8), (4096, 16), (8192, 16), (8192, 32)]]
tuned_top_k_kernel = triton.autotune(configs=TOP_K_CONFIGS, key=["N"])(top_k_kernel)
