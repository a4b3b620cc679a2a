"""shard_attention: under sequence parallelism, each query-only attention spans every rank's rows.

In a rank's program (captured on its shard of the rows: `parallel.ulysses` P > 1) each
`astraea::sparse_attention(q_sel, k, v, mask, scale)` that replace_attention wrote sees only
this rank's keys. It becomes `astraea.parallel.ulysses_sparse_attention`: an all-to-all
gives each rank H / P heads of every rank's selected queries and keys, the op runs, and a
second all-to-all returns this rank's rows over all heads (functional collectives, so the
compilers keep them). Factored attention (within a frame or a position: `group_attention`
below the dense budget, `factored_attention` at it) gets the same exchange around it: after
the first all-to-all the token axis is whole, so are its frames and positions; the selected
rows' indices are gathered from every rank onto that axis.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from astraea.errors import AstraeaError

SPARSE = torch.ops.astraea.sparse_attention.default
GROUPED = (torch.ops.astraea.group_attention.default, torch.ops.astraea.factored_attention.default)


def shard_attention(gm: fx.GraphModule, ctx) -> dict[str, int]:
    if ctx.ulysses == 1:
        return {}
    from astraea.parallel import ulysses_factored_attention, ulysses_group_attention, ulysses_sparse_attention

    swap = {SPARSE: ulysses_sparse_attention, GROUPED[0]: ulysses_group_attention,
            GROUPED[1]: ulysses_factored_attention}
    count = 0
    for node in gm.graph.nodes:
        if node.target in swap:
            heads = node.args[0].meta["val"].shape[1]
            if heads % ctx.ulysses:
                raise AstraeaError(f"parallel.ulysses: {heads} heads do not split over {ctx.ulysses} ranks "
                                   "(Ulysses gives each rank H / P heads): choose a degree that divides them")
            extra = {}
            if node.target is SPARSE:  # joint attention: the text rows before and after this rank's video rows
                k, start = node.args[1], node.args[0].meta.get("astraea_token_start", 0)
                extra = {"before": start, "after": k.meta["val"].shape[2] - start - ctx.layout.video_tokens}
            node.target = swap[node.target]
            node.kwargs = {**node.kwargs, "group": ctx.ulysses_group, **extra}  # its ranks (a CFG branch's, under cfg)
            count += 1
    return {"ulysses_attention": count}
