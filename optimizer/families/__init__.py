"""Model-family adapters, in a registry keyed by the family name of model.yaml."""

from __future__ import annotations

from ..errors import ConfigError
from ..registry import Registry
from .base import Conditioning, Family, LoadedModel, Preset, TokenLayout

FAMILIES: Registry[type[Family]] = Registry("model family")


def get_family(name: str, path: str = "model.family") -> Family:
    if name not in FAMILIES:
        from ..config import _nearest

        raise ConfigError(path, f"unknown family {name!r}{_nearest(name, FAMILIES.names())}")
    return FAMILIES.get(name)()  # adapters are stateless


from . import cogvideox, hunyuan_video, wan  # noqa: E402,F401  (register the built-in families)

__all__ = ["FAMILIES", "Conditioning", "Family", "LoadedModel", "Preset", "TokenLayout", "get_family"]
