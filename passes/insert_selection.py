"""insert_selection: token selection at every block's input, with the block state as inputs.

For each block's `astraea::token_mark` adds four graph inputs, the state the runtime owns
across steps (cache (B, N, D) in the stream's dtype, lse (B, N) float32, ref (B, N, D), skips
(B, N) int32), and `idx = astraea::token_select(lse, x, ref, skips, k, w_beta)` right after
the mark. With `ctx.cache_dtype` float8_e4m3fn the cache holds the rows in float8, with a
fifth input, one float32 scale a row (B, N) (write_cache.py). With `ctx.sketch_dim` the
reference is the block input's sketch (B, N, dim) float32 (token_select.sketch), and the
score compares it with the sketch of x. State is explicit (inputs in, new state out):
AOTInductor packages and TensorRT engines both take it that way, and the runtime donates
the buffers.
At the dense budget (k = N) the selection is every row in order, an arange: no scores and
no top-k (and gather_subset inserts no gathers), the state written as at any budget.
With `ctx.shards` P > 1 the rows are P contiguous shards, each choosing its share of the k
rows by its own top-k (`select_in_shards`; the first k mod P shards one row more): what a
sequence-parallel step over P ranks selects, each rank seeing only its rows.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from astraea.plugins.token_select import sketch

from .graph_util import add_placeholder, call

MARK = torch.ops.astraea.token_mark.default
aten = torch.ops.aten


def shard_sizes(total: int, shards: int) -> list[int]:
    """`total` split over `shards` as evenly as it goes, the first ones one more."""
    return [total // shards + (1 if s < total % shards else 0) for s in range(shards)]


def select_in_shards(lse, x, ref, skips, k: int, w_beta: float, shards: int) -> torch.Tensor:
    """(B, k) int64 ascending: each of `shards` contiguous row ranges chooses its share of k
    by astraea::token_select over its own rows (rank-local state only)."""
    n = x.shape[1]
    picks, start = [], 0
    for rows, share in zip(shard_sizes(n, shards), shard_sizes(k, shards)):
        end = start + rows
        if share == rows:
            idx = torch.arange(start, end, device=x.device).expand(x.shape[0], rows)
        else:
            idx = torch.ops.astraea.token_select(lse[:, start:end], x[:, start:end], ref[:, start:end],
                                                 skips[:, start:end], share, w_beta, None) + start
        picks.append(idx)
        start = end
    return torch.cat(picks, dim=1)


def insert_selection(gm: fx.GraphModule, ctx) -> dict[str, int]:
    if ctx.budget is None or not 1 <= ctx.budget <= ctx.layout.video_tokens:
        raise ValueError(f"budget {ctx.budget} must be in 1..{ctx.layout.video_tokens}")
    if not 1 <= ctx.shards <= ctx.layout.video_tokens:
        raise ValueError(f"selection.shards {ctx.shards} must be in 1..{ctx.layout.video_tokens} (the video rows)")
    marks = [n for n in gm.graph.nodes if n.target is MARK]
    inputs = 0
    for mark in marks:
        x = mark.meta["val"]
        b, n, _ = x.shape
        block = next(iter(mark.users)).meta["astraea_block"]
        i = mark.args[1]
        ref = x.new_empty((b, n, ctx.sketch_dim), dtype=torch.float32) if ctx.sketch_dim else x.new_empty(x.shape)
        cache_dtype = ctx.cache_dtype or x.dtype
        state = {
            "cache": add_placeholder(gm, f"state_{i}_cache", x.new_empty(x.shape, dtype=cache_dtype)),
            "lse": add_placeholder(gm, f"state_{i}_lse", x.new_empty((b, n), dtype=torch.float32)),
            "ref": add_placeholder(gm, f"state_{i}_ref", ref),
            "skips": add_placeholder(gm, f"state_{i}_skips", x.new_empty((b, n), dtype=torch.int32)),
        }
        if cache_dtype != x.dtype:
            state["scale"] = add_placeholder(gm, f"state_{i}_scale", x.new_empty((b, n), dtype=torch.float32))
        inputs += len(state)
        seen = mark  # what the score compares with the reference: the block input, or its sketch
        if ctx.sketch_dim:
            with gm.graph.inserting_after(mark):
                seen = gm.graph.call_function(sketch, (mark, ctx.sketch_dim))
            seen.meta["val"] = ref
            state["seen"] = seen
        with gm.graph.inserting_before(seen.next):  # in creation order, right after `seen`
            if ctx.budget == ctx.layout.video_tokens:  # dense: every row, in order (what top-N would give)
                rows = gm.graph.call_function(aten.arange.default, (ctx.budget,), {"device": x.device})
                idx = call(gm.graph, aten.expand.default, call(gm.graph, aten.view.default, rows, [1, ctx.budget]),
                           [b, ctx.budget])
            elif ctx.shards > 1:
                idx = gm.graph.call_function(select_in_shards, (state["lse"], seen, state["ref"], state["skips"],
                                                                ctx.budget, ctx.w_beta, ctx.shards))
            else:
                idx = gm.graph.call_function(torch.ops.astraea.token_select.default,
                                             (state["lse"], seen, state["ref"], state["skips"], ctx.budget, ctx.w_beta,
                                              None))
        idx.meta["val"] = x.new_empty((b, ctx.budget), dtype=torch.int64)
        idx.meta["astraea_block"] = block
        ctx.blocks[block] = {"mark": mark, "idx": idx, "index": i, **state}
    return {"selections": len(marks), "state_inputs": inputs}
