"""The token-wise rewrite against the dense model and the oracle of ASTRAEA.md section 1
(selected rows = the dense block's rows on the same full input; the others = the block's
cache), over two steps, for Wan (self + cross attention) and CogVideoX (joint [text; video]
attention, with and without rotary tables)."""

from __future__ import annotations

import pytest
import torch

from astraea import loader
from astraea.passes import pipeline
from astraea.passes.insert_selection import select_in_shards, shard_sizes
from astraea.plugins.token_select import sketch
from astraea.tokenwise import copy_graph_module
from conftest import block_calls, captured, tiny_config

SDPA = torch.ops.aten.scaled_dot_product_attention.default
VIDEO = {"frames": 9, "height": 48, "width": 64}
VIDEOS = {"opensora": {"frames": 17, "height": 32, "width": 48}}  # its VAE: 17 frames a latent group


def _video(family):
    return VIDEOS.get(family, VIDEO)


def _blocks_in_call_order(model, example):
    """The blocks as a forward calls them (STDiT3 alternates its spatial and temporal lists)."""
    blocks = [b for name in model.family.block_containers for b in getattr(model.transformer, name)]
    order = []
    handles = [b.register_forward_pre_hook(lambda m, *_: order.append(m)) for b in blocks]
    with torch.no_grad():
        model.transformer(**example)
    for h in handles:
        h.remove()
    return order


def _rewritten(family, preset, k, sketch_dim=0, cache_dtype=None, shards=1):
    model, cap = captured(family, preset, _video(family))  # one capture a family, a copy of its graph rewritten
    gm = copy_graph_module(cap.program.graph_module)
    ctx = pipeline.PassContext(model.family, cap.layout, budget=k, sketch_dim=sketch_dim, cache_dtype=cache_dtype,
                               shards=shards)
    pipeline.run(gm, ctx)
    return model, cap, gm, ctx


def _run(cap, gm, example, state):
    flat = cap.program._graph_module_flat_inputs((), example)
    with torch.no_grad():
        out = gm(*flat, *state)
    return out[0], list(out[1:])


def _zero_state(x, blocks, sketch_dim=0, cache_dtype=None):
    b, n, d = x.shape
    one = [torch.zeros(b, n, d, dtype=cache_dtype), torch.zeros(b, n), torch.zeros(b, n, sketch_dim or d),
           torch.zeros(b, n, dtype=torch.int32)] + ([torch.zeros(b, n)] if cache_dtype is not None else [])  # + scale
    return [t.clone() for _ in range(blocks) for t in one]


@pytest.mark.parametrize("family,preset,budget,sketch_dim,shards", [
    *[(f, p, b, 0, 1) for f, p in [("wan", "tiny"), ("cogvideox", "tiny"), ("cogvideox", "tiny-rotary"),
                                   ("hunyuan_video", "tiny")] for b in (1.0, 0.5, 0.09)],
    ("wan", "tiny", 0.5, 8, 1), ("hunyuan_video", "tiny", 0.3, 8, 1),  # Delta from a sketch of the block input
    ("wan", "tiny", 0.5, 0, 3), ("cogvideox", "tiny", 0.3, 0, 2),  # each of 3 (2) row shards choosing its share
    # STDiT3: spatial and temporal blocks, attention within a frame or a position on every row
    *[("opensora", "tiny", b, 0, 1) for b in (1.0, 0.5, 0.09)], ("opensora", "tiny", 0.5, 8, 1),
])
def test_rewrite_follows_the_oracle_over_two_steps(family, preset, budget, sketch_dim, shards):
    probe = tiny_config(family, preset, video=_video(family))
    n = loader.load_model(probe).layout(probe.video).video_tokens
    k = max(1, round(budget * n))
    _, cap_dense, gm_dense, _ = _rewritten(family, preset, n, sketch_dim)  # step 0 is always dense
    model, cap, gm, ctx = _rewritten(family, preset, k, sketch_dim, shards=shards)
    assert not [x for x in gm.graph.nodes if x.target is SDPA and x.meta.get("astraea_attention") == "self"]
    selects = [x for x in gm.graph.nodes if x.target in (torch.ops.astraea.token_select.default, select_in_shards)]
    if k == n:  # the dense budget selects every row in order: no scores, no top-k, no row gathers
        assert not selects and not [x for x in gm_dense.graph.nodes if x.target is torch.ops.astraea.token_select.default]
        assert ctx.stats["gather_subset"]["gathers"] == 0
    else:
        assert len(selects) == len(ctx.blocks) and ctx.stats["gather_subset"]["gathers"] > 0
    ex0 = cap.example
    blocks = _blocks_in_call_order(model, ex0)
    calls0, want0 = block_calls(model, ex0)
    out0, state = _run(cap_dense, gm_dense, ex0, _zero_state(calls0[0]["hidden_states"], len(blocks), sketch_dim))
    torch.testing.assert_close(out0, want0, atol=1e-5, rtol=1e-5)  # budget N == the dense model
    ex1 = dict(ex0, hidden_states=ex0["hidden_states"] + 0.3 * torch.randn_like(ex0["hidden_states"]),
               timestep=(ex0["timestep"] * 0.9).to(ex0["timestep"].dtype))
    calls, _ = block_calls(model, ex1)
    out1, new_state = _run(cap, gm, ex1, [t.clone() for t in state])
    chain = {}  # the token-wise run's own stream: block inputs are the previous caches
    for b, block in enumerate(blocks):
        call = {**calls[b], **chain}
        cache_old, lse_old, ref_old, skips_old = state[4 * b: 4 * b + 4]
        cache, lse, ref, skips = new_state[4 * b: 4 * b + 4]
        seen = sketch(call["hidden_states"], sketch_dim) if sketch_dim else call["hidden_states"]
        # the selection: the k best rows by the float64 score of the old state and this input
        score = lse_old.double() * (seen.double() - ref_old.double()).norm(dim=-1) + 0.5 * torch.exp(skips_old.double())
        want_rows, start = [], 0  # each shard's own top rows, its share of k
        for rows, share in zip(shard_sizes(score.shape[1], shards), shard_sizes(k, shards)):
            want_rows.append(torch.topk(score[:, start:start + rows], share, dim=-1).indices + start)
            start += rows
        want_rows = torch.sort(torch.cat(want_rows, dim=1), dim=-1).values
        assert torch.equal(torch.nonzero(skips == 0)[:, 1].view(-1, k), want_rows)
        with torch.no_grad():
            dense = block(**call)
        dense_video = dense[0] if isinstance(dense, tuple) else dense
        fresh = skips == 0
        assert fresh.sum(dim=1).tolist() == [k, k]
        torch.testing.assert_close(cache[fresh], dense_video[fresh], atol=1e-5, rtol=1e-5)
        assert torch.equal(cache[~fresh], cache_old[~fresh])
        assert torch.equal(skips[~fresh], skips_old[~fresh] + 1)
        assert torch.equal(ref[fresh], seen[fresh])
        chain["hidden_states"] = cache  # the next block reads the full cache ...
        if isinstance(dense, tuple):
            chain["encoder_hidden_states"] = dense[1]  # ... and the text rows, always recomputed


def test_float8_cache_follows_the_oracle_within_its_rounding():
    """selection.cache float8: the selected rows leave the block exact (the next block reads
    them as the dense block made them); the cache keeps them as float8 times a float32 scale
    a row (amax / 448), within float8 e4m3's rounding of the float64 rows; the other rows are
    the old cache's, dequantized; state per block: cache, lse, ref, skips, scale."""
    f8 = torch.float8_e4m3fn
    probe = tiny_config("wan", "tiny", video=VIDEO)
    n = loader.load_model(probe).layout(probe.video).video_tokens
    k = n // 2
    _, cap_dense, gm_dense, _ = _rewritten("wan", "tiny", n, cache_dtype=f8)
    model, cap, gm, ctx = _rewritten("wan", "tiny", k, cache_dtype=f8)
    assert ctx.stats["insert_selection"]["state_inputs"] == 5 * len(ctx.blocks)
    blocks = list(model.transformer.blocks)
    ex0 = cap.example
    calls0, want0 = block_calls(model, ex0)
    out0, state = _run(cap_dense, gm_dense, ex0, _zero_state(calls0[0]["hidden_states"], len(blocks), cache_dtype=f8))
    torch.testing.assert_close(out0, want0, atol=1e-5, rtol=1e-5)  # fresh rows exact: budget N is still dense
    ex1 = dict(ex0, hidden_states=ex0["hidden_states"] + 0.3 * torch.randn_like(ex0["hidden_states"]),
               timestep=(ex0["timestep"] * 0.9).to(ex0["timestep"].dtype))
    calls, _ = block_calls(model, ex1)
    _, new_state = _run(cap, gm, ex1, [t.clone() for t in state])
    chain, quantized = {}, 0
    for i, block in enumerate(blocks):
        call = {**calls[i], **chain}
        cache_old, lse_old, ref_old, skips_old, scale_old = state[5 * i: 5 * i + 5]
        cache, lse, ref, skips, scale = new_state[5 * i: 5 * i + 5]
        assert cache.dtype == f8 and scale.dtype == torch.float32
        score = lse_old.double() * (call["hidden_states"].double() - ref_old.double()).norm(dim=-1) \
            + 0.5 * torch.exp(skips_old.double())
        want_rows = torch.sort(torch.topk(score, k, dim=-1).indices, dim=-1).values
        fresh = skips == 0
        assert torch.equal(torch.nonzero(fresh)[:, 1].view(-1, k), want_rows)
        with torch.no_grad():
            dense = block(**call).double()
        amax = dense.abs().amax(-1)
        torch.testing.assert_close(scale[fresh].double(), (amax / 448)[fresh], atol=0, rtol=1e-5)
        deq = cache.double() * scale.double()[..., None]
        err = (deq[fresh] - dense[fresh]).abs()
        bound = dense[fresh].abs() / 16 + (scale.double()[fresh] * 2.0**-9)[..., None] + 1e-5  # half an ulp, e4m3
        assert (err <= bound).all(), float((err - bound).max())
        quantized += int((err > 1e-4).sum())
        assert torch.equal(cache[~fresh].view(torch.uint8), cache_old[~fresh].view(torch.uint8))
        assert torch.equal(scale[~fresh], scale_old[~fresh])
        # the next block reads the dequantized cache with this block's fresh rows exact
        nxt = cache.float() * scale[..., None]
        nxt[fresh] = dense[fresh].float()
        chain["hidden_states"] = nxt
    assert quantized > 0  # the cache really holds rounded rows
