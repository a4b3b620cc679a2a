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


def gather_rows(graph: fx.Graph, t: fx.Node, idx: fx.Node, dim: int, start: int = 0, n: int | None = None) -> fx.Node:
    """t (B or 1, ..., T at dim, ...) with video rows [start, start + n) -> the same with only
    the selected video rows (other rows, e.g. text, kept): T - n + k rows at dim; dim > 0."""
    shape = list(t.meta["val"].shape)
    b, k = idx.meta["val"].shape
    total = shape[dim]
    n = total - start if n is None else n
    if dim == 0:
        raise ValueError("gathering along dim 0 needs a batched token axis; not supported")
    rows, device = idx, idx.meta["val"].device
    if start:
        rows = call(graph, aten.add.Tensor, idx, start)
    if start or start + n < total:  # keep the rows around the video rows
        pieces = []
        if start:
            head = graph.call_function(aten.arange.start, (0, start), {"device": device})
            pieces.append(call(graph, aten.expand.default, call(graph, aten.view.default, head, [1, start]), [b, start]))
        pieces.append(rows)
        if start + n < total:
            rest = total - start - n
            tail = graph.call_function(aten.arange.start, (start + n, total), {"device": device})
            pieces.append(call(graph, aten.expand.default, call(graph, aten.view.default, tail, [1, rest]), [b, rest]))
        rows = call(graph, aten.cat.default, pieces, 1)
        k = total - n + k
    if shape[0] == 1 and b > 1:
        t = call(graph, aten.expand.default, t, [b, *shape[1:]])
    shape[0] = b
    view = [b] + [1] * (len(shape) - 1)
    view[dim] = k
    out_shape = list(shape)
    out_shape[dim] = k
    index = call(graph, aten.expand.default, call(graph, aten.view.default, rows, view), out_shape)
    return call(graph, aten.gather.default, t, dim, index)
