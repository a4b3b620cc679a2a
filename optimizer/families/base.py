"""What every vDiT family adapter knows: presets, shapes, call convention, conditioning.

An adapter is stateless; the loaded model travels as a `LoadedModel`. Latents stay in the
family's own layout (Wan and HunyuanVideo B,C,F,H,W; CogVideoX B,F,C,H,W) so that what we
sample is what the family's diffusers pipeline samples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, nearest
from ..registry import Registry
from ..schema import RunConfig, VideoSpec
from .weights import build_random

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FAMILIES: Registry[type[Family]] = Registry("model family")


def get_family(name: str, path: str = "model.family") -> Family:
    if name not in FAMILIES:
        raise ConfigError(path, f"unknown family {name!r}{nearest(name, FAMILIES.names())}")
    return FAMILIES.get(name)()  # adapters are stateless


@dataclass(frozen=True)
class Geometry:
    """The latent codec's compression: pixels per latent cell in space and frames in time."""

    spatial: int = 8
    temporal: int = 4

    def latent_frames(self, frames: int) -> int:
        return (frames - 1) // self.temporal + 1


@dataclass(frozen=True)
class Preset:
    name: str
    config: dict[str, Any]  # the transformer's diffusers config (constructor kwargs)
    text_length: int  # text tokens the family's encoder produces
    video: tuple[int, int, int]  # the model's native (frames, height, width)
    note: str = ""
    geometry: Geometry = Geometry()  # the family's VAE; the bundled model has its own codec
    weights: str | None = None  # shipped weights (a file in astraea/bundled); None = random
    shift: float | None = None  # default flow shift of the preset's scheduler


@dataclass(frozen=True)
class TokenLayout:
    """Where the video tokens are. The passes take the token axis from here, never from sizes."""

    latent_shape: tuple[int, ...]  # one sample, in the family's layout
    grid: tuple[int, int, int]  # (t, h, w) token grid after patchify
    video_tokens: int  # N: the rows token selection works on
    text_tokens: int  # text rows inside the attention sequence (0 for cross-attention families)
    video_offset: int  # first video row in the attention sequence (joint attention)

    @property
    def sequence(self) -> int:
        return self.video_tokens + self.text_tokens


@dataclass
class Conditioning:
    """Prompt conditioning of a batch, as the transformer takes it."""

    embeds: torch.Tensor  # (B, L, D)
    mask: torch.Tensor | None = None  # (B, L), families with a text attention mask
    pooled: torch.Tensor | None = None  # (B, P), families with pooled projections

    def tensors(self) -> dict[str, torch.Tensor]:
        # not dataclasses.asdict: it deep-copies every tensor
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        def join(name):
            items = [getattr(p, name) for p in parts]
            return None if items[0] is None else torch.cat(items)

        return Conditioning(join("embeds"), join("mask"), join("pooled"))

    def rows(self, start: int, stop: int) -> Conditioning:
        """Batch rows start..stop-1."""
        cut = lambda t: None if t is None else t[start:stop]  # noqa: E731
        return Conditioning(cut(self.embeds), cut(self.mask), cut(self.pooled))

    def to(self, device, dtype) -> Conditioning:
        def move(t):
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

        return Conditioning(move(self.embeds), move(self.mask), move(self.pooled))


@dataclass
class LoadedModel:
    """A transformer with what sampling needs around it: its scheduler, and where the source has
    them a text encoder (prompts -> Conditioning) and a decoder (latents -> pixels in [-1, 1])."""

    family: Family
    transformer: nn.Module
    scheduler: Any
    identity: dict[str, Any]  # family, source, config hash, weights (and text encoder) fingerprints
    text_length: int
    geometry: Geometry = Geometry()
    encoder: Callable[[list[str]], Conditioning] | None = None
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None
    pipeline: Any = None  # a full checkpoint's diffusers pipeline

    def layout(self, video: VideoSpec) -> TokenLayout:
        return self.family.token_layout(dict(self.transformer.config), video, self.text_length, self.geometry)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype


def config_hash(config: dict) -> str:
    blob = json.dumps({k: v for k, v in sorted(config.items()) if not k.startswith("_")}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fingerprint_weights(folder: Path) -> str:
    """Cheap identity of a checkpoint's weights: names, sizes and the head and tail of each file.

    A full sha256 of tens of GB would dominate a run; the manifest stage hashes files fully.
    """
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.suffix not in (".safetensors", ".bin", ".pt", ".pth") or not f.is_file():
            continue
        size = f.stat().st_size
        h.update(f"{f.relative_to(folder)}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def _pseudo_vector(text: str, dim: int) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim, generator=g)


def pseudo_embedding(prompt: str, length: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic stand-in for a text encoder: one hashed vector per word plus a position term.

    Same prompt -> same tensor on any machine; different prompts differ; the rows past the
    words are zero and masked, like a padded T5 output. Returns (embeds (L, D), mask (L,)).
    """
    words = prompt.lower().split()[:length]
    embeds = torch.zeros(length, dim)
    mask = torch.zeros(length, dtype=torch.int64)
    for j, word in enumerate(words):
        embeds[j] = 0.5 * _pseudo_vector(f"w:{word}", dim) + 0.1 * _pseudo_vector(f"p:{j}", dim)
    mask[: max(1, len(words))] = 1  # an empty prompt keeps one (zero) row: pooling divides by the mask sum
    return embeds, mask


class Family:
    """Base adapter. Subclasses set the class attributes and the call convention."""

    # the family's diffusers pipeline calls the transformer once per CFG branch (batch 1)
    # rather than once with the batch of two: engines for it are built per branch
    pipeline_cfg_per_branch: ClassVar[bool] = True

    name: ClassVar[str]
    model_class: ClassVar[type]
    pipeline_class: ClassVar[str]  # diffusers pipeline used to load a full checkpoint
    presets: ClassVar[dict[str, Preset]]
    layout: ClassVar[str]  # "BCFHW" or "BFCHW"
    schedulers: ClassVar[tuple[str, ...]]  # allowed sampling.scheduler values besides "default"
    block_containers: ClassVar[tuple[str, ...]]  # module names of the transformer block lists
    self_attention: ClassVar[tuple[str, ...]]  # attention module names (in a block) over the video tokens
    token_tables: ClassVar[dict[str, int]] = {}  # block arguments indexed by token (rotary tables): name -> dim
    joint_attention: ClassVar[bool] = False  # text rows inside the self-attention sequence
    embedded_guidance: ClassVar[bool] = False  # guidance-distilled: a guidance input, no CFG batch needed

    # ---- shapes --------------------------------------------------------------------------
    @staticmethod
    def patch(config: dict) -> tuple[int, int, int]:
        raise NotImplementedError

    def token_layout(self, config: dict, video: VideoSpec, text_length: int, geometry: Geometry = Geometry()) -> TokenLayout:
        pt, ph, pw = self.patch(config)
        f = geometry.latent_frames(video.frames)
        h, w = video.height // geometry.spatial, video.width // geometry.spatial
        c = config.get("in_channels", 16)
        shape = (c, f, h, w) if self.layout == "BCFHW" else (f, c, h, w)
        grid = (f // pt, h // ph, w // pw)
        n = grid[0] * grid[1] * grid[2]
        text = text_length if self.joint_attention else 0
        return TokenLayout(shape, grid, n, text, self.video_offset(text))

    def video_offset(self, text_rows: int) -> int:
        return 0

    # ---- validation ----------------------------------------------------------------------
    def preset(self, name: str, path: str = "model.preset") -> Preset:
        if name not in self.presets:
            raise ConfigError(path, f"unknown {self.name} preset {name!r}{nearest(name, self.presets)}")
        return self.presets[name]

    def model_config(self, cfg: RunConfig) -> dict:
        if cfg.model.preset is not None:
            return self.preset(cfg.model.preset).config
        path = Path(cfg.model.checkpoint) / "transformer" / "config.json"
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError("model.checkpoint", f"{path} is not valid JSON ({e}); re-export the checkpoint") from None

    def default_text_length(self, config: dict) -> int:
        raise NotImplementedError

    def geometry(self, cfg: RunConfig) -> Geometry:
        if cfg.model.preset is not None:
            return self.preset(cfg.model.preset).geometry
        vae = Path(cfg.model.checkpoint) / "vae" / "config.json"
        if vae.is_file():
            c = json.loads(vae.read_text())
            spatial = c.get("scale_factor_spatial") or c.get("spatial_compression_ratio") or 2 ** (len(c.get("block_out_channels", [0] * 4)) - 1)
            temporal = c.get("scale_factor_temporal") or c.get("temporal_compression_ratio") or 4
            return Geometry(int(spatial), int(temporal))
        return Geometry()

    def validate(self, cfg: RunConfig) -> None:
        config = self.model_config(cfg)
        v, s = cfg.video, cfg.sampling
        geo = self.geometry(cfg)
        t = geo.temporal
        if (v.frames - 1) % t:
            lo = (v.frames - 1) // t * t + 1
            raise ConfigError(
                "video.frames",
                f"{self.name} needs frames = {t}k+1 (VAE temporal compression {t}): {v.frames} is not; try {lo} or {lo + t}",
            )
        pt, ph, pw = self.patch(config)
        if geo.latent_frames(v.frames) % pt:
            raise ConfigError("video.frames", f"latent frames {geo.latent_frames(v.frames)} are not a multiple of the temporal patch {pt}")
        for key, size, p in (("height", v.height, ph), ("width", v.width, pw)):
            stride = geo.spatial * p
            if size % stride:
                raise ConfigError(f"video.{key}", f"{size} is not divisible by {stride} (VAE stride {geo.spatial} x patch {p})")
        if s.scheduler != "default" and s.scheduler not in self.schedulers:
            raise ConfigError("sampling.scheduler", f"{s.scheduler!r} is not one of default, {', '.join(self.schedulers)} for {self.name}")
        if s.embedded_guidance is not None and not self.embedded_guidance:
            raise ConfigError("sampling.embedded_guidance", f"only hunyuan_video has embedded guidance, not {self.name}")

    # ---- model ---------------------------------------------------------------------------
    def build_random(self, preset: Preset, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
        """Random weights at the preset's size, created directly on `device`, the same on every
        device for a seed (families/weights.py); `_keep_in_fp32_modules` stay float32."""
        keep = tuple(getattr(self.model_class, "_keep_in_fp32_modules", None) or ())
        return build_random(self.model_class, preset.config, device, dtype, seed, keep).requires_grad_(False)

    def make_scheduler(self, name: str, shift: float | None, config: dict, video: VideoSpec):
        raise NotImplementedError

    def set_timesteps(self, scheduler, steps: int, device) -> torch.Tensor:
        scheduler.set_timesteps(steps, device=device)
        return scheduler.timesteps

    # ---- conditioning --------------------------------------------------------------------
    def pseudo_condition(self, prompt: str, config: dict, text_length: int) -> Conditioning:
        embeds, _ = pseudo_embedding(prompt, text_length, self.text_dim(config))
        return Conditioning(embeds[None])

    def text_dim(self, config: dict) -> int:
        raise NotImplementedError

    def encode(self, pipe, prompts: list[str], text_length: int, device) -> Conditioning:
        """The checkpoint's own text encoder, through the family's diffusers pipeline."""
        raise NotImplementedError

    # ---- capture ---------------------------------------------------------------------------
    def cp_plan(self) -> dict | None:
        """Where context parallelism splits and gathers the rows, in diffusers' `_cp_plan` format,
        for a model whose diffusers class has no plan (None: the model's own, or none)."""
        return None

    def prepare_capture(self, model: LoadedModel, video: VideoSpec) -> None:
        """Make the transformer traceable at this video's static shapes (same numbers as eager)."""

    # ---- one denoising step ---------------------------------------------------------------
    def static_inputs(self, model: LoadedModel, video: VideoSpec, sampling) -> dict[str, Any]:
        """Inputs that do not change between steps (rotary tables, embedded guidance)."""
        return {}

    def model_inputs(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning, static: dict) -> dict:
        raise NotImplementedError

    def scheduler_step(self, scheduler, pred, t, latents, state: dict) -> torch.Tensor:
        return scheduler.step(pred, t, latents, return_dict=False)[0]

    def stochastic(self, scheduler) -> bool:
        """Whether scheduler_step draws noise from the sample's generator (then samples cannot
        share a batch and keep their own noise)."""
        return False

    latents_in_model_dtype: ClassVar[bool] = False  # CogVideoX's pipeline keeps latents in the model dtype

    # ---- decoding ------------------------------------------------------------------------
    def vae_decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """Final latents (family layout) -> pixels (B, 3, F, H, W) in [-1, 1], as the pipeline does."""
        raise NotImplementedError



@torch.no_grad()
def decode_frames(model: LoadedModel, latents: torch.Tensor):
    """One sample's latents -> frames (F, H, W, 3), float numpy in [0, 1]."""
    video = model.decoder(latents.to(model.device))
    return ((video[0].permute(1, 2, 3, 0).float().clamp(-1, 1) + 1) / 2).cpu().numpy()
