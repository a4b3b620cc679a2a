"""classify_rows: which nodes of each block run on all N rows and which on the k selected.

From each block's `astraea::token_mark` (token axis: dim 1) and `astraea::token_table`s
(rotary cos/sin, token axis as the adapter declares) the token axis is propagated through
the block by a whitelist of rules keyed by op (`TOKEN_RULES`); a node that touches a
token-carrying tensor and has no rule stops the pass with an error naming the op, never a
guess; sizes are only asserted. Then:
  full    token nodes that are ancestors of a self-attention's K or V (they need all rows)
  subset  every other token node of the block (they will run on the selected rows only)
  gather  each edge from a full node into a subset node (e.g. the normed input into the Q
          projection, the rotary table into the Q-side rotation, the block input into the
          residual add), except a self-attention's keys and values (they stay whole) and
          dtype-only arguments
Writes node.meta["astraea_token_dim"] and node.meta["astraea_rows"], and records the gather
edges in node.meta["astraea_gather"] (argument positions); changes no node.

Scope today: blocks whose token stream stays one tensor (Wan). Concatenating or slicing
along the token axis (joint text + video attention: CogVideoX, HunyuanVideo) stops with a
clear error until offsets are tracked.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from astraea.errors import AstraeaError

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
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


def _keep(node, dim, arg0):
    return dim


def _view(node, dim, arg0):
    src, dst = _shape(arg0), _shape(node)
    prefix = math.prod(src[:dim])
    for e in range(len(dst)):
        if math.prod(dst[:e]) == prefix and dst[e] == src[dim]:
            return e
    raise UnsupportedOp(f"{node.name}: {node.target} merges or splits the token axis ({src} -> {dst})")


def _permute(node, dim, arg0):
    return list(node.args[1]).index(dim)


def _transpose(node, dim, arg0):
    a, b = (d % _rank(arg0) for d in node.args[1:3])
    return b if dim == a else a if dim == b else dim


def _unsqueeze(node, dim, arg0):
    d = node.args[1] % _rank(node)
    return dim + 1 if d <= dim else dim


def _away_from_token(node, dim, arg0):
    """Ops along a non-token dim (slice, unbind, split, select, cat); the token dim shifts for
    the rank change of select/unbind."""
    d = (node.args[1] if len(node.args) > 1 else 0) % _rank(arg0)
    if d == dim:
        raise UnsupportedOp(f"{node.name}: {node.target} along the token axis (offset tracking not implemented)")
    dropped = node.target in (aten.select.int, aten.unbind.int)
    return dim - 1 if dropped and d < dim else dim


def _pointwise(node, dim, arg0):
    return dim + (_rank(node) - _rank(arg0))


TOKEN_RULES = {
    aten.layer_norm.default: _keep, aten.rms_norm.default: _keep, aten.linear.default: _keep,
    aten.type_as.default: _keep, aten.clone.default: _keep, aten._to_copy.default: _keep,
    aten.empty_like.default: _keep, aten.copy.default: _keep, aten.slice_scatter.default: _keep,
    aten.gelu.default: _keep, aten.silu.default: _keep,
    aten.view.default: _view, aten.reshape.default: _view, aten._unsafe_view.default: _view,
    aten.permute.default: _permute, aten.transpose.int: _transpose, aten.unsqueeze.default: _unsqueeze,
    aten.slice.Tensor: _away_from_token, aten.unbind.int: _away_from_token, aten.select.int: _away_from_token,
    aten.split.Tensor: _away_from_token, aten.split_with_sizes.default: _away_from_token, aten.cat.default: None,
    SDPA: _keep, operator.getitem: _keep,
}


def _tensor_args(node):
    return [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]


def classify_rows(gm: fx.GraphModule, ctx) -> dict[str, int]:
    counts = {"full": 0, "subset": 0, "gathers": 0, "tables": 0}
    n_tokens = ctx.layout.video_tokens
    for mark in [n for n in gm.graph.nodes if n.target is MARK]:
        block = next(iter(mark.users)).meta.get("astraea_block")
        token: dict[fx.Node, int] = {mark: 1}
        for table in gm.graph.nodes:
            if table.target is TABLE and any(u.meta.get("astraea_block") == block for u in table.users):
                token[table] = table.args[1] % _rank(table)
        order = [n for n in gm.graph.nodes if n.meta.get("astraea_block") == block]
        for node in order:
            sources = [a for a in node.all_input_nodes if a in token]
            if not sources or node.target in IGNORED:
                continue
            src = sources[0]
            if node.target is operator.getitem:  # an element of a list output (unbind/split)
                token[node] = token[src]
                continue
            if node.target in TOKEN_RULES and TOKEN_RULES[node.target] is not None:
                token[node] = TOKEN_RULES[node.target](node, token[src], src)
            elif isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags:
                token[node] = _pointwise(node, token[src], src)
            else:
                raise UnsupportedOp(f"{block}: no token-axis rule for {node.target} at {node.name}")
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.shape[token[node]] != n_tokens:
                raise UnsupportedOp(f"{node.name}: token axis {token[node]} of {tuple(val.shape)} is not {n_tokens} rows")
        # full: ancestors (inside the block, token-carrying) of self-attention K and V
        full: set[fx.Node] = set()
        stack = [a for n in order if n.target is SDPA and n.meta.get("astraea_attention") == "self" for a in n.args[1:3]]
        while stack:
            n = stack.pop()
            if n in token and n not in full and n is not mark:
                full.add(n)
                stack.extend(n.all_input_nodes)
        full.add(mark)  # the block input itself: the K/V side reads all of it
        for node, dim in token.items():
            node.meta["astraea_token_dim"] = dim
            node.meta["astraea_rows"] = "full" if node in full else "subset"
            counts["full" if node in full else "subset"] += 1
        counts["tables"] += sum(1 for n in token if n.target is TABLE)
        for node in order:
            if node.meta.get("astraea_rows") != "subset":
                continue
            skip = METADATA_ONLY.get(node.target, set())
            if node.target is SDPA and node.meta.get("astraea_attention") == "self":
                skip = {1, 2}  # keys and values stay on all rows: the query-only attention takes them whole
            gathers = [i for i, a in enumerate(node.args) if isinstance(a, fx.Node) and a in full and i not in skip]
            if gathers:
                node.meta["astraea_gather"] = gathers
                counts["gathers"] += len(gathers)
    return counts
