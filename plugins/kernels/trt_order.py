"""The ops' Triton kernels with TensorRT's AOT plugin argument order: input pointers, then
the integer extra arguments, then output pointers (floats are constexprs: TensorRT passes
only integer extras). Thin wrappers over the kernels the torch ops launch, for
contiguous tensors (TensorRT's linear format); checked in the Triton interpreter on the CPU
(tests/plugins/test_trt_order.py) against the references. astraea.plugins.trt compiles them."""

from __future__ import annotations

import triton
import triton.language as tl

from .attention import sparse_attention_kernel
from .select import score_kernel


@triton.jit
def trt_select_scores(LSE, X, XR, SKIPS, R, N, D, OUT,
                      W_BETA: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    score_kernel(X, XR, LSE, SKIPS, OUT, OUT, W_BETA, R, N, D, HAS_FORCED=False, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D)


@triton.jit
def trt_sparse_attention(Q, K, V, H, M, N, OUT, LSE,
                         SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    sparse_attention_kernel(Q, K, V, Q, OUT, LSE, SCALE,
                            H * M * HEAD_DIM, M * HEAD_DIM, HEAD_DIM, 1, H * N * HEAD_DIM, N * HEAD_DIM, HEAD_DIM, 1,
                            H * N * HEAD_DIM, N * HEAD_DIM, HEAD_DIM, 1, 0, 0,
                            H * M * HEAD_DIM, M * HEAD_DIM, HEAD_DIM, 1, H * M, M, 1,
                            H, M, N, HAS_MASK=False, HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)


@triton.jit
def trt_sparse_attention_masked(Q, K, V, MASK, H, M, N, OUT, LSE,
                                SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    sparse_attention_kernel(Q, K, V, MASK, OUT, LSE, SCALE,
                            H * M * HEAD_DIM, M * HEAD_DIM, HEAD_DIM, 1, H * N * HEAD_DIM, N * HEAD_DIM, HEAD_DIM, 1,
                            H * N * HEAD_DIM, N * HEAD_DIM, HEAD_DIM, 1, N, 1,
                            H * M * HEAD_DIM, M * HEAD_DIM, HEAD_DIM, 1, H * M, M, 1,
                            H, M, N, HAS_MASK=True, HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
