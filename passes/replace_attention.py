"""replace_attention: each block's self-attention becomes query-only attention.

`sdpa(q_sel, k, v)` -> `astraea::sparse_attention(q_sel, k, v)`: the k selected queries
against all N keys and values; its row LSE, averaged over heads, is kept for the block's
state (the next step's selection score). Cross-attention keeps its SDPA: its queries are
already the selected rows and its keys are the text.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


def replace_attention(gm: fx.GraphModule, ctx) -> dict[str, int]:
    replaced = 0
    for node in list(gm.graph.nodes):
        if node.target is not SDPA or node.meta.get("astraea_attention") != "self":
            continue
        block = node.meta["astraea_block"]
        if len(node.args) > 3 or any(v not in (None, 0.0, False) for v in node.kwargs.values()):
            raise ValueError(f"{node.name}: self-attention with a mask, dropout, causality or scale is not supported yet")
        q, k, v = node.args[:3]
        with gm.graph.inserting_after(node):
            sparse = gm.graph.call_function(torch.ops.astraea.sparse_attention.default, (q, k, v, None, None))
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
    return {"sparse_attention": replaced}
