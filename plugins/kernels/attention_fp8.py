"""Query-only attention in FP8 (e4m3): the kernel of kernels/attention.py with both products
on FP8 tensor cores.

Q (B, H, M, D) and K (B, H, N, D) arrive in e4m3 with a scale a (batch, head); V arrives
transposed, (B, H, D, N) in e4m3, so that both products read their reduction dimension
contiguously (what Hopper's FP8 MMA wants of its second operand). The softmax runs in
float32; P is scaled by 448 (e4m3's largest value, the row's running maximum maps there)
before it is rounded to e4m3 for P V, and the 448 comes out of the accumulator at the end.
No key mask: padded text keys stay on the bf16 kernel. LSE is in natural log, float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

E4M3_MAX = 448.0

CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
    for bm, bn, w, st in [(128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 4, 3), (128, 64, 8, 4), (64, 128, 4, 3),
                          (128, 256, 8, 2)]
]


@triton.jit
def _tile(q, k_ptrs, v_ptrs, key_ok, m_i, l_i, acc, qk_scale, MASKED: tl.constexpr):
    if MASKED:
        k = tl.load(k_ptrs, mask=key_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
        qk = tl.where(key_ok[None, :], tl.dot(q, k) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
        qk = tl.dot(q, k)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot((p * 448.0).to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def fp8_attention_kernel(
    Q, K, VT, QS, KS, VS, OUT, LSE, sm_scale,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svd, svn,
    sob, soh, som, sod, slb, slh, slm,
    H, M, N,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    v_base = VT + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd
    q_scale = tl.load(QS + pid_bh)
    k_scale = tl.load(KS + pid_bh)
    v_scale = tl.load(VS + pid_bh)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * q_scale * k_scale * 1.4426950408889634  # exp2 domain, the FP8 scales folded in
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        m_i, l_i, acc = _tile(q, k_base + start_n * skn, v_base + start_n * svn, offs_n < BLOCK_N,
                              m_i, l_i, acc, qk_scale, False)
    for start_n in range(n_full, N, BLOCK_N):
        key_ok = start_n + offs_n < N
        m_i, l_i, acc = _tile(q, k_base + start_n * skn, v_base + start_n * svn, key_ok, m_i, l_i, acc, qk_scale, True)
    out = acc * (v_scale / 448.0) / l_i[:, None]
    tl.store(OUT + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + b * slb + h * slh + offs_m * slm, lse, mask=row_ok)


tuned_fp8_attention_kernel = triton.autotune(configs=CONFIGS, key=["N", "HEAD_DIM"])(fp8_attention_kernel)
