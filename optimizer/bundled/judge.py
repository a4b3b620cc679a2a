"""Does a video show what its caption says? A pixel-level judge for one-shape captions.

Finds the pixels near the caption's colour in every frame and checks: enough of them
(colour), the centroid's travel (direction of `moving ...`), the area's trend
(`growing` / `shrinking`). Shape and texture are not judged. Used on the rendered data
(where every caption must pass) and on the bundled model's samples (docs/reference-model.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import COLOURS

_DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}  # (axis: 0=x 1=y, sign)


@dataclass(frozen=True)
class Verdict:
    colour: bool
    motion: bool | None  # None: the caption's motion is not judged (bouncing, rotating)
    travel: tuple[float, float]  # centroid displacement first -> last frame (x, y), pixels
    area_ratio: float  # last / first frame's colour area

    @property
    def passed(self) -> bool:
        return self.colour and self.motion is not False


def judge(video: torch.Tensor, caption: str, tol: float = 0.28, min_pixels: int = 12) -> Verdict:
    """video (3, F, H, W) in [-1, 1]; caption of one shape: 'a <colour> <shape> <motion ...> over ...'."""
    words = caption.split()
    colour, motion = words[1], " ".join(words[3:words.index("over")])
    rgb = (video.float() + 1) / 2
    target = torch.tensor(COLOURS[colour], dtype=rgb.dtype)[:, None, None, None]
    mask = ((rgb - target).abs().amax(dim=0) < tol).float()  # (F, H, W)
    area = mask.sum(dim=(1, 2))
    seen = bool((area >= min_pixels).float().mean() >= 0.8)
    f, h, w = mask.shape
    ys = torch.arange(h, dtype=rgb.dtype)[None, :, None]
    xs = torch.arange(w, dtype=rgb.dtype)[None, None, :]
    cx = (mask * xs).sum(dim=(1, 2)) / area.clamp(min=1)
    cy = (mask * ys).sum(dim=(1, 2)) / area.clamp(min=1)
    k = max(1, f // 4)  # average the first and last quarter of the frames
    travel = (float(cx[-k:].mean() - cx[:k].mean()), float(cy[-k:].mean() - cy[:k].mean()))
    ratio = float(area[-k:].mean() / area[:k].mean().clamp(min=1))
    verdict: bool | None = None
    if motion.startswith("moving"):
        axis, sign = _DIRECTIONS[motion.split()[1]]
        verdict = sign * travel[axis] > 0.15 * (w if axis == 0 else h) and abs(travel[axis]) > abs(travel[1 - axis])
    elif motion == "growing":
        verdict = ratio > 1.5
    elif motion == "shrinking":
        verdict = ratio < 1 / 1.5
    return Verdict(seen, verdict if seen else False if verdict is not None else None, travel, ratio)
