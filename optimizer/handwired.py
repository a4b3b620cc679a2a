"""The method written out by hand for one block: a token-wise diffusers Wan block.

`wan_block_tokenwise` runs a `WanTransformerBlock` on the k rows that `astraea::token_select`
picks, with K and V over all N rows of the block's (full) input, query-only attention
(`astraea::sparse_attention`) and the fresh rows written into the block's state
(`astraea::cache_update`). It is the kernel benchmark's subject (tools/bench_block.py) and
an oracle-tested reference for the generic graph rewrite: for the same full input, its
selected rows equal the dense block's rows and the others are the cache (ASTRAEA.md 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import astraea.plugins  # noqa: F401  (registers the ops)

ops = torch.ops.astraea


@dataclass
class BlockState:
    """Per-block state the runtime owns across steps (mutated in place by cache_update)."""

    cache: torch.Tensor  # (B, N, D) the block's output at each row's last compute
    lse: torch.Tensor  # (B, N) float32, self-attention LSE (mean over heads) at that compute
    ref: torch.Tensor  # (B, N, D) the block's input at that compute
    skips: torch.Tensor  # (B, N) int32, steps since that compute

    @staticmethod
    def empty(x: torch.Tensor) -> BlockState:
        b, n, _ = x.shape
        return BlockState(torch.zeros_like(x), torch.zeros(b, n, device=x.device), torch.zeros_like(x),
                          torch.zeros(b, n, dtype=torch.int32, device=x.device))


def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (B or 1, N, ...) -> (B, k, ...) at idx (B, k)."""
    t = t.expand(idx.shape[0], *t.shape[1:])
    return torch.gather(t, 1, idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:]))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on (B, rows, H, Dh), written functionally (no in-place writes)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).type_as(x)


@torch.no_grad()
def wan_block_tokenwise(block, x: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                        rotary_emb: tuple[torch.Tensor, torch.Tensor], state: BlockState, k: int,
                        w_beta: float = 0.5) -> torch.Tensor:
    """One step of `block` at budget k (1 <= k <= N). Returns the block's full output (the
    updated cache, B x N x D); the state is updated in place."""
    attn = block.attn1
    heads = attn.heads
    shift, scale, gate, c_shift, c_scale, c_gate = (block.scale_shift_table + temb.float()).chunk(6, dim=1)
    idx = ops.token_select(state.lse, x, state.ref, state.skips, k, w_beta, None)
    # K and V: all N rows of the current input.
    normed = (block.norm1(x.float()) * (1 + scale) + shift).type_as(x)
    cos, sin = rotary_emb
    key = _rope(attn.norm_k(attn.to_k(normed)).unflatten(2, (heads, -1)), cos, sin)
    value = attn.to_v(normed).unflatten(2, (heads, -1))
    # Everything else: the k selected rows.
    x_sel = _rows(x, idx)
    query = _rope(attn.norm_q(attn.to_q(_rows(normed, idx))).unflatten(2, (heads, -1)), _rows(cos, idx), _rows(sin, idx))
    out, lse = ops.sparse_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), None, None)
    out = attn.to_out[0](out.transpose(1, 2).flatten(2).type_as(query))
    h = (x_sel.float() + out * gate).type_as(x)
    h = h + block.attn2(block.norm2(h.float()).type_as(h), encoder_hidden_states, None, None)
    n3 = (block.norm3(h.float()) * (1 + c_scale) + c_shift).type_as(h)
    h = (h.float() + block.ffn(n3).float() * c_gate).type_as(h)
    ops.cache_update(state.cache, state.lse, state.skips, idx, h, lse.mean(dim=1), state.ref, x_sel)
    return state.cache
