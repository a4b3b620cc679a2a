"""gather_subset: the subset nodes of each block now compute only the k selected rows.

Inserts a row gather (plain aten expand + gather) on every full-to-subset edge that
classify_rows recorded, memoised per source, and rewrites the size arguments of subset
view/reshape/expand nodes from N to k at their token axis. `meta['val']` is refreshed by
the cleanup pass.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .graph_util import gather_rows

aten = torch.ops.aten
SIZED = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}


def gather_subset(gm: fx.GraphModule, ctx) -> dict[str, int]:
    counts = {"gathers": 0, "resized": 0}
    memo: dict[tuple[fx.Node, str], fx.Node] = {}
    for node in list(gm.graph.nodes):
        block = node.meta.get("astraea_block")
        if node.meta.get("astraea_rows") != "subset" or block not in ctx.blocks:
            continue
        idx = ctx.blocks[block]["idx"]
        args = list(node.args)
        for i in node.meta.get("astraea_gather", []):
            src = args[i]
            if (src, block) not in memo:
                with gm.graph.inserting_before(node):
                    memo[(src, block)] = gather_rows(gm.graph, src, idx, src.meta["astraea_token_dim"])
                if src is ctx.blocks[block]["mark"]:
                    ctx.blocks[block]["x_sel"] = memo[(src, block)]  # the block input's selected rows
                counts["gathers"] += 1
            args[i] = memo[(src, block)]
        if node.target in SIZED:
            sizes = list(args[1])
            dim = node.meta["astraea_token_dim"]
            if sizes[dim] != ctx.layout.video_tokens:
                raise ValueError(f"{node.name}: size {sizes[dim]} at the token axis is not N")
            sizes[dim] = ctx.budget
            args[1] = sizes
            counts["resized"] += 1
        node.args = tuple(args)
    return counts
