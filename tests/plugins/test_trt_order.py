"""The kernels in TensorRT's AOT plugin argument order (plugins/kernels/trt_order.py), run in
the Triton interpreter on the CPU against float64 references: the part of the TensorRT
plugins that can run without TensorRT."""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")
if torch.cuda.is_available():
    pytest.skip("the interpreter run is for CPU machines", allow_module_level=True)

from astraea.plugins.kernels import trt_order  # noqa: E402


@pytest.mark.parametrize("b,n,d", [(1, 5, 8), (2, 37, 20), (2, 64, 130)])
def test_select_scores_in_trt_order(b, n, d):
    lse, x, x_ref = torch.rand(b, n), torch.randn(b, n, d), torch.randn(b, n, d)
    skips = torch.randint(0, 4, (b, n), dtype=torch.int32)
    out = torch.full((b, n), float("nan"))
    trt_order.trt_select_scores[(triton.cdiv(b * n, 32),)](lse, x, x_ref, skips, b * n, n, d, out,
                                                           W_BETA=0.5, BLOCK_R=32, BLOCK_D=64)
    want = lse.double() * (x.double() - x_ref.double()).norm(dim=-1) + 0.5 * torch.exp(skips.double())
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("b,h,m,n,d", [(1, 1, 3, 9, 16), (2, 3, 20, 70, 32)])
def test_sparse_attention_in_trt_order(b, h, m, n, d, masked):
    q, k, v = torch.randn(b, h, m, d), torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    mask = (torch.rand(b, n) > 0.4) | (torch.arange(n) == 0)
    out, lse = torch.full((b, h, m, d), float("nan")), torch.full((b, h, m), float("nan"))
    grid = (triton.cdiv(m, 16), b * h)
    const = {"SCALE": 1 / math.sqrt(d), "HEAD_DIM": d, "BLOCK_M": 16, "BLOCK_N": 16}
    if masked:
        trt_order.trt_sparse_attention_masked[grid](q, k, v, mask, h, m, n, out, lse, **const)
    else:
        trt_order.trt_sparse_attention[grid](q, k, v, h, m, n, out, lse, **const)
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(d)
    if masked:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    torch.testing.assert_close(out.double(), torch.softmax(s, -1) @ v.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)
