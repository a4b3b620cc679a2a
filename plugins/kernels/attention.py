"""Query-only attention, flash-style: k query rows against all N keys, output and row LSE.

One program per (block of query rows, batch x head); keys and values stream through in
BLOCK_N tiles with an online softmax, so no k x N score matrix is ever stored. Rows past
M and keys past N are masked, so no size needs to be a multiple of a block; an optional
key mask (B, N) removes padded text keys. LSE is returned in natural log, float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=3),
]


@triton.jit
def sparse_attention_kernel(
    Q, K, V, MASK, OUT, LSE, sm_scale,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smn,
    sob, soh, som, sod, slb, slh, slm,
    H, M, N,
    HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < M
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # exp2 domain
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < N
        if HAS_MASK:
            keep = tl.load(MASK + b * smb + offs_n * smn, mask=key_ok, other=0)
            key_ok = key_ok & (keep != 0)
        k = tl.load(K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=key_ok[None, :], other=0.0)
        qk = tl.dot(q, k) * qk_scale
        qk = tl.where(key_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile with no valid key so far
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=key_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(OUT + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + b * slb + h * slh + offs_m * slm, lse, mask=row_ok)


tuned_sparse_attention_kernel = triton.autotune(configs=CONFIGS, key=["N", "HEAD_DIM", "HAS_MASK"])(
    sparse_attention_kernel
)
