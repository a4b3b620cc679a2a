"""Small helpers the rewrite passes share: adding placeholders and outputs, fake values, and
gathering the selected rows of a tensor along its token axis with plain aten ops (so
Inductor can fuse them)."""

from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten


def add_placeholder(gm: fx.GraphModule, name: str, val: torch.Tensor) -> fx.Node:
    """A new graph input after the existing ones, carrying a fake value for shape propagation."""
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        node = gm.graph.placeholder(name)
    node.meta["val"] = val
    return node


def add_outputs(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (tuple(out.args[0]) + tuple(nodes),)


def call(graph: fx.Graph, target, *args) -> fx.Node:
    return graph.call_function(target, args)


def gather_rows(graph: fx.Graph, t: fx.Node, idx: fx.Node, dim: int) -> fx.Node:
    """t (B or 1, ..., N at dim, ...) -> (B, ..., k at dim, ...) at idx (B, k); dim > 0."""
    shape = list(t.meta["val"].shape)
    b, k = idx.meta["val"].shape
    if dim == 0:
        raise ValueError("gathering along dim 0 needs a batched token axis; not supported")
    if shape[0] == 1 and b > 1:
        t = call(graph, aten.expand.default, t, [b, *shape[1:]])
    shape[0] = b
    view = [b] + [1] * (len(shape) - 1)
    view[dim] = k
    out_shape = list(shape)
    out_shape[dim] = k
    index = call(graph, aten.expand.default, call(graph, aten.view.default, idx, view), out_shape)
    return call(graph, aten.gather.default, t, dim, index)
