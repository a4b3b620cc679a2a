"""astraea::factored_attention: attention within groups of the token axis, with the row LSE.

    out, lse = factored_attention(q, k, v, frames, temporal)
    q, k, v (B, H, N, D) in token order, N = frames x S (frame-major, as a video's tokens are)
    temporal False: each token attends to the S tokens of its own frame (spatial attention)
    temporal True:  each token attends to the `frames` tokens at its own position
    out (B, H, N, D) in q's dtype, lse (B, H, N) float32

Open-Sora's STDiT3 factors its attention this way. As one op on token-ordered tensors the
token axis never splits into (frame, position) in a captured graph, so the rewrite's passes
follow it as they follow any other op (the groups are a function of the token index: a
token-to-group map). Its definition, and what compilers get (`decompose`), is the grouping
by view/permute around `astraea::sparse_attention` (every query of a group against its
keys), so it runs on that op's kernels everywhere. Inference only (no autograd formula):
training runs the same grouping around SDPA (`grouped`, `ungrouped`).
"""

from __future__ import annotations

import torch


def grouped(t: torch.Tensor, frames: int, temporal: bool) -> torch.Tensor:
    b, h, n, d = t.shape
    t = t.view(b, h, frames, n // frames, d)
    if temporal:  # (B, S, H, T, D): the frames of one position together
        return t.permute(0, 3, 1, 2, 4).reshape(b * (n // frames), h, frames, d)
    return t.transpose(1, 2).reshape(b * frames, h, n // frames, d)  # (B T, H, S, D)


def ungrouped(t: torch.Tensor, b: int, frames: int, temporal: bool) -> torch.Tensor:
    g, h, length, *rest = t.shape
    if temporal:  # (B S, H, T, ...) -> (B, H, T S, ...)
        s = g // b
        t = t.view(b, s, h, frames, *rest).permute(0, 2, 3, 1, *range(4, 4 + len(rest)))
        return t.reshape(b, h, frames * s, *rest)
    return t.view(b, frames, h, length, *rest).transpose(1, 2).reshape(b, h, frames * length, *rest)


def _math(q, k, v, frames: int, temporal: bool):
    b, _, n, _ = q.shape
    if n % frames:
        raise ValueError(f"factored_attention: {n} tokens are not {frames} frames of equal size")
    out, lse = torch.ops.astraea.sparse_attention(*(grouped(t, frames, temporal) for t in (q, k, v)), None, None)
    return ungrouped(out, b, frames, temporal), ungrouped(lse, b, frames, temporal)


@torch.library.custom_op("astraea::factored_attention", mutates_args=())
def factored_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frames: int,
                       temporal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _math(q, k, v, frames, temporal)
    return out.contiguous(), lse.contiguous()


def outputs_like(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (out, lse) an attention op over the rows of q returns, for its fake (meta) form:
    out contiguous in q's shape and dtype, the row LSE (B, H, M) in float32."""
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=torch.float32)


@factored_attention.register_fake
def _(q, k, v, frames, temporal):
    return outputs_like(q)

