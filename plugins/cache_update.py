"""astraea::cache_update: the block's fresh rows into its per-block state, in place.

    cache_update(cache, lse_cache, skips, idx, rows, lse_rows, ref_cache, ref_rows)
    cache (B, N, D)       <- rows (B, k, D) at idx (B, k)          the block's output cache
    lse_cache (B, N)      <- lse_rows (B, k)                        the next step's score input
    skips (B, N)          += 1, then 0 at idx                       staleness counters
    ref_cache (B, N, D)?  <- ref_rows (B, k, D) at idx              block input at last compute

Every write is an in-place scatter of k rows: no N x D copy is made. Declared as mutating
its state arguments, so torch.export functionalises it and AOTInductor writes in place
into the buffers the runtime donates.
"""

from __future__ import annotations

import torch


def _scatter_rows(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
    index = idx.view(*idx.shape, *([1] * (dst.dim() - 2))).expand(*idx.shape, *dst.shape[2:])
    dst.scatter_(1, index, src.to(dst.dtype))


@torch.library.custom_op("astraea::cache_update", mutates_args=("cache", "lse_cache", "skips", "ref_cache"))
def cache_update(
    cache: torch.Tensor, lse_cache: torch.Tensor, skips: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor,
    lse_rows: torch.Tensor, ref_cache: torch.Tensor | None, ref_rows: torch.Tensor | None,
) -> None:
    # ref_cache and ref_rows have no defaults on purpose: torch 2.11 drops trailing defaulted
    # arguments when boxing and then misses the mutated optional one (IndexError).
    if rows.shape[:2] != idx.shape or lse_rows.shape != idx.shape or (ref_cache is None) != (ref_rows is None):
        raise ValueError(f"cache_update: idx {tuple(idx.shape)}, rows {tuple(rows.shape)}, lse_rows {tuple(lse_rows.shape)} "
                         "do not agree (and ref_cache needs ref_rows)")
    _scatter_rows(cache, idx, rows)
    _scatter_rows(lse_cache, idx, lse_rows)
    skips.add_(1)
    skips.scatter_(1, idx, 0)
    if ref_cache is not None:
        _scatter_rows(ref_cache, idx, ref_rows)


@cache_update.register_fake
def _(cache, lse_cache, skips, idx, rows, lse_rows, ref_cache, ref_rows):
    return None
