"""The procedural text-to-video data set the bundled reference model is trained on.

A scene is one or two coloured shapes that move, bounce, grow, shrink or rotate over a
simple textured background; its caption says so ("a red circle moving left over a striped
background"). Scenes are drawn from a seeded numpy RNG (the same on every machine) and
rendered in batch with torch on any device: anti-aliased signed-distance shapes, pixels in
[-1, 1], video (B, 3, F, H, W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

COLOURS = {
    "red": (0.9, 0.15, 0.1), "green": (0.15, 0.8, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1),
    "white": (0.95, 0.95, 0.95), "purple": (0.6, 0.2, 0.8), "orange": (1.0, 0.55, 0.05), "cyan": (0.1, 0.85, 0.9),
}
SHAPES = ("circle", "square", "triangle", "ring")
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "bouncing", "growing", "shrinking", "rotating")
BACKGROUNDS = ("striped", "checkered", "gradient", "plain", "dotted")
BG_TINTS = ((0.25, 0.25, 0.3), (0.3, 0.22, 0.18), (0.15, 0.28, 0.22), (0.3, 0.3, 0.3))
_ROTATES_VISIBLY = ("square", "triangle")


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    motion: str
    x: float  # centre in [-1, 1] (before motion)
    y: float
    size: float  # half-extent in [-1, 1] units


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str
    tint: int  # index into BG_TINTS
    phase: float  # texture offset

    @property
    def caption(self) -> str:
        parts = [f"a {s.colour} {s.shape} {s.motion}" for s in self.shapes]
        return f"{' and '.join(parts)} over a {self.background} background"


def vocabulary() -> list[str]:
    """Every word a caption can use (the bundled text encoder's fixed vocabulary)."""
    words = {"a", "and", "over", "background"}
    for group in (COLOURS, SHAPES, MOTIONS, BACKGROUNDS):
        for phrase in group:
            words.update(phrase.split())
    return sorted(words)


def _shape(rng: np.random.Generator, avoid: str | None) -> Shape:
    colour = rng.choice([c for c in COLOURS if c != avoid])
    shape = str(rng.choice(SHAPES))
    motions = [m for m in MOTIONS if m != "rotating" or shape in _ROTATES_VISIBLY]
    motion = str(rng.choice(motions))
    size = float(rng.uniform(0.2, 0.32))
    x, y = (float(v) for v in rng.uniform(-0.35, 0.35, size=2))
    return Shape(str(colour), shape, motion, x, y, size)


def sample_scene(rng: np.random.Generator, two_shapes_p: float = 0.3) -> Scene:
    first = _shape(rng, None)
    shapes = (first,)
    if rng.random() < two_shapes_p:  # two shapes: opposite quadrants, so their paths never overlap
        second = _shape(rng, first.colour)
        jitter = rng.uniform(-0.08, 0.08, size=4)
        shapes = (
            replace(first, x=-0.3 + jitter[0], y=-0.3 + jitter[1], size=min(first.size, 0.24)),
            replace(second, x=0.3 + jitter[2], y=0.3 + jitter[3], size=min(second.size, 0.24)),
        )
    return Scene(shapes, str(rng.choice(BACKGROUNDS)), int(rng.integers(len(BG_TINTS))), float(rng.uniform(0, 1)))


def scenes_for(seed: int, count: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(count)]


def _trajectory(s: Shape, t: torch.Tensor):
    """Centre, size and angle of a shape over normalised time t in [0, 1] (F,)."""
    x = torch.full_like(t, s.x)
    y = torch.full_like(t, s.y)
    size = torch.full_like(t, s.size)
    angle = torch.zeros_like(t)
    travel = 1.1 * (t - 0.5)
    if s.motion == "moving left":
        x = 0.25 * s.x - travel
    elif s.motion == "moving right":
        x = 0.25 * s.x + travel
    elif s.motion == "moving up":
        y = 0.25 * s.y - travel  # image rows grow downwards
    elif s.motion == "moving down":
        y = 0.25 * s.y + travel
    elif s.motion == "bouncing":
        y = 0.55 - 0.9 * torch.abs(torch.sin(math.pi * 1.5 * t)) + 0.1 * s.y
    elif s.motion == "growing":
        size = 0.12 + 0.33 * t
    elif s.motion == "shrinking":
        size = 0.45 - 0.33 * t
    elif s.motion == "rotating":
        angle = 0.5 * math.pi * t
    return x, y, size, angle


def _coverage(s: Shape, t: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor, sharp: float) -> torch.Tensor:
    """Soft mask (F, H, W) of one shape."""
    x, y, size, angle = (v[:, None, None] for v in _trajectory(s, t))
    dx, dy = gx - x, gy - y
    c, sn = torch.cos(angle), torch.sin(angle)
    u, v = c * dx + sn * dy, -sn * dx + c * dy
    if s.shape == "circle":
        sdf = torch.sqrt(u * u + v * v) - size
    elif s.shape == "ring":
        r = torch.sqrt(u * u + v * v)
        sdf = torch.abs(r - 0.75 * size) - 0.25 * size
    elif s.shape == "square":
        sdf = torch.maximum(u.abs(), v.abs()) - size * 0.85
    else:  # equilateral triangle, apex up (rows grow downwards): base and two sides
        sdf = torch.maximum(v - 0.5 * size, (math.sqrt(3.0) * u.abs() - v - size) / 2)
    return torch.sigmoid(-sdf * sharp)


def _background(scene: Scene, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    tint = torch.tensor(BG_TINTS[scene.tint], device=gx.device)
    light = tint + 0.25
    p = scene.phase * 2 * math.pi
    if scene.background == "striped":
        m = (torch.sin(gx * 5 * math.pi + p) > 0).float()
    elif scene.background == "checkered":
        m = ((torch.sin(gx * 4 * math.pi + p) > 0) ^ (torch.sin(gy * 4 * math.pi + p) > 0)).float()
    elif scene.background == "gradient":
        m = (gy + 1) / 2
    elif scene.background == "dotted":
        m = ((torch.sin(gx * 6 * math.pi + p) * torch.sin(gy * 6 * math.pi + p)) > 0.6).float()
    else:
        m = torch.zeros_like(gx)
    return tint[:, None, None] * (1 - m) + light[:, None, None] * m  # (3, H, W)


def render(scenes: list[Scene], frames: int, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Scenes -> video (B, 3, F, H, W) in [-1, 1], float32."""
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size * 2 - 1
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    t = torch.linspace(0, 1, frames, device=device)
    sharp = size / 2.0  # about one pixel of soft edge
    out = torch.empty(len(scenes), 3, frames, size, size, device=device)
    for b, scene in enumerate(scenes):
        img = _background(scene, gx, gy)[:, None].expand(3, frames, size, size)
        for s in scene.shapes:
            alpha = _coverage(s, t, gx, gy, sharp)[None]
            colour = torch.tensor(COLOURS[s.colour], device=device)[:, None, None, None]
            img = img * (1 - alpha) + colour * alpha
        out[b] = img * 2 - 1
    return out
