"""The astraea ops against float64 references and the block oracle; the Triton kernel
under TRITON_INTERPRET=1 on the CPU (on CUDA in the `gpu` tests); export and compile."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import astraea.plugins  # noqa: F401  (registers the ops)
from astraea.plugins import sparse_attention as sa
from astraea.plugins.token_select import scores, sketch

ops = torch.ops.astraea


def _attention64(q, k, v, mask=None):
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1) @ v.double(), lse


SHAPES = [  # (batch, heads, M query rows, N keys, head dim)
    (1, 1, 1, 1, 16), (2, 3, 5, 37, 16), (2, 2, 33, 70, 64), (2, 1, 130, 130, 16), (1, 2, 7, 200, 128),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_op_matches_float64(shape, masked, backend, monkeypatch):
    monkeypatch.setenv("ASTRAEA_ATTENTION", backend)
    b, h, m, n, d = shape
    q, k, v = torch.randn(b, h, m, d), torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    mask = None
    if masked:
        mask = torch.rand(b, n) > 0.4
        mask[:, -1] = True
    out, lse = ops.sparse_attention(q, k, v, mask, None)
    ref, ref_lse = _attention64(q, k, v, mask)
    assert out.shape == (b, h, m, d) and lse.shape == (b, h, m) and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("n,k", [(1, 1), (17, 1), (17, 5), (17, 17), (64, 23)])
def test_query_only_attention_is_the_dense_rows(n, k):
    """The oracle: attention of the selected queries equals those rows of dense attention."""
    b, h, d = 2, 3, 16
    q, kk, v = torch.randn(b, h, n, d), torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    idx = torch.stack([torch.randperm(n)[:k] for _ in range(b)])  # unsorted, per CFG branch
    q_sel = torch.gather(q, 2, idx[:, None, :, None].expand(b, h, k, d))
    out, _ = ops.sparse_attention(q_sel, kk, v, None, None)
    dense = torch.nn.functional.scaled_dot_product_attention(q, kk, v)
    torch.testing.assert_close(out, torch.gather(dense, 2, idx[:, None, :, None].expand(b, h, k, d)), atol=1e-5, rtol=1e-5)


def _factored64(q, k, v, frames, temporal):
    """Attention within each frame (or across the frames at each position) in float64, every row:
    by a mask over the whole token axis, independent of the ops' grouping by views."""
    n = q.shape[2]
    s_ = n // frames
    t = torch.arange(n)
    allowed = (t[:, None] % s_ == t[None] % s_) if temporal else (t[:, None] // s_ == t[None] // s_)
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ v.double(), torch.logsumexp(s, -1)


@pytest.mark.parametrize("temporal", [False, True])
@pytest.mark.parametrize("backend", ["scatter", "reference"])
@pytest.mark.parametrize("frames,s,k", [(1, 9, 4), (3, 8, 1), (4, 10, 17), (5, 6, 30)])
def test_group_attention_is_the_factored_rows(frames, s, k, temporal, backend, monkeypatch):
    """The query-only factored attention: the selected queries against their own group's keys
    equal those rows of factored attention over every row (float64, by a token mask)."""
    monkeypatch.setenv("ASTRAEA_GROUP_ATTENTION", backend)
    b, h, d, n = 2, 3, 16, frames * s
    q, kk, v = torch.randn(b, h, n, d), torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    idx = torch.sort(torch.stack([torch.randperm(n)[:k] for _ in range(b)]), dim=-1).values
    at = idx[:, None, :, None].expand(b, h, k, d)
    out, lse = ops.group_attention(q.gather(2, at), kk, v, idx, frames, temporal)
    ref, ref_lse = _factored64(q, kk, v, frames, temporal)
    assert out.shape == (b, h, k, d) and lse.shape == (b, h, k) and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref.gather(2, at), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse.gather(2, idx[:, None].expand(b, h, k)), atol=2e-6, rtol=1e-6)
    full, full_lse = ops.factored_attention(q, kk, v, frames, temporal)  # the op it is the query-only form of
    torch.testing.assert_close(full.double(), ref, atol=2e-6, rtol=1e-5)


class GroupBlock(torch.nn.Module):
    """Spatial query-only attention over 4 frames inside a module, for export."""

    def forward(self, q, k, v, idx):
        return ops.group_attention(q, k, v, idx, 4, False)[0] * 2


def _group_args(b=1, h=2, n=24, d=16, k=7):
    """q of k selected rows (ascending indices) and k, v of all n rows."""
    return (torch.randn(b, h, k, d), torch.randn(b, h, n, d), torch.randn(b, h, n, d),
            torch.sort(torch.randperm(n)[:k]).values[None])


def test_group_attention_decomposes_for_compilers_and_names_bad_input():
    from astraea.plugins import group_attention as ga

    args = _group_args()
    n = args[1].shape[2]
    ep = torch.export.export(GroupBlock(), args)
    flat = astraea.plugins.decompose(ep)
    left = {str(node.target) for node in flat.graph.nodes if str(node.target).startswith("astraea.")}
    assert left == {"astraea.sparse_attention.default"}  # the scatter form, down to the attention kernel
    torch.testing.assert_close(flat.module()(*args), GroupBlock()(*args), atol=1e-6, rtol=1e-6)
    assert ga.backend(args[0], n, False) == "scatter"  # varlen is CUDA-only
    with pytest.raises(ValueError, match="index"):
        ops.group_attention(args[0], args[1], args[2], args[3][:, :3], 4, False)
    with pytest.raises(ValueError, match="frames"):
        ops.group_attention(args[0], args[1], args[2], args[3], 5, False)


def test_the_varlen_form_reaches_compilers_as_one_op(monkeypatch):
    """Where the varlen flash form is chosen (CUDA, forced here), the decomposition keeps it as
    astraea::varlen_group_attention, no flash call and no view of its outputs for Inductor to
    lower (torch 2.11's Inductor failed on those on the H100)."""
    from astraea.plugins import group_attention as ga

    monkeypatch.setattr(ga, "backend", lambda q, n, temporal: "varlen")

    args = _group_args()
    flat = astraea.plugins.decompose(torch.export.export(GroupBlock(), args))
    targets = [str(node.target) for node in flat.graph.nodes if node.op == "call_function"]
    assert "astraea.varlen_group_attention.default" in targets
    assert not any("flash" in t or t.startswith("astraea.group_attention") for t in targets)


@pytest.mark.skipif(sa._kernels is None, reason="triton is not installed")
@pytest.mark.parametrize("shape", SHAPES[:4], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_triton_kernel_matches_reference(shape, dtype, masked, request):
    if torch.cuda.is_available():
        pytest.skip("the interpreter run is for CPU machines; tests/test_gpu covers CUDA")
    b, h, m, n, d = shape
    q, k, v = (torch.randn(b, h, r, d).to(dtype) for r in (m, n, n))
    mask = (torch.rand(b, n) > 0.4) | (torch.arange(n) == 0) if masked else None
    out = torch.full((b, h, m, d), float("nan"), dtype=dtype)  # poisoned: every element must be written
    lse = torch.full((b, h, m), float("nan"))
    sa.launch(q, k, v, mask, 1 / math.sqrt(d), out, lse, tuned=False)
    ref, ref_lse = _attention64(q, k, v, mask)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def _select64(lse, x, x_ref, skips, k, w_beta, forced):
    s = lse.double() * (x.double() - x_ref.double()).norm(dim=-1) + w_beta * torch.exp(skips.double())
    if forced is not None:
        s[:, forced] = float("inf")
    out = []
    for row in s:  # descending score, ties to the lower index
        order = sorted(range(len(row)), key=lambda i: (-row[i].item(), i))
        out.append(sorted(order[:k]))
    return torch.tensor(out)


@pytest.mark.parametrize("n,k", [(1, 1), (13, 1), (13, 6), (13, 13), (50, 17)])
@pytest.mark.parametrize("with_forced", [False, True])
def test_token_select_matches_float64(n, k, with_forced):
    b, d = 2, 8
    lse, x, x_ref = torch.rand(b, n) * 5, torch.randn(b, n, d), torch.randn(b, n, d)
    skips = torch.randint(0, 4, (b, n), dtype=torch.int32)
    forced = None
    if with_forced:
        forced = torch.zeros(n, dtype=torch.bool)
        forced[: min(k, 2)] = True
    idx = ops.token_select(lse, x, x_ref, skips, k, 0.5, forced)
    assert idx.dtype == torch.int64 and idx.shape == (b, k)
    assert torch.equal(idx, _select64(lse, x, x_ref, skips, k, 0.5, forced))
    if forced is not None:
        assert all(set(forced.nonzero().flatten().tolist()) <= set(row.tolist()) for row in idx)


def test_token_select_ties_and_staleness():
    b, n, d = 1, 6, 4
    x = torch.zeros(b, n, d)
    skips = torch.tensor([[0, 3, 0, 3, 0, 0]], dtype=torch.int32)
    idx = ops.token_select(torch.ones(b, n), x, x, skips, 3, 0.5, None)  # delta 0: staleness decides
    assert idx.tolist() == [[0, 1, 3]]  # the two stale rows, then the lowest-index tie
    assert torch.isfinite(scores(torch.ones(b, n), x, x, skips, 0.5)).all()


def test_sketch_is_a_fixed_sign_projection_that_keeps_distances():
    """sketch(x, r) = x @ S with S in {+-1/sqrt(r)} (the same S every call and for every
    dtype); distances survive within the Johnson-Lindenstrauss error, checked in float64."""
    d, r = 96, 64
    s = sketch(torch.eye(d, dtype=torch.float64), r).double()
    assert torch.equal(s.abs(), torch.full((d, r), r**-0.5, dtype=torch.float64))
    assert torch.equal(s, sketch(torch.eye(d), r).double())
    assert 0.4 < (s > 0).double().mean() < 0.6 and torch.linalg.matrix_rank(s) == r  # balanced, full rank
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4000, d, generator=gen), torch.randn(4000, d, generator=gen)
    ratio = (sketch(a, r) - sketch(b, r)).double().norm(dim=-1) / (a.double() - b.double()).norm(dim=-1)
    assert abs(ratio.pow(2).mean().item() - 1) < 0.03  # unbiased in the squared norm
    assert ratio.std().item() < 1.5 * math.sqrt(1 / (2 * r))  # the sketch's spread, not worse
    torch.testing.assert_close(sketch(a.bfloat16(), r), a.bfloat16().double().matmul(s).float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("with_ref", [False, True])
def test_cache_update_in_place(with_ref):
    b, n, d, k = 2, 9, 5, 4
    cache, lse_cache = torch.randn(b, n, d), torch.randn(b, n)
    skips = torch.randint(0, 3, (b, n), dtype=torch.int32)
    ref_cache = torch.randn(b, n, d) if with_ref else None
    idx = torch.stack([torch.randperm(n)[:k] for _ in range(b)])
    rows, lse_rows, ref_rows = torch.randn(b, k, d), torch.randn(b, k), torch.randn(b, k, d) if with_ref else None
    want = [t.clone() if t is not None else None for t in (cache, lse_cache, skips, ref_cache)]
    for bi, (j, i) in itertools.product(range(b), enumerate(range(k))):
        r = idx[bi, j]
        want[0][bi, r] = rows[bi, j]
        want[1][bi, r] = lse_rows[bi, j]
        if with_ref:
            want[3][bi, r] = ref_rows[bi, j]
    want[2] += 1
    want[2][torch.arange(b)[:, None], idx] = 0
    ptrs = [cache.data_ptr(), lse_cache.data_ptr(), skips.data_ptr()]
    ops.cache_update(cache, lse_cache, skips, idx, rows, lse_rows, ref_cache, ref_rows)
    assert ptrs == [cache.data_ptr(), lse_cache.data_ptr(), skips.data_ptr()]  # no copy
    for got, exp in zip((cache, lse_cache, skips, ref_cache), want):
        if exp is not None:
            assert torch.equal(got, exp)


class _TokenBlock(torch.nn.Module):
    """The three ops wired as a block would wire them: select, attend, update."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x, x_ref, lse, skips, cache, lse_cache, q, kk, v):
        idx = ops.token_select(lse, x, x_ref, skips, self.k, 0.5, None)
        b, h, _, d = q.shape
        q_sel = torch.gather(q, 2, idx[:, None, :, None].expand(b, h, self.k, d))
        out, row_lse = ops.sparse_attention(q_sel, kk, v, None, None)
        rows = out.transpose(1, 2).reshape(b, self.k, h * d)
        ops.cache_update(cache, lse_cache, skips, idx, rows, row_lse.mean(1), None, None)
        return cache + 0


def _block_inputs(b=2, n=12, h=2, d=16):
    return (torch.randn(b, n, h * d), torch.randn(b, n, h * d), torch.rand(b, n), torch.zeros(b, n, dtype=torch.int32),
            torch.zeros(b, n, h * d), torch.zeros(b, n), torch.randn(b, h, n, d), torch.randn(b, h, n, d),
            torch.randn(b, h, n, d))


def test_export_and_compile(tmp_path):
    block = _TokenBlock(5)
    args = _block_inputs()
    eager_args = [a.clone() for a in args]
    want = block(*eager_args)
    ep = torch.export.export(block, tuple(a.clone() for a in args))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"astraea.token_select.default", "astraea.sparse_attention.default"} <= targets
    torch.export.save(ep, tmp_path / "block.pt2")
    loaded = torch.export.load(tmp_path / "block.pt2")
    got_args = [a.clone() for a in args]
    torch.testing.assert_close(loaded.module()(*got_args), want)
    assert torch.equal(got_args[3], eager_args[3])  # the skip counters were updated in place
    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(*[a.clone() for a in args]), want)


def test_fake_kernels_have_the_real_strides():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 9, 16), torch.randn(2, 3, 9, 16)
    real = ops.sparse_attention(q, k, v, None, None)
    x = torch.randn(2, 9, 8)
    real_idx = ops.token_select(torch.rand(2, 9), x, x, torch.zeros(2, 9, dtype=torch.int32), 4, 0.5, None)
    with FakeTensorMode() as mode:
        fq, fk, fv, fx = (mode.from_tensor(t) for t in (q, k, v, x))
        fake = ops.sparse_attention(fq, fk, fv, None, None)
        fake_idx = ops.token_select(mode.from_tensor(torch.rand(2, 9)), fx, fx,
                                    mode.from_tensor(torch.zeros(2, 9, dtype=torch.int32)), 4, 0.5, None)
    for r, f in zip((*real, real_idx), (*fake, fake_idx)):
        assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="sparse_attention: q"):
        ops.sparse_attention(torch.randn(1, 2, 3, 16), torch.randn(1, 3, 4, 16), torch.randn(1, 3, 4, 16), None, None)
    with pytest.raises(ValueError, match="token_select"):
        ops.token_select(torch.rand(1, 4), torch.randn(1, 4, 2), torch.randn(1, 4, 2), torch.zeros(1, 4), 5, 0.5, None)


@pytest.mark.skipif(sa._kernels is None, reason="triton is not installed")
@pytest.mark.parametrize("n,d", [(1, 8), (37, 200), (64, 128)])
def test_triton_scores_match_reference(n, d):
    if torch.cuda.is_available():
        pytest.skip("the interpreter run is for CPU machines; tests/test_gpu covers CUDA")
    from astraea.plugins import token_select as ts

    b = 2
    x, x_ref = torch.randn(b, n, d), torch.randn(b, n, d)
    lse, skips = torch.rand(b, n) * 3, torch.randint(0, 4, (b, n), dtype=torch.int32)
    forced = torch.zeros(n, dtype=torch.bool)
    forced[n // 2] = True
    got = ts._scores_triton(lse, x, x_ref, skips, 0.5, forced)
    want = ts.scores(lse.double(), x.double(), x_ref.double(), skips, 0.5, forced)
    assert torch.isinf(got[:, n // 2]).all()
    keep = ~forced
    torch.testing.assert_close(got[:, keep].double(), want[:, keep], atol=1e-5, rtol=1e-5)


def _tied_scores(b: int, n: int) -> torch.Tensor:
    """Scores with the cases a radix select can get wrong: long runs of ties (one straddling
    the k-th place), +-inf, -0.0 beside +0.0, negatives."""
    g = torch.Generator().manual_seed(n)
    s = torch.randn(b, n, generator=g)
    s[0, : n // 3] = 0.5
    s[-1, ::7] = float("inf")
    s[-1, 1::5] = -0.0
    s[-1, 2::11] = 0.0
    s[0, -3:] = float("-inf")
    return s


@pytest.mark.skipif(sa._kernels is None, reason="triton is not installed")
@pytest.mark.parametrize("n,k", [(1, 1), (7, 3), (300, 1), (300, 299), (300, 300), (2048, 1024), (5000, 1700),
                                 (5000, 4999)])
def test_triton_top_k_is_the_reference_selection(n, k):
    """The radix-select kernel picks exactly the reference's rows (int64 keys, torch.topk,
    sort), in ascending order, across chunk borders and ties."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter run is for CPU machines; tests/test_gpu covers CUDA")
    from astraea.plugins import token_select as ts

    s = _tied_scores(2, n)
    got = ts._top_k_triton(s, k, tuned=False)
    assert torch.equal(got, ts.top_k_rows(s, k))
    if n == 5000:  # an independent check of the set: every chosen score >= every other
        chosen = torch.zeros(n, dtype=torch.bool)
        chosen[got[1]] = True
        assert s[1][chosen].min() >= s[1][~chosen].max()


@pytest.mark.skipif(sa._kernels is None, reason="triton is not installed")
def test_every_top_k_config_is_the_reference_selection():
    """Each chunk size the autotuner may pick (one and several chunks a pass)."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter run is for CPU machines; tests/test_gpu covers CUDA")
    from astraea.plugins import token_select as ts
    from astraea.plugins.kernels import select

    s = _tied_scores(2, 9000)
    for config in select.TOP_K_CONFIGS:
        out = torch.empty((2, 4000), dtype=torch.int64)
        select.top_k_kernel[(2,)](s, out, 9000, 4000, **config.kwargs, num_warps=config.num_warps)
        assert torch.equal(out, ts.top_k_rows(s, 4000)), config


_TTIR = """
import sys
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend

from astraea.plugins.kernels import select

signatures = {
    "score_kernel": ({"X": "*bf16", "XR": "*bf16", "LSE": "*fp32", "SKIPS": "*i32", "FORCED": "*i1", "OUT": "*fp32",
                      "w_beta": "fp32", "R": "i32", "N": "i32", "D": "i32", "HAS_FORCED": "constexpr",
                      "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"}, {"HAS_FORCED": True, "BLOCK_R": 32, "BLOCK_D": 128}),
    "top_k_kernel": ({"S": "*fp32", "OUT": "*i64", "N": "i32", "K": "i32", "BLOCK": "constexpr"}, {"BLOCK": 2048}),
}
target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
options = backend.parse_options({})
for kernel, (signature, constexprs) in signatures.items():
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    name = kernel.split()[0]
    module = ASTSource(getattr(select, name), signature, constexprs).make_ir(
        target, options, backend.get_codegen_implementation(options), backend.get_module_map(), context)
    assert f"tt.func public @{name}" in str(module), kernel
print("ok")
"""


@pytest.mark.skipif(sa._kernels is None, reason="triton is not installed")
def test_select_kernels_compile_for_hopper():
    """Triton's front end (Python to TTIR) for an sm_90 target, on this CPU and without the
    interpreter (a subprocess): it rejects what the interpreter lets through (a reassigned
    constexpr cost a GPU run once)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _TTIR], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_output_is_laid_out_like_the_query():
    """As SDPA does: a graph that permutes the output back and views it depends on it."""
    q = torch.randn(2, 7, 3, 16).permute(0, 2, 1, 3)  # (B, H, M, D) over (B, M, H, D) memory
    k, v = torch.randn(2, 3, 11, 16), torch.randn(2, 3, 11, 16)
    out, _ = ops.sparse_attention(q, k, v, None, None)
    assert out.stride() == q.stride()
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    out.permute(0, 2, 1, 3).view(2, 7, 48)  # what the Wan graph does next


def test_attention_backend_choice_on_the_cpu(monkeypatch):
    """On the CPU: the CPU flash kernel, or the reference; a bad ASTRAEA_ATTENTION is named."""
    q = torch.randn(1, 2, 5, 64, dtype=torch.bfloat16)
    for want, got in (("auto", "cpu"), ("cpu", "cpu"), ("triton", "reference"), ("cudnn", "reference"),
                      ("reference", "reference")):
        monkeypatch.setenv("ASTRAEA_ATTENTION", want)
        assert sa.backend(q, None) == got
    monkeypatch.setenv("ASTRAEA_ATTENTION", "fa3")
    with pytest.raises(ValueError, match="ASTRAEA_ATTENTION='fa3'"):
        sa.backend(q, None)
