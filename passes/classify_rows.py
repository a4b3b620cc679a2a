"""classify_rows: which nodes of each block run on all N rows and which on the k selected.

From each block's `astraea::token_mark` (token axis: dim 1) and `astraea::token_table`s
(rotary cos/sin, token axis as the adapter declares) the token axis is propagated through
the block by a whitelist of rules keyed by op (`TOKEN_RULES`); a node that touches a
token-carrying tensor and has no rule stops the pass with an error naming the op, never a
guess; sizes are only asserted. Then:
  full    token nodes that are ancestors of a self-attention's K or V (they need all rows),
          a factored attention's too (`astraea::factored_attention`, STDiT3's attention
          within a frame or a position: its queries are the selected rows, like SDPA's)
  subset  every other token node of the block (they will run on the selected rows only)
  gather  each edge from a full node into a subset node (e.g. the normed input into the Q
          projection, the rotary table into the Q-side rotation, the block input into the
          residual add), except a self-attention's keys and values (they stay whole) and
          dtype-only arguments
Writes node.meta["astraea_token_dim"] and node.meta["astraea_rows"], and records the gather
edges in node.meta["astraea_gather"] (argument positions); changes no node.

Joint attention: the axis is (dim, start), so text rows concatenated before or after the
video rows (CogVideoX, HunyuanVideo) are tracked through cat, slice, split and
slice_scatter; text rows are never subset.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from astraea.errors import AstraeaError

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
FACTORED = torch.ops.astraea.factored_attention.default  # attention within a frame or a position (STDiT3)
MARK = torch.ops.astraea.token_mark.default
TABLE = torch.ops.astraea.token_table.default
IGNORED = {aten._assert_tensor_metadata.default}
METADATA_ONLY = {aten.type_as.default: {1}}  # argument positions read for dtype only: never gathered


class UnsupportedOp(AstraeaError):
    pass


def _rank(node) -> int:
    return len(node.meta["val"].shape)


def _shape(node) -> tuple[int, ...]:
    return tuple(node.meta["val"].shape)


# A token axis is (dim, start): rows [start, start + N) of `dim` are the video tokens, the
# rest (joint attention's text rows) are never subset. A rule maps the axis of a node's
# token-carrying input to the node's own axis (None: the output carries no tokens; a list:
# one per element of a list output).


def _keep(node, ax, src):
    return ax


def _view(node, ax, src):
    dim, start = ax
    s, d = _shape(src), _shape(node)
    prefix = math.prod(s[:dim])
    for e in range(len(d)):
        if math.prod(d[:e]) == prefix and d[e] == s[dim]:
            return (e, start)
    raise UnsupportedOp(f"{node.name}: {node.target} merges or splits the token axis ({s} -> {d})")


def _permute(node, ax, src):
    return (list(node.args[1]).index(ax[0]), ax[1])


def _transpose(node, ax, src):
    a, b = (d % _rank(src) for d in node.args[1:3])
    return (b if ax[0] == a else a if ax[0] == b else ax[0], ax[1])


def _unsqueeze(node, ax, src):
    d = node.args[1] % _rank(node)
    return (ax[0] + 1 if d <= ax[0] else ax[0], ax[1])


def _range_rule(node, ax, lo, hi, n):
    """A sub-range [lo, hi) of the token dim: exactly the tokens, or none of them."""
    dim, start = ax
    if (lo, hi) == (start, start + n):
        return (dim, 0)
    if hi <= start or lo >= start + n:
        return None
    raise UnsupportedOp(f"{node.name}: {node.target} cuts through the video rows [{start}, {start + n}) at [{lo}, {hi})")


def _slice(node, ax, src, n):
    dim = node.args[1] % _rank(src) if len(node.args) > 1 else 0
    if dim != ax[0]:
        return ax
    size = _shape(src)[dim]
    lo = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    hi = node.args[3] if len(node.args) > 3 and node.args[3] is not None else size
    lo, hi = (v + size if v < 0 else v for v in (lo, hi))
    if (node.args[4] if len(node.args) > 4 else 1) != 1:
        raise UnsupportedOp(f"{node.name}: strided slice of the token axis")
    return _range_rule(node, ax, max(0, lo), min(hi, size), n)


def _split(node, ax, src, n):
    dim = (node.args[2] if len(node.args) > 2 else 0) % _rank(src)
    size = _shape(src)[dim]
    sizes = node.args[1]
    if isinstance(sizes, int):
        sizes = [sizes] * (size // sizes) + ([size % sizes] if size % sizes else [])
    if dim != ax[0]:
        return [ax] * len(sizes)
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [_range_rule(node, ax, bounds[i], bounds[i + 1], n) for i in range(len(sizes))]


def _unbind(node, ax, src, n):
    dim = (node.args[1] if len(node.args) > 1 else 0) % _rank(src)
    if dim == ax[0]:
        raise UnsupportedOp(f"{node.name}: unbind along the token axis")
    out = (ax[0] - 1 if dim < ax[0] else ax[0], ax[1])
    return [out] * _shape(src)[dim]


def _select(node, ax, src, n):
    dim = node.args[1] % _rank(src)
    if dim == ax[0]:
        raise UnsupportedOp(f"{node.name}: select along the token axis")
    return (ax[0] - 1 if dim < ax[0] else ax[0], ax[1])


def _stack(node, ax, src, n):
    dim = (node.args[1] if len(node.args) > 1 else 0) % _rank(node)
    return (ax[0] + 1 if dim <= ax[0] else ax[0], ax[1])


def _reduce(node, ax, src, n):
    """mean/sum/amax over other dims are row-local; over the token axis they mix rows."""
    rank = _rank(src)
    dims = node.args[1] if len(node.args) > 1 and node.args[1] is not None else list(range(rank))
    dims = {d % rank for d in ([dims] if isinstance(dims, int) else dims)}
    if ax[0] in dims:
        raise UnsupportedOp(f"{node.name}: {node.target} reduces over the token axis")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return (ax[0] if keepdim else ax[0] - sum(1 for d in dims if d < ax[0]), ax[1])


def _pointwise(node, ax, src):
    return (ax[0] + (_rank(node) - _rank(src)), ax[1])


TOKEN_RULES = {
    aten.layer_norm.default: _keep, aten.rms_norm.default: _keep, aten.linear.default: _keep,
    aten.type_as.default: _keep, aten.clone.default: _keep, aten._to_copy.default: _keep,
    aten.empty_like.default: _keep, aten.copy.default: _keep,
    aten.gelu.default: _keep, aten.silu.default: _keep, SDPA: _keep,
    aten.view.default: _view, aten.reshape.default: _view, aten._unsafe_view.default: _view,
    aten.permute.default: _permute, aten.transpose.int: _transpose, aten.unsqueeze.default: _unsqueeze,
    # an FP8 Linear with a static input scale: row-local like the Linear it replaces
    torch.ops.astraea.fp8_linear.default: _keep,
    # (out, lse), both on q's token axis: the selected rows once rewritten (astraea::group_attention)
    FACTORED: lambda node, ax, src: [ax, ax],
}
# rules that need N (ranges along the token axis), or see every input (cat, slice_scatter)
RANGE_RULES = {
    aten.slice.Tensor: _slice, aten.split.Tensor: _split, aten.split_with_sizes.default: _split,
    aten.unbind.int: _unbind, aten.select.int: _select, aten.stack.default: _stack,
    aten.mean.dim: _reduce, aten.sum.dim_IntList: _reduce, aten.amax.default: _reduce,
}


def _cat(node, token, n):
    parts, dim = node.args[0], (node.args[1] if len(node.args) > 1 else 0)
    dim %= _rank(node)
    carrying = [(i, p) for i, p in enumerate(parts) if p in token]
    if dim != token[carrying[0][1]][0]:
        return (token[carrying[0][1]][0], token[carrying[0][1]][1])
    if len(carrying) != 1:
        raise UnsupportedOp(f"{node.name}: cat of several token-carrying tensors along the token axis")
    i, p = carrying[0]
    return (dim, sum(_shape(q)[dim] for q in parts[:i]) + token[p][1])


def _slice_scatter(node, token, n):
    base, src = node.args[0], node.args[1]
    if base in token:
        return token[base]
    dim = node.args[2] % _rank(node)
    if token[src][0] != dim:
        raise UnsupportedOp(f"{node.name}: slice_scatter of tokens across another dim")
    return (dim, (node.args[3] or 0) + token[src][1])


def _self_attention(node) -> bool:
    """An attention whose queries may be the selected rows and whose keys and values are every row:
    a self-attention SDPA, or a factored attention (within a frame or a position)."""
    return node.target in (SDPA, FACTORED) and node.meta.get("astraea_attention") == "self"


def classify_rows(gm: fx.GraphModule, ctx) -> dict[str, int]:
    counts = {"full": 0, "subset": 0, "gathers": 0, "tables": 0}
    n_tokens = ctx.layout.video_tokens
    for mark in [n for n in gm.graph.nodes if n.target is MARK]:
        block = next(iter(mark.users)).meta.get("astraea_block")
        token: dict[fx.Node, tuple | list] = {mark: (1, 0)}
        for table in gm.graph.nodes:
            if table.target is TABLE and any(u.meta.get("astraea_block") == block for u in table.users):
                token[table] = (table.args[1] % _rank(table), 0)
        order = [n for n in gm.graph.nodes if n.meta.get("astraea_block") == block]
        for node in order:
            sources = [a for a in node.all_input_nodes if a in token]
            if not sources or node.target in IGNORED:
                continue
            src = sources[0]
            if node.target is operator.getitem:  # an element of a list output (unbind/split)
                ax = token[src]
                ax = ax[node.args[1]] if isinstance(ax, list) else ax
            elif node.target is aten.cat.default:
                ax = _cat(node, token, n_tokens)
            elif node.target is aten.slice_scatter.default:
                ax = _slice_scatter(node, token, n_tokens)
            elif node.target in RANGE_RULES:
                ax = RANGE_RULES[node.target](node, token[src], src, n_tokens)
            elif node.target in TOKEN_RULES:
                ax = TOKEN_RULES[node.target](node, token[src], src)
            elif isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags:
                ax = _pointwise(node, token[src], src)
            else:
                raise UnsupportedOp(f"{block}: no token-axis rule for {node.target} at {node.name}")
            if ax is None:
                continue
            token[node] = ax
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.shape[ax[0]] < ax[1] + n_tokens:
                raise UnsupportedOp(f"{node.name}: token rows [{ax[1]}, {ax[1] + n_tokens}) exceed {tuple(val.shape)}")
        # full: ancestors (inside the block, token-carrying) of self-attention K and V
        full: set[fx.Node] = set()
        stack = [a for n in order if _self_attention(n) for a in n.args[1:3]]
        while stack:
            n = stack.pop()
            if n in token and n not in full and n is not mark and not isinstance(token[n], list):
                full.add(n)
                stack.extend(n.all_input_nodes)
            elif n in token and isinstance(token[n], list):
                stack.extend(n.all_input_nodes)
        full.add(mark)  # the block input itself: the K/V side reads all of it
        # a row gather needs a leading (batch) dim: consumers of an unbatched table (token
        # axis 0, e.g. CogVideoX's (N, D) rotary tables) stay full until the axis moves off 0
        changed = True
        while changed:
            changed = False
            for node in order:
                if node in token and node not in full and not isinstance(token[node], list) and any(
                    isinstance(a, fx.Node) and a in full and token[a][0] == 0 for a in node.args
                ):
                    full.add(node)
                    changed = True
        for node, ax in token.items():
            if isinstance(ax, list):  # a list output (split, unbind): rows by its consumers, axes by element
                node.meta["astraea_rows"] = "full" if any(u in full for u in node.users) else "subset"
                continue
            node.meta["astraea_token_dim"], node.meta["astraea_token_start"] = ax
            node.meta["astraea_rows"] = "full" if node in full else "subset"
            counts["full" if node in full else "subset"] += 1
        counts["tables"] += sum(1 for n in token if n.target is TABLE)
        for node in order:
            if node.meta.get("astraea_rows") != "subset":
                continue
            skip = METADATA_ONLY.get(node.target, set())
            if _self_attention(node):
                skip = {1, 2}  # keys and values stay on all rows: the query-only attention takes them whole
            gathers = [i for i, a in enumerate(node.args) if isinstance(a, fx.Node) and a in full and i not in skip]
            if gathers:
                node.meta["astraea_gather"] = gathers
                counts["gathers"] += len(gathers)
    return counts
