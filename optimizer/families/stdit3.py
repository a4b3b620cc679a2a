"""STDiT3, Open-Sora v1.2's video transformer, written here (it is not in diffusers) with the
public checkpoint's parameter names, so `load_state_dict` takes hpcai-tech/OpenSora-STDiT-v3's
model.safetensors as it is.

Per depth a spatial block (self-attention within each frame) then a temporal block
(self-attention across the frames at each position, rotary positions over time), each: adaLN
modulation from the timestep (`scale_shift_table` + t), self-attention with RMS-normed q, k,
cross-attention to the caption (no norm, no gate), an MLP. The caption is a T5 embedding
(4096 wide, 300 tokens) projected by `y_embedder`; `fps_embedder` adds the frame rate to the
timestep; 2D sin-cos positions scaled by the resolution are added once after the patch
embedding. The output has 2 x in_channels (pred_sigma): the velocity is the first half.

Differences from the public code: attention through SDPA (the rewrite finds it there; its
softmax in SDPA's precision) with the caption padding as a key mask instead of xformers'
block-diagonal packing (the same attention); the rotary angles in the activations' dtype; no
sequence parallelism, dropout, gradient checkpointing or image-conditioning masks.

    model = STDiT3(STDiT3Config(depth=28, hidden_size=1152, num_heads=16))   # STDiT3-XL/2
    (out,) = model(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, fps, height, width)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

import astraea.plugins  # noqa: F401  (astraea::factored_attention)
from astraea.plugins import factored_attention as factored


@dataclass(frozen=True)
class STDiT3Config:
    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    in_channels: int = 4
    patch_size: tuple[int, int, int] = (1, 2, 2)
    mlp_ratio: float = 4.0
    caption_channels: int = 4096
    model_max_length: int = 300
    input_sq_size: int = 512
    qk_norm: bool = True
    pred_sigma: bool = True


def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) -> (N, dim) float32: [cos, sin] of t at geometric frequencies (GLIDE's)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, out)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t, dtype):
        return self.mlp(sinusoid(t, self.freq_dim).to(dtype))


class CaptionEmbedder(nn.Module):
    def __init__(self, in_channels: int, hidden: int, tokens: int):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden, hidden)
        # the learned null caption (a buffer in the public code: the same key), a parameter so that
        # random-weight presets fill it like every weight, alike on every device
        self.y_embedding = nn.Parameter(torch.randn(tokens, in_channels) / in_channels**0.5, requires_grad=False)

    def forward(self, y):
        return self.y_proj(y)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding with interleaved pairs (rotary-embedding-torch's), angles given: x (B, H, N, D),
    cos and sin (N, D) a token, broadcast as (1, 1, N, D) (a batched token axis: a rewrite can
    gather the Q side's rows from it)."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos.to(x.dtype)[None, None] + rotated * sin.to(x.dtype)[None, None]


class Rope(nn.Module):
    """The temporal blocks' rotary frequencies, `freqs` (head_dim / 2) as the checkpoint holds
    it (a buffer here: computed, never random), and their table a token: the cos and sin
    (N, head_dim) of each token's frame index, the positions the temporal attention rotates by.
    A table indexed by token (the family's `token_tables`), so a row keeps its angles wherever
    it is gathered to."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        self.register_buffer("freqs", 1.0 / theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))

    def forward(self, frames: int, spatial: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The table (a module call: a context-parallel plan can split its output by token)."""
        frame = torch.arange(frames, device=self.freqs.device).repeat_interleave(spatial)  # token n -> n // spatial
        angles = (frame[:, None].float() * self.freqs[None]).repeat_interleave(2, dim=-1)
        return angles.cos(), angles.sin()

    table = forward


class Attention(nn.Module):
    """Self-attention within each frame (spatial) or across the frames at each position
    (temporal), on tokens in their order: astraea::factored_attention, so that the token
    axis stays whole in a captured graph."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, temporal: bool):
        super().__init__()
        self.heads, self.head_dim, self.temporal = heads, dim // heads, temporal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, frames: int, rotary: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x (B, T S, C); rotary: cos, sin (T S, D) a token (the temporal blocks')."""
        b, n, c = x.shape
        if type(self.qkv) is nn.Linear:  # Q apart from K and V (the same weights): a rewrite computes Q on fewer rows
            w, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(x, w[:c], bias[:c]).view(b, n, self.heads, self.head_dim).transpose(1, 2)
            k, v = F.linear(x, w[c:], bias[c:]).view(b, n, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:  # a quantized layer replaced it: one call
            q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q, k = rotate(q, *rotary), rotate(k, *rotary)
        if torch.is_grad_enabled() and x.requires_grad:  # training: the same grouping around SDPA, differentiable
            qg, kg, vg = (factored.grouped(z, frames, self.temporal) for z in (q, k, v))
            out = factored.ungrouped(F.scaled_dot_product_attention(qg, kg, vg), b, frames, self.temporal)
        else:
            out, _ = torch.ops.astraea.factored_attention(q, k, v, frames, self.temporal)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cond, mask=None):
        b, n, c = x.shape
        q = self.q_linear(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_linear(cond).view(b, -1, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class STDiT3Block(nn.Module):
    def __init__(self, cfg: STDiT3Config, temporal: bool):
        super().__init__()
        c = cfg.hidden_size
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(c, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(c, cfg.num_heads, cfg.qk_norm, temporal)
        self.cross_attn = CrossAttention(c, cfg.num_heads)
        self.norm2 = nn.LayerNorm(c, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(c, int(c * cfg.mlp_ratio), c)
        self.scale_shift_table = nn.Parameter(torch.randn(6, c) / c**0.5)

    def forward(self, hidden_states, y, t, mask, frames: int, spatial: int, rotary_emb=None):
        """hidden_states (B, T S, C), the name the capture marks; rotary_emb: the temporal
        blocks' (cos, sin) a token (Rope.table)."""
        x = hidden_states
        b, _, c = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t.reshape(b, 6, -1)).chunk(6, dim=1)
        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        h = self.attn(h, frames, rotary_emb if self.temporal else None)
        x = x + gate_msa * h
        x = x + self.cross_attn(x, y, mask)
        return x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(hidden, patch * out)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden) / hidden**0.5)

    def forward(self, x, t):
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


def position_embedding(dim: int, h: int, w: int, scale, base_size: int, device) -> torch.Tensor:
    """(1, h w, dim) float32: 2D sin-cos positions, rows of the grid scaled by the resolution
    (Open-Sora's PositionEmbedding2D)."""
    half = dim // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, half, 2, device=device).float() / half))
    grid_h = torch.arange(h, device=device) / scale * (base_size / h)
    grid_w = torch.arange(w, device=device) / scale * (base_size / w)
    rows, cols = grid_h[:, None].expand(h, w).reshape(-1), grid_w[None, :].expand(h, w).reshape(-1)

    def emb(p):
        out = p[:, None].float() * inv_freq[None]
        return torch.cat([out.sin(), out.cos()], dim=-1)

    return torch.cat([emb(cols), emb(rows)], dim=-1)[None]  # the column's code first ("w goes first" there)


class STDiT3(nn.Module):
    """The transformer, with the small part of diffusers' model interface the loader uses:
    `config` (a dict), `from_config`, `from_pretrained` (a folder with config.json and
    model.safetensors, e.g. hpcai-tech/OpenSora-STDiT-v3's), `dtype`."""

    @property
    def _cp_plan(self) -> dict:
        """Where diffusers' context parallelism splits the rows (before the first spatial block,
        the temporal rotary table) and gathers them (the final layer's output), in its format."""
        from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

        table = ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)
        return {"spatial_blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)},
                "rope": {0: table, 1: table},
                "final_layer": ContextParallelOutput(gather_dim=1, expected_dims=3)}

    def __init__(self, cfg: STDiT3Config = STDiT3Config()):
        super().__init__()
        self.cfg = cfg
        c, pt, ph, pw = cfg.hidden_size, *cfg.patch_size
        self.out_channels = cfg.in_channels * (2 if cfg.pred_sigma else 1)
        self.rope = Rope(c // cfg.num_heads)
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv3d(cfg.in_channels, c, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.t_embedder = TimestepEmbedder(c)
        self.fps_embedder = TimestepEmbedder(c)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, c, cfg.model_max_length)
        self.spatial_blocks = nn.ModuleList(STDiT3Block(cfg, False) for _ in range(cfg.depth))
        self.temporal_blocks = nn.ModuleList(STDiT3Block(cfg, True) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(c, pt * ph * pw, self.out_channels)

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask=None, fps=None,
                height=None, width=None, return_dict: bool = False):
        cfg = self.cfg
        b, _, frames, hh, ww = hidden_states.shape
        pt, ph, pw = cfg.patch_size
        t_, h_, w_ = frames // pt, hh // ph, ww // pw
        dtype = self.x_embedder.proj.weight.dtype
        x = self.x_embedder.proj(hidden_states.to(dtype)).flatten(2).transpose(1, 2)  # (B, T S, C)
        spatial = h_ * w_
        # the resolution's scale stays a tensor: no data-dependent Python value (torch.export)
        scale = (height[0].float() * width[0].float()).sqrt() / cfg.input_sq_size if height is not None else 1.0
        pos = position_embedding(cfg.hidden_size, h_, w_, scale, round(spatial**0.5), x.device).to(dtype)
        x = (x.view(b, t_, spatial, -1) + pos[:, None]).view(b, t_ * spatial, -1)
        t = self.t_embedder(timestep, dtype)
        if fps is not None:
            t = t + self.fps_embedder(fps.reshape(-1).expand(b) if fps.numel() == 1 else fps, dtype)
        t_mlp = self.t_block(t)
        y = self.y_embedder(encoder_hidden_states.to(dtype))
        mask = None if encoder_attention_mask is None else encoder_attention_mask.bool()
        rotary = self.rope(t_, spatial)
        for spatial_block, temporal_block in zip(self.spatial_blocks, self.temporal_blocks):
            x = spatial_block(x, y, t_mlp, mask, t_, spatial)
            x = temporal_block(x, y, t_mlp, mask, t_, spatial, rotary_emb=rotary)
        x = self.final_layer(x, t)  # (B, T S, pt ph pw out)
        x = x.view(b, t_, h_, w_, pt, ph, pw, self.out_channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = x.reshape(b, self.out_channels, t_ * pt, h_ * ph, w_ * pw).float()
        return (out,)

    # ---- the loader's interface ------------------------------------------------------------
    @property
    def config(self) -> dict:
        return {f.name: getattr(self.cfg, f.name) for f in fields(STDiT3Config)}

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    @classmethod
    def from_config(cls, config: dict) -> STDiT3:
        known = {f.name for f in fields(STDiT3Config)}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in known}
        return cls(STDiT3Config(**values))

    @classmethod
    def from_pretrained(cls, folder, subfolder: str | None = None, dtype: torch.dtype = torch.float32) -> STDiT3:
        """config.json (the public STDiT3Config's keys) and model.safetensors, in `folder` or
        its `subfolder`; raises OSError / ValueError naming what is missing or does not fit."""
        import json
        from pathlib import Path

        from safetensors.torch import load_file

        root = Path(folder)
        if subfolder and (root / subfolder).is_dir():
            root = root / subfolder
        for name in ("config.json", "model.safetensors"):
            if not (root / name).is_file():
                raise OSError(f"{root / name} is missing (an STDiT3 checkpoint: config.json and model.safetensors)")
        model = cls.from_config(json.loads((root / "config.json").read_text()))
        state = load_file(str(root / "model.safetensors"))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{root / 'model.safetensors'} does not fit STDiT3 {model.cfg}: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}")
        return model.to(dtype)
