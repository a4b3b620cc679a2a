"""Quality of an accelerated sample against the dense one: PSNR and SSIM.

`compare(model, latents, dense)` scores the final latents (PSNR over the dense sample's
range: what the budget search minimises) and, where the model has a decoder, the decoded
frames in [0, 1] (PSNR and SSIM with data range 1: what the paper reports). SSIM is Wang et
al.'s (2004): an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, valid windows
only, per frame and colour channel, averaged. LPIPS needs a pretrained backbone that cannot
be downloaded here, so it is not reported.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(mse: float, peak: float) -> float:
    """Decibels of a mean squared error against a peak-to-peak range; inf when equal."""
    return float("inf") if mse == 0 else 10 * math.log10(peak * peak / mse)


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float, size: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of two stacks of images (..., H, W), computed in float64."""
    if x.shape != y.shape or x.dim() < 2:
        raise ValueError(f"ssim needs two equal stacks of images (..., H, W), got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < size:
        raise ValueError(f"ssim's {size}x{size} window needs images of at least that size, got {tuple(x.shape[-2:])}")
    h, w = x.shape[-2:]
    a = x.reshape(-1, 1, h, w).double()
    b = y.reshape(-1, 1, h, w).double()
    g = _gaussian(size, sigma).to(a.device)
    window = (g[:, None] * g[None, :])[None, None]

    def blur(t):
        return F.conv2d(t, window)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def frames(model, latents: torch.Tensor) -> torch.Tensor | None:
    """One sample's decoded frames (F, 3, H, W) in [0, 1], or None without a decoder."""
    if getattr(model, "decoder", None) is None:
        return None
    from .families.base import decode_frames

    return torch.from_numpy(decode_frames(model, latents.float().cpu())).permute(0, 3, 1, 2)


def compare(model, latents: torch.Tensor, dense: torch.Tensor, dense_frames: torch.Tensor | None = None) -> dict:
    """PSNR of the latents (over the dense range) and, with a decoder, PSNR and SSIM of the
    decoded frames in [0, 1] (`dense_frames`: frames(model, dense), if already decoded)."""
    got, want = latents.float().cpu(), dense.float().cpu()
    out = {"psnr_latent": psnr(float(((got - want) ** 2).mean()), float(want.max() - want.min())),
           "psnr_pixels": None, "ssim_pixels": None}
    a = frames(model, got)
    if a is not None:
        b = dense_frames if dense_frames is not None else frames(model, want)
        out["psnr_pixels"] = psnr(float(((a.double() - b.double()) ** 2).mean()), 1.0)
        out["ssim_pixels"] = ssim(a, b, 1.0) if min(a.shape[-2:]) >= 11 else None
    return out


def spearman(x, y) -> float:
    """Spearman's rank correlation of two equal-length sequences (ties get their mean rank):
    the Pearson correlation of the ranks, in float64. nan when either side is constant."""
    import numpy as np

    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"spearman needs two equal 1-D sequences of 2 or more values, got {a.shape} and {b.shape}")

    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for value in np.unique(v):  # ties: the mean of their ranks
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")
