"""gather_subset: the subset nodes of each block now compute only the k selected rows.

Inserts a row gather (plain aten expand + gather) on every full-to-subset edge that
classify_rows recorded, memoised per source, and rewrites the size arguments of subset
view/reshape/expand nodes from N to k at their token axis. `meta['val']` is refreshed by
the cleanup pass. At the dense budget (k = N) every edge stays as it was: the selection is
every row in order, so a gather would only copy.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .graph_util import gather_rows

aten = torch.ops.aten
SIZED = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}
RANGED = {aten.slice.Tensor: (1, 3), aten.slice_scatter.default: (2, 4)}  # (dim arg, end arg)


def _resize(node: fx.Node, args: list, n: int, k: int) -> int:
    """N -> k in the size arguments of a subset node along its token axis (text rows kept)."""
    if node.target in SIZED:
        dim = node.meta["astraea_token_dim"]
        sizes = list(args[1])
        total = node.meta["val"].shape[dim]
        if sizes[dim] == -1:
            return 0
        if sizes[dim] != total:
            raise ValueError(f"{node.name}: size {sizes[dim]} at the token axis is not its {total} rows")
        sizes[dim] = total - n + k
        args[1] = sizes
        return 1
    if node.target is aten.split_with_sizes.default:
        src = node.args[0]
        if (node.args[2] if len(node.args) > 2 else 0) % src.meta["val"].dim() != src.meta["astraea_token_dim"]:
            return 0
        start = src.meta["astraea_token_start"]
        sizes = list(args[1])
        bounds = [sum(sizes[:i]) for i in range(len(sizes))]
        sizes[bounds.index(start)] = k  # the piece that is the video rows
        args[1] = sizes
        return 1
    if node.target in RANGED:
        src = node.args[0]
        dim_arg, end_arg = RANGED[node.target]
        if node.args[dim_arg] % src.meta["val"].dim() != src.meta["astraea_token_dim"] or len(args) <= end_arg:
            return 0
        end, total = args[end_arg], src.meta["val"].shape[src.meta["astraea_token_dim"]]
        if end is not None and end < 0:  # counted from the end (the text after the video): unchanged
            return 0
        if end is not None and end < total:  # an explicit end inside the axis: shift past the video rows
            start = src.meta["astraea_token_start"]
            args[end_arg] = end if end <= start else end - n + k
            return 1
    return 0


def gather_subset(gm: fx.GraphModule, ctx) -> dict[str, int]:
    counts = {"gathers": 0, "resized": 0}
    if ctx.budget == ctx.layout.video_tokens:  # every row in order: a gather would copy its source unchanged
        return counts
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
                    memo[(src, block)] = gather_rows(gm.graph, src, idx, src.meta["astraea_token_dim"],
                                                     src.meta["astraea_token_start"], ctx.layout.video_tokens)
                if src is ctx.blocks[block]["mark"]:
                    ctx.blocks[block]["x_sel"] = memo[(src, block)]  # the block input's selected rows
                counts["gathers"] += 1
            args[i] = memo[(src, block)]
        resized = _resize(node, args, ctx.layout.video_tokens, ctx.budget)
        counts["resized"] += resized
        node.args = tuple(args)
    return counts
