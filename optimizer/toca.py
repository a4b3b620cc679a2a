"""ToCa (Zou et al., "Accelerating Diffusion Transformers with Token-wise Feature Caching",
ICLR 2025) as a peer: our implementation of its OpenSora v1.2 method and published setting,
on the blocks of every family we support.

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

Roles by family (`ROLES`: a block's submodule -> ToCa's module). Open-Sora's STDiT3 (ToCa's
own target: spatial and temporal blocks, each with its own caches) and Wan's blocks (the
bundled model too) have all three. CogVideoX and HunyuanVideo attend over text and video
jointly; there (our choices, as ToCa's MMDiT ports do) the joint attention is the cached
self-attention, and its cross-attention map is the joint attention's video queries over the
text keys alone (renormalised; HunyuanVideo's padding keys masked), computed on its force
steps. Their MLPs see text rows too (CogVideoX's feed-forward runs on [text; video], a
HunyuanVideo single-stream block on [video; text]): the text rows are always computed (a
few hundred against thousands of video rows), the video rows chosen as above. A
HunyuanVideo single-stream block's output projection reads [attention; MLP] a row, so it is
token-wise too: a row the MLP did not recompute has the same input as when it was last
projected (attention and MLP share their force cycle), so it recomputes the MLP's rows.
The `cross` knob has no module in joint blocks.
"""

from __future__ import annotations

import torch
from torch import nn

# family -> block container -> {submodule: (ToCa's module, where its input's text rows are)}
_STDIT3 = {"attn": ("attn", None), "cross_attn": ("cross-attn", None), "mlp": ("mlp", None)}
ROLES = {
    "wan": {"blocks": {"attn1": ("attn", None), "attn2": ("cross-attn", None), "ffn": ("mlp", None)}},
    "opensora": {"spatial_blocks": _STDIT3, "temporal_blocks": _STDIT3},  # ToCa's own target
    "cogvideox": {"transformer_blocks": {"attn1": ("joint-attn", None), "ff": ("mlp", "first")}},
    "hunyuan_video": {"transformer_blocks": {"attn": ("joint-attn", None), "ff": ("mlp", None)},
                      "single_transformer_blocks": {"attn": ("joint-attn", None), "proj_mlp": ("mlp", "last"),
                                                    "proj_out": ("mlp-out", "last")}},
}
MODULE_WEIGHT, MODULE_TIME_WEIGHT, SOFT_WEIGHT, BASE_THRESHOLD = 1.5, 0.33, 0.25, 3  # the published constants
CYCLE = {"attn": "interval", "joint-attn": "interval", "mlp": "interval", "mlp-out": "interval", "cross-attn": "cross"}


def fresh_ratio(ratio: float, role: str) -> float:
    """ToCa's 'ToCa' ratio scheduler for OpenSora: the module factor (its step, layer and
    spatial/temporal weights are 0 in that setting)."""
    if role == "cross-attn":
        factor = 1 - (1 - MODULE_TIME_WEIGHT) * MODULE_WEIGHT
    else:
        factor = 1 + MODULE_TIME_WEIGHT * MODULE_WEIGHT
    return min(max(ratio * factor, 0.0), 1.0)


def _head_mean_softmax(q: torch.Tensor, k: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """q (B, H, N, D), k (B, H, L, D), padding (B, L) True where a key is padding ->
    (B, N, L) float32, the mean over heads of softmax(q k^T / sqrt(D)), one head at a time."""
    q, k = q.float(), k.float()
    scale = q.shape[-1] ** -0.5
    out = torch.zeros(q.shape[0], q.shape[2], k.shape[2], device=q.device)
    for h in range(q.shape[1]):
        s = q[:, h] @ k[:, h].transpose(1, 2) * scale
        if padding is not None:
            s = s.masked_fill(padding[:, None, :], float("-inf"))
        out += torch.softmax(s, dim=-1)
    return out / q.shape[1]


def cross_attention_map(attn: nn.Module, x: torch.Tensor, context: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N, L) float32: each query token's attention over the text, the mean over heads, of
    a diffusers Wan attention module (its q/k projections and norms) or STDiT3's cross-attention
    (q_linear, the key half of kv_linear; the caption mask)."""
    if hasattr(attn, "to_q"):
        q, k = attn.norm_q(attn.to_q(x)), attn.norm_k(attn.to_k(context))
    else:
        q, k = attn.q_linear(x), attn.kv_linear(context).unflatten(-1, (2, -1))[..., 0, :]
    q, k = (t.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for t in (q, k))
    return _head_mean_softmax(q, k, None if mask is None else ~mask.bool())


def joint_text_map(attn: nn.Module, video: torch.Tensor, text: torch.Tensor, rotary=None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N, L) float32: a joint attention's video queries over its text keys alone (softmax
    over the text), the mean over heads, of a diffusers CogVideoX or HunyuanVideo attention
    module: per-head q/k norms, the video queries rotated by `rotary` (cos, sin), the text keys
    from the added projections where the module has them (HunyuanVideo's dual-stream blocks);
    `mask` (B, 1, 1, N + L) HunyuanVideo's key mask, video first."""
    from diffusers.models.embeddings import apply_rotary_emb

    added = getattr(attn, "add_k_proj", None) is not None
    q = attn.to_q(video).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    k = (attn.add_k_proj if added else attn.to_k)(text).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    norm_k = attn.norm_added_k if added else attn.norm_k
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if norm_k is not None:
        k = norm_k(k)
    if rotary is not None:
        q = apply_rotary_emb(q, rotary)  # (B, H, N, D): the sequence dimension 2
    padding = None if mask is None else ~mask.reshape(mask.shape[0], -1)[:, -text.shape[1]:].bool()
    return _head_mean_softmax(q, k, padding)


class _State:
    def __init__(self, steps: int, ratio: float, interval: int, cross: int, first: int, cfg: bool):
        self.steps, self.ratio, self.first, self.cfg = steps, ratio, first, cfg
        self.cycles = {"interval": interval, "cross": cross}
        self.calls = 0
        self.cache: dict[tuple[int, str], object] = {}
        self.shape: dict[tuple[int, str], tuple] = {}  # the input rows each cache was made for
        self.stale: dict[tuple[int, str], torch.Tensor] = {}
        self.entropy: dict[int, torch.Tensor] = {}  # layer -> (B, N) normalised entropy score
        self.rows: dict[int, tuple[int, torch.Tensor]] = {}  # layer -> (call, the MLP's rows then)
        self.computed_rows = 0  # rows through a module, for the record (tests, bench)

    @property
    def step(self) -> int:
        return (self.calls - 1) % self.steps

    def force(self, role: str) -> bool:
        return self.step < self.first or self.step % self.cycles[CYCLE[role]] == 0

    def set_entropy(self, layer: int, cmap: torch.Tensor) -> None:
        if self.cfg and cmap.shape[0] % 2 == 0:  # [uncond, cond]: one map for both, ToCa's 0.5 / 0.5
            half = cmap.shape[0] // 2
            cmap = (0.5 * cmap[:half] + 0.5 * cmap[half:]).repeat(2, 1, 1)
        entropy = -(cmap * torch.log(cmap + 1e-7)).sum(dim=-1)
        self.entropy[layer] = nn.functional.normalize(1 + entropy, dim=1, p=2)

    def fresh_rows(self, layer: int, stale: torch.Tensor, k: int) -> torch.Tensor:
        """The k video rows of the top scores (stale: (B, N) steps since each was computed)."""
        score = SOFT_WEIGHT * stale.float() / BASE_THRESHOLD
        if layer in self.entropy:
            score = score + self.entropy[layer]
        return score.argsort(dim=-1, descending=True)[:, :k]


def _rows_of(video: torch.Tensor, n: int, total: int, text: str | None) -> torch.Tensor:
    """Video row indices (B, k) among the N video rows -> rows of an input of `total` rows
    holding the text where `text` says, the text rows appended (always fresh)."""
    b = video.shape[0]
    span = torch.arange(total - n, device=video.device).expand(b, -1)
    if text == "first":
        return torch.cat([video + (total - n), span], dim=1)
    return torch.cat([video, span + n], dim=1) if text == "last" else video


class _Cached(nn.Module):
    """A block's submodule under ToCa: computed whole on its force steps, else its cached
    output with (MLP, cross-attention) the fresh rows recomputed. Row-local in its first
    argument (the tokens) for the roles computed token-wise."""

    def __init__(self, inner: nn.Module, role: str, text: str | None, layer: int, state: _State):
        super().__init__()
        self.inner, self.role, self.text, self.layer, self.state = inner, role, text, layer, state

    def forward(self, *args, **kwargs):
        st, key = self.state, (self.layer, self.role)
        x = args[0] if args else kwargs["hidden_states"]
        if st.force(self.role) or key not in st.cache or st.shape[key] != tuple(x.shape[:2]):
            out = self.inner(*args, **kwargs)
            st.cache[key], st.shape[key] = out, tuple(x.shape[:2])
            st.stale[key] = torch.zeros(x.shape[:2], dtype=torch.int32, device=x.device)
            st.computed_rows += x.shape[0] * x.shape[1]
            if self.role == "cross-attn":  # Wan: attn2(x, context, ...); STDiT3: cross_attn(x, y, mask)
                context = args[1] if len(args) > 1 else kwargs["encoder_hidden_states"]
                mask = args[2] if len(args) > 2 and not hasattr(self.inner, "to_q") else None
                st.set_entropy(self.layer, cross_attention_map(self.inner, x, context, mask))
            if self.role == "joint-attn":  # CogVideoX, HunyuanVideo: keyword arguments
                st.set_entropy(self.layer, joint_text_map(self.inner, x, kwargs["encoder_hidden_states"],
                                                          kwargs.get("image_rotary_emb"), kwargs.get("attention_mask")))
            return out
        st.stale[key] += 1
        cache = st.cache[key]
        if self.role == "mlp-out":  # the rows the same block's MLP recomputed this step
            call, rows = st.rows.get(self.layer, (None, None))
            if call != st.calls:
                return cache
        else:
            total = x.shape[1]
            n = total if self.text is None else st.entropy[self.layer].shape[1]
            k = int(fresh_ratio(st.ratio, self.role) * n) if self.role in ("mlp", "cross-attn") else 0
            if k == 0 and n == total:
                return cache
            video = st.fresh_rows(self.layer, st.stale[key][:, total - n:] if self.text == "first"
                                  else st.stale[key][:, :n], k)
            if st.cfg and x.shape[0] % 2 == 0:  # one choice for both CFG branches
                video = video[: x.shape[0] // 2].repeat(2, 1)
            rows = _rows_of(video, n, total, self.text)
            st.rows[self.layer] = (st.calls, rows)
        fresh = self.inner(torch.gather(x, 1, rows[..., None].expand(-1, -1, x.shape[-1])), *args[1:], **kwargs)
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
            raise ValueError(f"toca is defined for the {', '.join(ROLES)} families' blocks, not {family!r}")
        if not (0.0 <= ratio <= 1.0 and interval >= 1 and cross >= 1 and first >= 1 and steps >= 1):
            raise ValueError("toca takes 0 <= ratio <= 1, interval >= 1, cross >= 1, first >= 1")
        self.transformer = transformer
        self.state = _State(steps, ratio, interval, cross, first, cfg)
        self._swapped: list[tuple[nn.Module, str, nn.Module]] = []
        layer = 0
        for container in blocks:
            for block in getattr(transformer, container):
                for name, (role, text) in ROLES[family][container].items():
                    inner = getattr(block, name)
                    setattr(block, name, _Cached(inner, role, text, layer, self.state))
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
