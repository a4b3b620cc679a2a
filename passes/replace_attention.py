"""replace_attention: each block's self-attention becomes query-only attention.

`sdpa(q_sel, k, v)` -> `astraea::sparse_attention(q_sel, k, v)`: the k selected queries
against all N keys and values (a boolean key mask (B, 1, 1, S) becomes the op's key mask);
its row LSE, averaged over heads, is kept for the block's state (the next step's score). Cross-attention keeps its SDPA: its queries are
already the selected rows and its keys are the text. A factored attention
(`astraea::factored_attention`: within a frame or a position) becomes its query-only form,
`astraea::group_attention(q_sel, k, v, idx, frames, temporal)`: the selected queries against
their own group's keys, the groups given by the selection's indices; at the dense budget it
stays as it is (every row in order).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


FACTORED = torch.ops.astraea.factored_attention.default


def _factored(gm: fx.GraphModule, node: fx.Node, ctx) -> fx.Node:
    """A factored attention's query-only form (below the dense budget); its row LSE (B, k), head mean."""
    block = node.meta["astraea_block"]
    if ctx.budget < ctx.layout.video_tokens:
        q, k, v, frames, temporal = node.args
        with gm.graph.inserting_after(node):
            group = gm.graph.call_function(torch.ops.astraea.group_attention.default,
                                           (q, k, v, ctx.blocks[block]["idx"], frames, temporal))
        group.meta["astraea_block"] = block
        node.replace_all_uses_with(group)
        gm.graph.erase_node(node)
        node = group
    lse = next((u for u in node.users if u.target is operator.getitem and u.args[1] == 1), None)
    with gm.graph.inserting_after(node):
        if lse is None:
            lse = gm.graph.call_function(operator.getitem, (node, 1))
    with gm.graph.inserting_after(lse):
        mean = gm.graph.call_function(aten.mean.dim, (lse, [1]))
    for n in (lse, mean):
        n.meta["astraea_block"] = block
    return mean


def replace_attention(gm: fx.GraphModule, ctx) -> dict[str, int]:
    replaced = factored = 0
    for node in list(gm.graph.nodes):
        if node.target is FACTORED and node.meta.get("astraea_attention") == "self":
            ctx.blocks[node.meta["astraea_block"]]["row_lse"] = _factored(gm, node, ctx)
            factored += 1
            continue
        if node.target is not SDPA or node.meta.get("astraea_attention") != "self":
            continue
        block = node.meta["astraea_block"]
        q, k, v = node.args[:3]
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        rest = list(node.args[4:]) + [v_ for key, v_ in node.kwargs.items() if key != "attn_mask"]
        if any(x not in (None, 0.0, False) for x in rest):
            raise ValueError(f"{node.name}: self-attention with dropout, causality or a scale is not supported yet")
        key_mask = None
        if mask is not None:  # a key mask broadcast over heads and queries (HunyuanVideo's padded text)
            shape = tuple(mask.meta["val"].shape)
            if mask.meta["val"].dtype != torch.bool or shape[1:3] != (1, 1):
                raise ValueError(f"{node.name}: only a boolean key mask (B, 1, 1, S) is supported, not {shape}")
            with gm.graph.inserting_before(node):
                key_mask = gm.graph.call_function(aten.view.default, (mask, [shape[0], shape[3]]))
        with gm.graph.inserting_after(node):
            sparse = gm.graph.call_function(torch.ops.astraea.sparse_attention.default, (q, k, v, key_mask, None))
        with gm.graph.inserting_after(sparse):
            out = gm.graph.call_function(operator.getitem, (sparse, 0))
        with gm.graph.inserting_after(out):
            lse = gm.graph.call_function(operator.getitem, (sparse, 1))
        with gm.graph.inserting_after(lse):
            row_lse = gm.graph.call_function(aten.mean.dim, (lse, [1]))
        start = q.meta["astraea_token_start"]
        if start or q.meta["val"].shape[2] != ctx.layout.video_tokens:  # joint attention: keep the video rows
            with gm.graph.inserting_after(row_lse):
                row_lse = gm.graph.call_function(aten.slice.Tensor, (row_lse, 1, start, start + ctx.budget))
        for n in (sparse, out, lse, row_lse):
            n.meta["astraea_block"] = block
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        ctx.blocks[block]["row_lse"] = row_lse
        replaced += 1
    return {"sparse_attention": replaced} | ({"factored_attention": factored} if factored else {})
