"""Query-only attention, flash-style: k query rows against all N keys, output and row LSE.

One program per (block of query rows, batch x head); keys and values stream through in
BLOCK_N tiles with an online softmax, so no k x N score matrix is ever stored. Rows past
M and keys past N are masked, so no size needs to be a multiple of a block; an optional
key mask (B, N) removes padded text keys. LSE is returned in natural log, float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
    for bm, bn, w, st in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 128, 4, 3), (64, 64, 4, 4)]
]


@triton.jit
def _tile(q, k_ptrs, v_ptrs, key_ok, m_i, l_i, acc, qk_scale, MASKED: tl.constexpr):
    """One BLOCK_N tile of keys: the online-softmax update. Unmasked tiles skip every where()."""
    if MASKED:
        k = tl.load(k_ptrs, mask=key_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
        qk = tl.where(key_ok[None, :], tl.dot(q, k) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no valid key yet
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
        qk = tl.dot(q, k)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


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
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=row_ok[:, None], other=0.0)
    k_base = K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None] * skd
    v_base = V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # exp2 domain
    n_full = 0 if HAS_MASK else (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):  # full tiles: no masks
        m_i, l_i, acc = _tile(q, k_base + start_n * skn, v_base + start_n * svn, offs_n < BLOCK_N,
                              m_i, l_i, acc, qk_scale, False)
    for start_n in range(n_full, N, BLOCK_N):  # the ragged tail, or every tile under a key mask
        key_ok = start_n + offs_n < N
        if HAS_MASK:
            keep = tl.load(MASK + b * smb + (start_n + offs_n) * smn, mask=key_ok, other=0)
            key_ok = key_ok & (keep != 0)
        m_i, l_i, acc = _tile(q, k_base + start_n * skn, v_base + start_n * svn, key_ok, m_i, l_i, acc, qk_scale, True)
    out = acc / l_i[:, None]
    tl.store(OUT + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + b * slb + h * slh + offs_m * slm, lse, mask=row_ok)


tuned_sparse_attention_kernel = triton.autotune(configs=CONFIGS, key=["N", "HEAD_DIM", "HAS_MASK"])(
    sparse_attention_kernel
)
