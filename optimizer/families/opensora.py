"""Open-Sora v1.2 (hpcai-tech): STDiT3 (our implementation, families/stdit3.py), T5 captions
(4096 wide, 300 tokens, a padding mask), its rectified-flow sampler, latents B,C,F,H,W from
its VAE (8x in space, 17 frames -> 5 latent frames in time).

The sampler is Open-Sora's RFLOW: timesteps (1 - i/N) x 1000, each moved by the resolution
and length transform (ratio = sqrt(H W / 512^2) x sqrt(latent frames), t' = ratio t /
(1 + (ratio - 1) t)), Euler steps z += v (t_i - t_i+1) / 1000 with the velocity the first
half of the output's channels. The frame rate and the pixel size are model inputs. The
transform is a flow shift of `ratio`; `sampling.shift` is Open-Sora's `transform_scale`, a
factor on that ratio (1 by default, as released; the bundled model is sampled at the scale its
weights file records having been trained at).

STDiT3's factored attention (within a frame, or across the frames at a position) is one op on
token-ordered tensors, `astraea::factored_attention`; below the dense budget the rewrite makes
it query-only, `astraea::group_attention` (the selected rows' queries against their own
group's keys; passes/replace_attention.py), oracle-exact like the other families.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import bundled
from ..errors import ConfigError
from .base import FAMILIES, Conditioning, Family, Geometry, Preset, pseudo_embedding
from .stdit3 import STDiT3

FPS = 24.0


@dataclass(frozen=True)
class MicroFrameGeometry(Geometry):
    """Open-Sora v1.2's VAE: 8x in space; in time, each 17 frames -> 5 latent frames."""

    spatial: int = 8
    temporal: int = 17
    latent_per_micro: int = 5

    def latent_frames(self, frames: int) -> int:
        return frames // self.temporal * self.latent_per_micro


class RFlow:
    """Open-Sora v1.2's rectified-flow sampler (timesteps on a 0-1000 scale)."""

    order = 1
    init_noise_sigma = 1.0

    def __init__(self, height: int, width: int, frames: int, num_timesteps: int = 1000, scale: float = 1.0):
        self.height, self.width, self.frames, self.num_timesteps = height, width, frames, num_timesteps
        self.scale = scale
        self.timesteps = torch.zeros(0)

    @property
    def config(self) -> dict:
        return {"height": self.height, "width": self.width, "frames": self.frames, "num_timesteps": self.num_timesteps,
                "transform_scale": self.scale}

    @staticmethod
    def base_ratio(height: int, width: int, frames: int) -> float:
        """Open-Sora's shift for a video: sqrt(pixels / 512^2) x sqrt(latent frames)."""
        latent = MicroFrameGeometry().latent_frames(frames) if frames > 1 else 1
        return math.sqrt(height * width / 512**2) * math.sqrt(latent)

    def transform(self, t):
        """t (a float or a tensor, 0-1000) moved by the resolution and the latent length (times the scale)."""
        ratio = self.base_ratio(self.height, self.width, self.frames) * self.scale
        t = t / self.num_timesteps
        return ratio * t / (1 + (ratio - 1) * t) * self.num_timesteps

    def set_timesteps(self, steps: int, device=None) -> None:
        ts = [self.transform((1 - i / steps) * self.num_timesteps) for i in range(steps)]
        self.timesteps = torch.tensor(ts, dtype=torch.float32, device=device)

    def step(self, velocity: torch.Tensor, t, latents: torch.Tensor) -> torch.Tensor:
        ts = self.timesteps
        i = int((ts - float(t)).abs().argmin())
        dt = (ts[i] - ts[i + 1] if i + 1 < len(ts) else ts[i]) / self.num_timesteps
        return latents + velocity * dt.to(latents.device)


_XL = dict(depth=28, hidden_size=1152, num_heads=16, in_channels=4, patch_size=(1, 2, 2), caption_channels=4096,
           model_max_length=300)


# Open-Sora's transform at the bundled 17x64x64 pixels shifts the noise levels down (ratio 0.28: few
# steps, and little training, at the high noise where shape and motion form); this transform_scale
# brings the ratio to the Wan reference model's shift, the one tools/train_reference.py trains at
BUNDLED_SCALE = bundled.SHIFT / RFlow.base_ratio(*bundled.VIDEO[1:], bundled.VIDEO[0])


def bundled_preset(weights: Path = bundled.STDIT3_WEIGHTS) -> Preset:
    """The second bundled reference model (tools/train_reference.py --family opensora), sampled at
    the transform scale its weights file records having been trained at."""
    return Preset("bundled", bundled.STDIT3_CONFIG, bundled.TEXT_LENGTH, bundled.VIDEO,
                  "the STDiT3 reference model trained here (docs/reference-model.md): pixel-patchify codec",
                  geometry=Geometry(bundled.codec.SPATIAL, bundled.codec.TEMPORAL), weights=str(weights),
                  shift=bundled.transform_scale(weights))


@FAMILIES.register("opensora")
class OpenSora(Family):
    name = "opensora"
    model_class = STDiT3
    pipeline_class = ""  # no diffusers pipeline: a checkpoint is the transformer's folder alone
    layout = "BCFHW"
    schedulers = ("rflow",)
    block_containers = ("spatial_blocks", "temporal_blocks")
    self_attention = ("attn",)
    token_tables = {"rotary_emb": 0}  # the temporal blocks' rotary cos/sin, (N, head_dim) each
    pipeline_cfg_per_branch = False  # Open-Sora runs the CFG batch in one call
    presets = {
        # 2 s at 24 fps (51 frames: 15 latent frames), 480p 16:9: 15 x 30 x 53 tokens before patching
        "stdit3-xl-2": Preset("stdit3-xl-2", _XL, 300, (51, 480, 848), "Open-Sora v1.2, random weights",
                              geometry=MicroFrameGeometry()),
        "tiny": Preset("tiny", dict(_XL, depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=16),
                       16, (17, 64, 64), "2 spatial + 2 temporal blocks, 4 heads x 16, random weights: tests",
                       geometry=MicroFrameGeometry()),
        **({"bundled": bundled_preset()} if bundled.STDIT3_WEIGHTS.is_file() else {}),
    }

    @staticmethod
    def patch(config):
        return tuple(config.get("patch_size", (1, 2, 2)))

    def text_dim(self, config):
        return config.get("caption_channels", 4096)

    def default_text_length(self, config):
        return config.get("model_max_length", 300)

    def geometry(self, cfg):
        return MicroFrameGeometry() if cfg.model.preset is None else self.preset(cfg.model.preset).geometry

    def validate(self, cfg):
        if cfg.model.checkpoint is not None:
            self.model_config(cfg)  # its transformer/config.json reads (the schema has checked it is there)
        v, s = cfg.video, cfg.sampling
        if v.frames % 17:
            lo = max(17, v.frames // 17 * 17)
            raise ConfigError("video.frames", f"opensora needs frames = 17k (its VAE encodes 17 frames into 5): "
                                              f"{v.frames} is not; try {lo} or {lo + 17}")
        for key, size in (("height", v.height), ("width", v.width)):
            if size % 16:
                raise ConfigError(f"video.{key}", f"{size} is not divisible by 16 (VAE stride 8 x patch 2)")
        if s.scheduler not in ("default", "rflow"):
            raise ConfigError("sampling.scheduler", f"{s.scheduler!r} is not one of default, rflow for opensora")
        if s.embedded_guidance is not None:
            raise ConfigError("sampling.embedded_guidance", "only hunyuan_video has embedded guidance, not opensora")

    def make_scheduler(self, name, shift, config, video):
        return RFlow(video.height, video.width, video.frames, scale=1.0 if shift is None else shift)

    def pseudo_condition(self, prompt, config, text_length):
        embeds, mask = pseudo_embedding(prompt, text_length, self.text_dim(config))
        return Conditioning(embeds[None], mask[None])

    def static_inputs(self, model, video, sampling):
        device = model.device
        return {"fps": torch.tensor([FPS], device=device), "height": torch.tensor([float(video.height)], device=device),
                "width": torch.tensor([float(video.width)], device=device)}

    def model_inputs(self, latents, t, cond, static):
        b = latents.shape[0]
        return dict(hidden_states=latents, timestep=t.expand(b), encoder_hidden_states=cond.embeds,
                    encoder_attention_mask=cond.mask, fps=static["fps"], height=static["height"].expand(b),
                    width=static["width"].expand(b), return_dict=False)

    def scheduler_step(self, scheduler, pred, t, latents, state):
        return scheduler.step(pred[:, : latents.shape[1]], t, latents)  # the velocity: the first half (pred_sigma)
