"""Model-family adapters, in a registry keyed by the family name of model.yaml."""

from __future__ import annotations

from . import cogvideox, hunyuan_video, opensora, wan  # noqa: F401  (register the built-in families)
from .base import FAMILIES, Conditioning, Family, LoadedModel, Preset, TokenLayout, get_family

__all__ = ["FAMILIES", "Conditioning", "Family", "LoadedModel", "Preset", "TokenLayout", "get_family"]
