"""Pre-flight: the latent size, the token count and an estimate of peak memory, checked
against the chosen device's free memory before any weights are built or loaded.

The estimate is arithmetic on the transformer's config (parameters counted on the meta
device: nothing is allocated), calibrated on measured peaks (docs/benchmarks.md, Wan 2.1
1.3B on the H100): weights, plus one block's live activations over the CFG batch
(hidden, norms, q/k/v, attention output and the MLP's intermediate), plus, when a target
asks for Astraea, every block's state (cached output, reference input or its sketch,
LSE and skip counters). A config that cannot fit is refused in one line naming the video
keys and the limit; a config that fits is summarised in one line.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .errors import ConfigError
from .families import get_family
from .families.base import TORCH_DTYPES, TokenLayout
from .schema import RunConfig

STATE_ROW_BYTES_FIXED = 8  # LSE (float32) and the skip counter (int32) of a row


@dataclass(frozen=True)
class Estimate:
    latent_shape: tuple[int, ...]
    video_tokens: int
    text_tokens: int
    batch: int  # the CFG batch the dense transformer runs at
    parameters: int
    weights_bytes: int
    activation_bytes: int
    state_bytes: int  # 0 without a target
    device: str
    free_bytes: int | None  # None: not known (meta device)

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes + self.state_bytes

    def line(self) -> str:
        free = "" if self.free_bytes is None else f" of {size(self.free_bytes)} free"
        return (f"latents {'x'.join(map(str, self.latent_shape))}, {self.video_tokens:,} video tokens; "
                f"estimated peak {size(self.peak_bytes)}{free} on {self.device} (weights {size(self.weights_bytes)}, "
                f"activations {size(self.activation_bytes)}, block state {size(self.state_bytes)})")


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.3g} PiB"


def count_parameters(family, config: dict) -> int:
    """The transformer's parameters, counted on the meta device (no memory, no weights read)."""
    with torch.device("meta"):
        model = family.model_class.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    return sum(p.numel() for p in model.parameters())


def free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as fh:
                info = dict(line.split(":", 1) for line in fh)
            return int(info["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            import os

            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def layout(cfg: RunConfig) -> TokenLayout:
    """The token layout of cfg's video, from the config alone (no weights)."""
    family = get_family(cfg.model.family)
    config = family.model_config(cfg)
    text_length = cfg.sampling.text_length or (family.preset(cfg.model.preset).text_length if cfg.model.preset
                                               else family.default_text_length(config))
    return family.token_layout(config, cfg.video, text_length, family.geometry(cfg))


def estimate(cfg: RunConfig, device: torch.device, parameters: int | None = None) -> Estimate:
    family = get_family(cfg.model.family)
    config = family.model_config(cfg)
    layout_ = layout(cfg)
    element = torch.empty(0, dtype=TORCH_DTYPES[cfg.model.dtype]).element_size()
    params = count_parameters(family, config) if parameters is None else parameters
    heads, head_dim = config.get("num_attention_heads", 1), config.get("attention_head_dim", 64)
    hidden = heads * head_dim
    ffn = config.get("ffn_dim") or 4 * hidden
    batch = 2 if cfg.sampling.guidance > 1 and not family.embedded_guidance else 1
    rows = batch * (layout_.video_tokens + layout_.text_tokens)
    activation = rows * (6 * hidden + 2 * ffn) * element
    state = 0
    if cfg.target.budget is not None or cfg.target.speedup is not None:
        sel = cfg.selection
        out = hidden * (1 if sel.cache == "float8" else element) + (4 if sel.cache == "float8" else 0)
        reference = hidden * element if sel.delta == "full" else sel.sketch_dim * 4
        blocks = config.get("num_layers", 1) + config.get("num_single_layers", 0)
        state = blocks * batch * layout_.video_tokens * (out + reference + STATE_ROW_BYTES_FIXED)
    return Estimate(tuple(layout_.latent_shape), layout_.video_tokens, layout_.text_tokens, batch, params,
                    params * element, activation, state, str(device), free_bytes(device))


def check(cfg: RunConfig, device: torch.device, parameters: int | None = None) -> Estimate:
    """The estimate, or a ConfigError naming what to change when it cannot fit `device`: the
    selection settings when the dense model fits and Astraea's block state does not, else
    the video keys."""
    est = estimate(cfg, device, parameters)
    if est.free_bytes is None or est.peak_bytes <= est.free_bytes:
        return est
    free, dense = est.free_bytes, est.weights_bytes + est.activation_bytes
    sizes = (f"the estimated peak memory {size(est.peak_bytes)} (weights {size(est.weights_bytes)}, activations "
             f"{size(est.activation_bytes)}, block state {size(est.state_bytes)}) exceeds the {size(free)} free on {est.device}")
    if dense <= free and est.state_bytes:
        small = estimate(dataclasses.replace(cfg, selection=dataclasses.replace(
            cfg.selection, delta="sketch", cache="float8")), device, est.parameters)
        hint = (f"selection: {{delta: sketch, cache: float8}} needs {size(small.peak_bytes)}" if small.peak_bytes <= free
                else "lower video.frames, height or width")
        raise ConfigError("selection", f"{est.video_tokens:,} video tokens fit dense, but {sizes}: {hint}")
    v = cfg.video
    raise ConfigError(_largest_key(cfg), f"{v.frames}x{v.height}x{v.width} (frames x height x width) is "
                      f"{est.video_tokens:,} video tokens; {sizes}: lower video.frames, height or width")


def _largest_key(cfg: RunConfig) -> str:
    """The video key furthest above the model's native size (a preset's; else the largest value)."""
    family = get_family(cfg.model.family)
    native = family.preset(cfg.model.preset).video if cfg.model.preset else (1, 1, 1)
    v = cfg.video
    ratios = {"video.frames": v.frames / native[0], "video.height": v.height / native[1], "video.width": v.width / native[2]}
    return max(ratios, key=lambda k: (ratios[k], -math.inf))
