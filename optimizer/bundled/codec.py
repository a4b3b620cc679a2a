"""The bundled model's fixed, invertible latent mapping: pixel patchify, no learned VAE.

Video (B, 3, F, H, W) with F = 2k+1 -> latents (B, 24, k+1, H/2, W/2): the first frame is
doubled, frames are taken in pairs, and each 2 (time) x 2 x 2 (space) cell of the 3
channels becomes 24 channels. Decoding inverts it exactly (the doubled first frame is
averaged). Geometry, as the `wan` adapter sees it: temporal compression 2, spatial stride 2.
"""

from __future__ import annotations

import torch

TEMPORAL = 2
SPATIAL = 2
CHANNELS = 3 * TEMPORAL * SPATIAL * SPATIAL


def encode(video: torch.Tensor) -> torch.Tensor:
    b, c, f, h, w = video.shape
    if (f - 1) % TEMPORAL or h % SPATIAL or w % SPATIAL:
        raise ValueError(f"video {tuple(video.shape)}: frames must be {TEMPORAL}k+1 and sides divisible by {SPATIAL}")
    x = torch.cat([video[:, :, :1], video], dim=2)  # (B, 3, F+1, H, W)
    x = x.reshape(b, c, (f + 1) // TEMPORAL, TEMPORAL, h // SPATIAL, SPATIAL, w // SPATIAL, SPATIAL)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # B, c, dt, dh, dw, F', H', W'
    return x.reshape(b, CHANNELS, (f + 1) // TEMPORAL, h // SPATIAL, w // SPATIAL).contiguous()


def decode(latents: torch.Tensor) -> torch.Tensor:
    b, _, lf, lh, lw = latents.shape
    x = latents.reshape(b, 3, TEMPORAL, SPATIAL, SPATIAL, lf, lh, lw).permute(0, 1, 5, 2, 6, 3, 7, 4)
    x = x.reshape(b, 3, lf * TEMPORAL, lh * SPATIAL, lw * SPATIAL)
    first = (x[:, :, :1] + x[:, :, 1:2]) / 2
    return torch.cat([first, x[:, :, 2:]], dim=2)
