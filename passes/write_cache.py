"""write_cache: each block's fresh rows into its state; the next block reads the full cache.

At the block's output (its subset node used outside the block) the k fresh rows are
written into the cached output, their LSE and input rows into the state, the skip
counters advanced and reset at the selected rows, all functionally (new state becomes
graph outputs, in block order: cache, lse, ref, skips). Every use of the block output
outside the block now reads the full new cache. The row writes are `aten.index_put` with
(batch, row) indices: when an engine copies the new state back into its state inputs
(engines.py), Inductor and AOTInductor turn them into in-place writes of k rows into the
caller's buffers, so a step holds one copy of the state, not two.

A float8 cache (ctx.cache_dtype, with a `scale` state input) stores each written row
divided by its scale, amax / the format's largest value, so every row uses the format's
whole range; the block output outside the block is then the dequantized cache with the
k fresh rows written over it exact: the selected rows still equal the dense block's, the
others are the cache's (now float8) rows, as the oracle states. New state per block:
cache, lse, ref, skips, then scale.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .graph_util import add_outputs, call, gather_rows

aten = torch.ops.aten


def _block_output(gm: fx.GraphModule, block: str) -> fx.Node:
    outs = [n for n in gm.graph.nodes if n.meta.get("astraea_block") == block and n.meta.get("astraea_rows") == "subset"
            and any(u.meta.get("astraea_block") != block and u.target is not aten._assert_tensor_metadata.default
                    for u in n.users)]
    if len(outs) != 1:
        raise ValueError(f"{block}: expected one token-carrying block output, found {[n.name for n in outs]}")
    return outs[0]


def _write_float8(g: fx.Graph, st: dict, at: list, rows: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node]:
    """The rows into a float8 cache with a float32 scale a row; the full block output (the
    dequantized cache, the fresh rows exact)."""
    dtype, stream = st["cache"].meta["val"].dtype, st["mark"].meta["val"].dtype
    f32 = g.call_function(aten._to_copy.default, (rows,), {"dtype": torch.float32})
    amax = call(g, aten.amax.default, call(g, aten.abs.default, f32), [-1])
    s = call(g, aten.div.Tensor, call(g, aten.clamp_min.default, amax, 1e-30), torch.finfo(dtype).max)
    q = call(g, aten.div.Tensor, f32, call(g, aten.unsqueeze.default, s, -1))
    q = g.call_function(aten._to_copy.default, (q,), {"dtype": dtype})
    cache = call(g, aten.index_put.default, st["cache"], at, q)
    scale = call(g, aten.index_put.default, st["scale"], at, s)
    deq = call(g, aten.mul.Tensor, g.call_function(aten._to_copy.default, (cache,), {"dtype": torch.float32}),
               call(g, aten.unsqueeze.default, scale, -1))
    deq = g.call_function(aten._to_copy.default, (deq,), {"dtype": stream})
    return cache, scale, call(g, aten.index_put.default, deq, at, rows)


def write_cache(gm: fx.GraphModule, ctx) -> dict[str, int]:
    new_state = []
    for block, st in ctx.blocks.items():
        rows = _block_output(gm, block)
        outside = [u for u in rows.users if u.meta.get("astraea_block") != block]
        idx, g = st["idx"], gm.graph
        b, k = idx.meta["val"].shape
        with g.inserting_before(rows.next):  # in creation order, right after the rows
            arange = g.call_function(aten.arange.default, (b,), {"device": idx.meta["val"].device})
            batch = call(g, aten.view.default, arange, [b, 1])
            at = [batch, idx]  # (B, 1) and (B, k) broadcast to the (B, k) rows written
            if "scale" in st:
                cache, scale, full = _write_float8(g, st, at, rows)
            else:
                cache = full = call(g, aten.index_put.default, st["cache"], at, rows)
            lse = call(g, aten.index_put.default, st["lse"], at, st["row_lse"])
            if "seen" in st:  # the sketch of the selected rows' input
                x_sel = gather_rows(g, st["seen"], idx, 1)
            else:
                x_sel = st.get("x_sel") or gather_rows(g, st["mark"], idx, 1)
            ref = call(g, aten.index_put.default, st["ref"], at, x_sel)
            skips = call(g, aten.scatter.value, call(g, aten.add.Tensor, st["skips"], 1), 1, idx, 0)
        for user in outside:
            user.replace_input_with(rows, full)
        new_state += [cache, lse, ref, skips] + ([scale] if "scale" in st else [])
    add_outputs(gm, new_state)
    return {"caches": len(ctx.blocks), "state_outputs": len(new_state)}
