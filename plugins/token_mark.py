"""astraea::token_mark: marks a block's token stream in a captured graph.

    y = token_mark(x, block)      # y == x; x (B, N, D) is the block's video-token input

The adapter names the token stream (a block's `hidden_states` argument); capture wraps it
in this op, so the passes find each block's token source by op, never by matching sizes
(PASS-NOTES: N collided with hidden and head sizes). It returns a copy (a custom op may not
alias its input), and the rewrite replaces it by the block's token selection.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("astraea::token_mark", mutates_args=())
def token_mark(x: torch.Tensor, block: int) -> torch.Tensor:
    return x.clone()


@token_mark.register_fake
def _(x, block):
    return torch.empty_like(x)


@torch.library.custom_op("astraea::token_table", mutates_args=())
def token_table(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Marks a table indexed by token along `dim` that a block takes from outside (rotary
    cos/sin): the rewrite gathers its rows wherever a selected-rows node reads it."""
    return t.clone()


@token_table.register_fake
def _(t, dim):
    return torch.empty_like(t)
