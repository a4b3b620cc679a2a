"""ToCa (Zou et al., "Accelerating Diffusion Transformers with Token-wise Feature Caching",
ICLR 2025) as a peer: our implementation of its OpenSora v1.2 method and published setting,
on the diffusers blocks of the families whose blocks have its three modules.

Each block's self-attention, cross-attention and MLP output is cached. A module is computed
whole on its "force" steps: the first `first` steps, then every `interval` steps
(self-attention, MLP) or every `cross` steps (cross-attention). On the other steps:
  self-attention  the cached output is reused whole (its gate is applied fresh by the block);
  cross-attention the fresh-token ratio is ratio x (1 - 0.67 x 1.5), under zero at the
                  published setting: reused whole;
  MLP             ratio x (1 + 0.33 x 1.5) of the tokens (15% at ratio 0.1) are computed
                  and written into the cache, the rest reused.
The fresh tokens are the top scores: the entropy of each token's cross-attention map over
the text (from its last force step, the head mean; with CFG the two branches' maps averaged
and one choice shared, as ToCa does), L2-normalised over the tokens, plus 0.25 x the steps
since the token was last computed in that module / 3. ToCa's OpenSora release
(`scripts/inference.py`, `cache_functions/`): fresh_ratio 0.1, force cycles 3 / 6 / 3, the
first three steps full, the 'ToCa' ratio scheduler, soft_fresh_weight 0.25.

    peer = ToCa(model.transformer, "wan", ("blocks",), steps=50, cfg=True)   # ratio=0.1 interval=3 cross=6 first=3
    latents = sampling.denoise(model, video, sampling, inputs, peer)
    peer.close()

Roles by family: a block's submodule -> ToCa's module. Open-Sora's STDiT3 (ToCa's own target:
spatial and temporal blocks, each with its own caches) and Wan's blocks (the bundled model
too) have all three; CogVideoX and HunyuanVideo attend over text and video jointly (no
cross-attention map to score by), so ToCa is refused for them in one line.
"""

from __future__ import annotations

import torch
from torch import nn

ROLES = {"wan": {"attn1": "attn", "attn2": "cross-attn", "ffn": "mlp"},
         "opensora": {"attn": "attn", "cross_attn": "cross-attn", "mlp": "mlp"}}  # STDiT3: ToCa's own target
MODULE_WEIGHT, MODULE_TIME_WEIGHT, SOFT_WEIGHT, BASE_THRESHOLD = 1.5, 0.33, 0.25, 3  # the published constants


def fresh_ratio(ratio: float, role: str) -> float:
    """ToCa's 'ToCa' ratio scheduler for OpenSora: the module factor (its step, layer and
    spatial/temporal weights are 0 in that setting)."""
    if role == "cross-attn":
        factor = 1 - (1 - MODULE_TIME_WEIGHT) * MODULE_WEIGHT
    else:
        factor = 1 + MODULE_TIME_WEIGHT * MODULE_WEIGHT
    return min(max(ratio * factor, 0.0), 1.0)


def cross_attention_map(attn: nn.Module, x: torch.Tensor, context: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N, L) float32: each query token's attention over the text, the mean over heads, of
    a diffusers Wan attention module (its q/k projections and norms) or STDiT3's cross-attention
    (q_linear, the key half of kv_linear; the caption mask), one head at a time."""
    heads = attn.heads
    if hasattr(attn, "to_q"):
        q, k = attn.norm_q(attn.to_q(x)), attn.norm_k(attn.to_k(context))
    else:
        q, k = attn.q_linear(x), attn.kv_linear(context).unflatten(-1, (2, -1))[..., 0, :]
    q = q.unflatten(-1, (heads, -1)).float()
    k = k.unflatten(-1, (heads, -1)).float()
    scale = q.shape[-1] ** -0.5
    padding = None if mask is None else ~mask.bool()[:, None, :]
    out = torch.zeros(q.shape[0], q.shape[1], k.shape[1], device=x.device)
    for h in range(heads):
        s = q[:, :, h] @ k[:, :, h].transpose(1, 2) * scale
        if padding is not None:
            s = s.masked_fill(padding, float("-inf"))
        out += torch.softmax(s, dim=-1)
    return out / heads


class _State:
    def __init__(self, steps: int, ratio: float, interval: int, cross: int, first: int, cfg: bool):
        self.steps, self.ratio, self.first, self.cfg = steps, ratio, first, cfg
        self.cycle = {"attn": interval, "mlp": interval, "cross-attn": cross}
        self.calls = 0
        self.cache: dict[tuple[int, str], torch.Tensor] = {}
        self.stale: dict[tuple[int, str], torch.Tensor] = {}
        self.entropy: dict[int, torch.Tensor] = {}  # layer -> (B, N) normalised entropy score
        self.computed_rows = 0  # rows through a module, for the record (tests, bench)

    @property
    def step(self) -> int:
        return (self.calls - 1) % self.steps

    def force(self, role: str) -> bool:
        return self.step < self.first or self.step % self.cycle[role] == 0

    def set_entropy(self, layer: int, cmap: torch.Tensor) -> None:
        if self.cfg and cmap.shape[0] % 2 == 0:  # [uncond, cond]: one map for both, ToCa's 0.5 / 0.5
            half = cmap.shape[0] // 2
            cmap = (0.5 * cmap[:half] + 0.5 * cmap[half:]).repeat(2, 1, 1)
        entropy = -(cmap * torch.log(cmap + 1e-7)).sum(dim=-1)
        self.entropy[layer] = nn.functional.normalize(1 + entropy, dim=1, p=2)

    def fresh_rows(self, layer: int, role: str, k: int) -> torch.Tensor:
        stale = self.stale[(layer, role)]
        score = SOFT_WEIGHT * stale.float() / BASE_THRESHOLD
        if layer in self.entropy:
            score = score + self.entropy[layer]
        return score.argsort(dim=-1, descending=True)[:, :k]


class _Cached(nn.Module):
    """A block's submodule under ToCa: computed whole on its force steps, else its cached
    output with (MLP, cross-attention) the fresh rows recomputed. Row-local in its first
    argument (the tokens) for the roles computed token-wise."""

    def __init__(self, inner: nn.Module, role: str, layer: int, state: _State):
        super().__init__()
        self.inner, self.role, self.layer, self.state = inner, role, layer, state

    def forward(self, x: torch.Tensor, *args, **kwargs):
        st, key = self.state, (self.layer, self.role)
        cache = st.cache.get(key)
        if st.force(self.role) or cache is None or cache.shape != (*x.shape[:2], cache.shape[-1]):
            out = self.inner(x, *args, **kwargs)
            st.cache[key] = out
            st.stale[key] = torch.zeros(x.shape[:2], dtype=torch.int32, device=x.device)
            st.computed_rows += x.shape[0] * x.shape[1]
            if self.role == "cross-attn":  # Wan: attn2(x, context, ...); STDiT3: cross_attn(x, y, mask)
                context = args[0] if args else kwargs["encoder_hidden_states"]
                mask = args[1] if len(args) > 1 and not hasattr(self.inner, "to_q") else None
                st.set_entropy(self.layer, cross_attention_map(self.inner, x, context, mask))
            return out
        st.stale[key] += 1
        k = int(fresh_ratio(st.ratio, self.role) * x.shape[1]) if self.role != "attn" else 0
        if k == 0:
            return cache
        rows = st.fresh_rows(self.layer, self.role, k)
        if st.cfg and x.shape[0] % 2 == 0:  # one choice for both CFG branches
            rows = rows[: x.shape[0] // 2].repeat(2, 1)
        fresh = self.inner(torch.gather(x, 1, rows[..., None].expand(-1, -1, x.shape[-1])), *args, **kwargs)
        cache = cache.scatter(1, rows[..., None].expand(-1, -1, cache.shape[-1]), fresh.to(cache.dtype))
        st.cache[key] = cache
        st.stale[key] = st.stale[key].scatter(1, rows, 0)
        st.computed_rows += rows.numel()
        return cache


class ToCa:
    """The diffusers transformer with ToCa's token-wise caching on its blocks; called like it,
    one call a denoising step (the CFG batch in one call: `cfg`)."""

    def __init__(self, transformer: nn.Module, family: str, blocks: tuple[str, ...], steps: int, cfg: bool = False,
                 ratio: float = 0.1, interval: int = 3, cross: int = 6, first: int = 3):
        if family not in ROLES:
            raise ValueError(f"toca is defined for the {', '.join(ROLES)} families' blocks (self-attention, "
                             f"cross-attention, MLP), not {family!r}: its blocks attend over text and video jointly")
        if not (0.0 <= ratio <= 1.0 and interval >= 1 and cross >= 1 and first >= 1 and steps >= 1):
            raise ValueError("toca takes 0 <= ratio <= 1, interval >= 1, cross >= 1, first >= 1")
        self.transformer = transformer
        self.state = _State(steps, ratio, interval, cross, first, cfg)
        self._swapped: list[tuple[nn.Module, str, nn.Module]] = []
        layer = 0
        for container in blocks:
            for block in getattr(transformer, container):
                for name, role in ROLES[family].items():
                    inner = getattr(block, name)
                    setattr(block, name, _Cached(inner, role, layer, self.state))
                    self._swapped.append((block, name, inner))
                layer += 1

    def __call__(self, **kwargs):
        self.state.calls += 1
        return self.transformer(**kwargs)

    def close(self) -> None:
        for block, name, inner in self._swapped:
            setattr(block, name, inner)
        self._swapped.clear()
        self.state.cache.clear()
