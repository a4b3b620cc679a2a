"""astraea::token_select: which rows a block recomputes this step (ASTRAEA.md section 2).

    idx = token_select(lse, x, x_ref, skips, k, w_beta, forced)
    lse (B, N) float: the row's attention LSE from its last compute (mean over heads)
    x, x_ref (B, N, D): the block input now and at the row's last compute
    skips (B, N) int: consecutive steps the row has skipped this block
    forced (N,) bool or None: rows always selected (e.g. text rows of joint attention)
    idx (B, k) int64: per batch row (each CFG branch selects its own), ascending

    score = lse * ||x - x_ref||_2 + w_beta * exp(skips)        (w_alpha = 1)

Top-k by score with ties broken by the lower row index (a stable sort), so the choice is
the same on every device. k is static (one engine per budget); values are data-dependent.
The skip counters are updated by astraea::cache_update, where the selection is applied.
"""

from __future__ import annotations

import torch


def scores(lse, x, x_ref, skips, w_beta: float, forced=None) -> torch.Tensor:
    delta = torch.linalg.vector_norm((x.float() - x_ref.float()), dim=-1)
    s = lse.float() * delta + w_beta * torch.exp(skips.float())
    if forced is not None:
        s = s.masked_fill(forced.bool()[None, :], float("inf"))
    return s


@torch.library.custom_op("astraea::token_select", mutates_args=())
def token_select(
    lse: torch.Tensor, x: torch.Tensor, x_ref: torch.Tensor, skips: torch.Tensor, k: int, w_beta: float,
    forced: torch.Tensor | None = None,
) -> torch.Tensor:
    b, n = lse.shape
    if x.shape[:2] != (b, n) or x_ref.shape != x.shape or skips.shape != (b, n) or not 1 <= k <= n:
        raise ValueError(f"token_select: lse {tuple(lse.shape)}, x {tuple(x.shape)}, x_ref {tuple(x_ref.shape)}, "
                         f"skips {tuple(skips.shape)}, k={k} do not agree")
    order = torch.sort(scores(lse, x, x_ref, skips, w_beta, forced), dim=-1, descending=True, stable=True).indices
    return torch.sort(order[:, :k], dim=-1).values.contiguous()


@token_select.register_fake
def _(lse, x, x_ref, skips, k, w_beta, forced=None):
    return lse.new_empty((lse.shape[0], k), dtype=torch.int64)
