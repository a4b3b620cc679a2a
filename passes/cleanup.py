"""cleanup: drop the capture's marks, dead code, and refresh every node's `meta['val']`.

The marks (`astraea::token_mark` / `token_table`, copies of their input) are replaced by
their input; dead nodes go; then fake-tensor propagation recomputes `meta['val']` on every
node, so later passes and a re-export see the rewritten shapes (N -> k).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

MARKS = {torch.ops.astraea.token_mark.default, torch.ops.astraea.token_table.default}


def cleanup(gm: fx.GraphModule, ctx) -> dict[str, int]:
    marks = [n for n in gm.graph.nodes if n.target in MARKS]
    for node in marks:
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    vals = [p.meta.get("val") for p in placeholders]
    mode = next(v.fake_mode for v in vals if isinstance(v, torch.Tensor))
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*vals)
    return {"marks_removed": len(marks), "dead": before - len(gm.graph.nodes)}
