"""Sequence parallelism for the token-wise step: the video rows in P contiguous shards, one a
rank (torch.distributed; NCCL on GPUs, gloo on CPUs), and query-only attention over all
rows by Ulysses' all-to-all (DeepSpeed-Ulysses, as diffusers' context parallelism does for
dense attention) around `astraea::sparse_attention`.

In a sequence-parallel step each rank holds its shard of every block's input, cache and
state, selects its share of the step's rows among its own (`selection.shards`:
passes/insert_selection.py), and runs every row-local op on them; self-attention is the one
op that needs every rank's rows. `ulysses_sparse_attention` exchanges heads for rows: after
one all-to-all each rank holds H/P heads of every rank's selected queries and of all N keys
and values, runs the op, and a second all-to-all returns each rank its own queries' output
and LSE over all heads. Static per-step budgets give every rank the same number of
selected rows, so the exchanges are even.

    out, lse = ulysses_sparse_attention(q, k, v)    # q (B, H, m, D) this rank's selected rows;
                                                    # k, v (B, H, n, D) this rank's shard
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import astraea.plugins  # noqa: F401  (registers the astraea ops)


def world(group=None) -> tuple[int, int]:
    """(rank, size) of `group`, (0, 1) without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _exchange(t: torch.Tensor, group) -> torch.Tensor:
    """all_to_all over dim 0 (P equal chunks): chunk j goes to rank j, chunk j of the result
    came from rank j."""
    t = t.contiguous()  # first: empty_like keeps a view's strides, and the chunks must be dim 0's
    out = torch.empty_like(t)
    dist.all_to_all_single(out, t, group=group)
    return out


def heads_to_rows(t: torch.Tensor, size: int, group) -> torch.Tensor:
    """(B, H, r, ...) this rank's rows, all heads -> (B, H / P, P r, ...) every rank's rows
    (in rank order), this rank's group of heads."""
    b, h, r, *rest = t.shape
    chunks = t.reshape(b, size, h // size, r, *rest).movedim(1, 0)  # (P, B, H/P, r, ...): group j to rank j
    got = _exchange(chunks, group)  # (P, B, H/P, r, ...): rank j's rows of my head group
    return got.movedim(0, 2).reshape(b, h // size, size * r, *rest)


def rows_to_heads(t: torch.Tensor, size: int, group) -> torch.Tensor:
    """The inverse of heads_to_rows: (B, H / P, P r, ...) -> (B, H, r, ...)."""
    b, hp, pr, *rest = t.shape
    r = pr // size
    chunks = t.reshape(b, hp, size, r, *rest).movedim(2, 0)  # (P, B, H/P, r, ...): rank j's rows to rank j
    got = _exchange(chunks, group)  # (P, B, H/P, r, ...): head group j of my rows
    return got.movedim(0, 1).reshape(b, size * hp, r, *rest)


def ulysses_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
                             scale: float | None = None, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """astraea::sparse_attention over the rows of every rank: q (B, H, m, D) this rank's
    selected query rows (m equal on every rank), k, v (B, H, n, D) and key_mask (B, n) this
    rank's shard (n equal on every rank). Returns this rank's out (B, H, m, D) and lse
    (B, H, m), as one process holding every rank's rows would compute them."""
    _, size = world(group)
    if size == 1:
        return torch.ops.astraea.sparse_attention(q, k, v, key_mask, scale)
    if q.shape[1] % size:
        raise ValueError(f"Ulysses sequence parallelism needs the heads ({q.shape[1]}) divisible by the ranks ({size})")
    qh, kh, vh = (heads_to_rows(t, size, group) for t in (q, k, v))
    mask = None
    if key_mask is not None:
        parts = [torch.empty_like(key_mask) for _ in range(size)]
        dist.all_gather(parts, key_mask.contiguous(), group=group)
        mask = torch.cat(parts, dim=1)
    out, lse = torch.ops.astraea.sparse_attention(qh, kh, vh, mask, scale)
    return rows_to_heads(out, size, group), rows_to_heads(lse, size, group)
