"""annotate_blocks: mark every node with its transformer block and every SDPA with its kind.

Blocks come from `nn_module_stack` (export keeps the module path of each node): a node
belongs to block `<container>.<i>` for the adapter's `block_containers`. An SDPA (or an
`astraea::factored_attention`) whose
attention module is one of the adapter's `self_attention` names mixes the video tokens
("self"); the others attend to text ("cross"). Writes node.meta["astraea_block"] and
node.meta["astraea_attention"]; changes no node.
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx

SDPA = torch.ops.aten.scaled_dot_product_attention.default
FACTORED = torch.ops.astraea.factored_attention.default


def annotate_blocks(gm: fx.GraphModule, ctx) -> dict[str, int]:
    pattern = re.compile(rf"^({'|'.join(map(re.escape, ctx.family.block_containers))})\.(\d+)$")
    blocks: set[str] = set()
    counts = {"self_attention": 0, "cross_attention": 0}
    for node in gm.graph.nodes:
        paths = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
        block = next((p for p in paths if pattern.match(p)), None)
        if block is not None:
            node.meta["astraea_block"] = block
            blocks.add(block)
        if node.target in (SDPA, FACTORED):
            if block is None:
                continue  # attention outside the blocks (e.g. a text refiner): left as it is
            leaf = paths[-1].rsplit(".", 1)[-1]
            kind = "self" if leaf in ctx.family.self_attention else "cross"
            node.meta["astraea_attention"] = kind
            counts[f"{kind}_attention"] += 1
    return {"blocks": len(blocks), **counts}
