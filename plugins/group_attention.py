"""astraea::group_attention: query-only factored attention, the selected queries against their group's keys.

    out, lse = group_attention(q, k, v, index, frames, temporal)
    q (B, H, M, D): the M selected query rows, their token indices `index` (B, M) ascending
    k, v (B, H, N, D): every row, N = frames x S in token order (frame-major)
    temporal False: a query attends to the S keys of its own frame; True: to the `frames`
    keys at its own position (what astraea::factored_attention computes for every row)
    out (B, H, M, D) in q's dtype, lse (B, H, M) float32

This is factored attention's query-only form, as astraea::sparse_attention is full
attention's: the rewrite of STDiT3's blocks computes Q only for the selected rows and gives
them here, with the selection's indices (the token-to-group map is a function of them).
Implementations, chosen per call by `backend()`:
- `varlen`: spatial groups on CUDA (bf16/fp16), below a budget of `VARLEN_BELOW` of the
  rows: one variable-length flash-attention call (`aten._flash_attention_forward` with
  cumulative lengths), a frame a sequence: each frame's selected queries against its S keys,
  never an unselected query. The boundaries come from a searchsorted of the sorted
  indices, so every shape is static. A compiler gets it as one opaque op,
  `astraea::varlen_group_attention` (Inductor in torch 2.11 fails to lower the flash call's
  outputs viewed back to (B, H, M, D): "NotImplementedError: View", found on the H100).
- `scatter`: the selected queries scattered into an N-row query (zeros elsewhere),
  factored attention on every row (its body, so that an export traces through both in one
  pass), the selected rows gathered back: exact, and
  the cheaper form for the temporal groups (`frames` keys a row) and for large budgets,
  where the dense kernel on every row beats the variable-length one on fewer.
- `reference`: float32 math, each query against its own group's keys gathered (the
  definition the others are tested against).
ASTRAEA_GROUP_ATTENTION=auto|varlen|scatter|reference forces one where it applies (read
when a graph is traced or compiled).
"""

from __future__ import annotations

import math
import os

import torch

from . import factored_attention  # the scatter form's body (and astraea::factored_attention registered)
from .factored_attention import outputs_like

VARLEN_BELOW = 0.95  # under this fraction of the rows the variable-length kernel beats scatter (H100: up to 90%)


def group_keys(index: torch.Tensor, n: int, frames: int, temporal: bool) -> torch.Tensor:
    """(B, M, G) token indices of each selected query's keys: its frame's S, or its position's frames."""
    s = n // frames
    if temporal:
        return (index % s)[..., None] + torch.arange(frames, device=index.device) * s
    return (index // s * s)[..., None] + torch.arange(s, device=index.device)


def reference(q, k, v, index, frames: int, temporal: bool, scale=None):
    """Float32 math, the definition the implementations are tested against."""
    b, h, m, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    keys = group_keys(index, k.shape[2], frames, temporal)  # (B, M, G)
    g = keys.shape[-1]
    at = keys.reshape(b, 1, m * g, 1).expand(b, h, m * g, d)
    kg = k.float().gather(2, at).view(b, h, m, g, d)
    vg = v.float().gather(2, at).view(b, h, m, g, d)
    s = torch.einsum("bhmd,bhmgd->bhmg", q.float(), kg) * scale
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bhmg,bhmgd->bhmd", torch.exp(s - lse[..., None]), vg)
    return out.to(q.dtype), lse


def backend(q: torch.Tensor, n: int, temporal: bool) -> str:
    """Which implementation runs: varlen, scatter or reference."""
    want = os.environ.get("ASTRAEA_GROUP_ATTENTION", "auto")
    if want not in ("auto", "varlen", "scatter", "reference"):
        raise ValueError(f"ASTRAEA_GROUP_ATTENTION={want!r}: use auto, varlen, scatter or reference")
    varlen = (q.device.type == "cuda" and not temporal and q.dtype in (torch.bfloat16, torch.float16)
              and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256)
    if want == "varlen" and varlen:
        return "varlen"
    if want == "auto" and varlen and q.shape[2] < VARLEN_BELOW * n:
        return "varlen"
    return "reference" if want == "reference" else "scatter"


def _scatter(q, k, v, index, frames: int, temporal: bool):
    b, h, m, d = q.shape
    n = k.shape[2]
    at = index[:, None, :, None].expand(b, h, m, d)
    full = q.new_zeros((b, h, n, d)).scatter(2, at, q)
    out, lse = factored_attention._math(full, k, v, frames, temporal)  # the op's body: traced through in one pass
    return out.gather(2, at), lse.gather(2, index[:, None, :].expand(b, h, m))


def _varlen(q, k, v, index, frames: int):
    b, h, m, d = q.shape
    n = k.shape[2]
    s = n // frames
    packed = [t.transpose(1, 2).reshape(-1, h, d) for t in (q, k, v)]  # (B M | B N, H, D)
    ids = (index + torch.arange(b, device=index.device)[:, None] * n).reshape(-1)  # ascending: batch-major
    bounds = torch.arange(b * frames + 1, device=index.device) * s  # a frame a sequence
    cu_q = torch.searchsorted(ids, bounds).to(torch.int32)
    res = torch.ops.aten._flash_attention_forward(*packed, cu_q, bounds.to(torch.int32), s, s, 0.0, False, False,
                                                  scale=1.0 / math.sqrt(d))
    out = res[0].view(b, m, h, d).transpose(1, 2)
    lse = res[1].view(h, b, m).transpose(0, 1)  # varlen flash returns (H, total queries)
    return out, lse


def _math(q, k, v, index, frames: int, temporal: bool):
    n = k.shape[2]
    if n % frames:
        raise ValueError(f"group_attention: {n} tokens are not {frames} frames of equal size")
    if index.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"group_attention: index {tuple(index.shape)} does not match q {tuple(q.shape)}")
    impl = backend(q, n, temporal)
    if impl == "varlen":
        return torch.ops.astraea.varlen_group_attention(q, k, v, index, frames)
    if impl == "scatter":
        return _scatter(q, k, v, index, frames, temporal)
    return reference(q, k, v, index, frames, temporal)


@torch.library.custom_op("astraea::varlen_group_attention", mutates_args=())
def varlen_group_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                           frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `varlen` implementation as one op: what group_attention's decomposition keeps opaque."""
    out, lse = _varlen(q, k, v, index, frames)
    return out.contiguous(), lse.contiguous()


@varlen_group_attention.register_fake
def _(q, k, v, index, frames):
    return outputs_like(q)


@torch.library.custom_op("astraea::group_attention", mutates_args=())
def group_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, frames: int,
                    temporal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _math(q, k, v, index, frames, temporal)
    return out.contiguous(), lse.contiguous()


@group_attention.register_fake
def _(q, k, v, index, frames, temporal):
    return outputs_like(q)

