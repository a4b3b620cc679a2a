"""The peers diffusers ships for the same transformers, applied the way their pipelines use
them, so `astraea-bench` compares Astraea with them on the same
model, prompts and seeds.

    transformer = PeerTransformer(model.transformer, "first_block_cache", model.family.block_containers,
                                  threshold=0.05)
    latents = sampling.denoise(model, video, sampling, inputs, transformer)
    transformer.close()

Peers and their knobs (diffusers' cache configs; a knob left out takes diffusers' default):
  pab                 PyramidAttentionBroadcast: skip (self-attention broadcast range, steps),
                      cross (cross-attention broadcast range; default: cross-attention always
                      computed), lo / hi (timesteps between which it broadcasts)
  first_block_cache   FirstBlockCache: threshold (relative change of the first block's output)
  taylorseer          TaylorSeer: interval (a full step every interval), order, warmup (steps)
  faster_cache        FasterCache: skip (attention broadcast range), lo / hi (timesteps);
                      distilled=True where the call has no CFG batch (HunyuanVideo)
  mag_cache           MagCache: threshold (accumulated error), max_skip (steps in a row),
                      retention (fraction of first steps always computed); its per-step
                      magnitude ratios come from `calibrate_mag_cache` (a dense sample)
  toca                ToCa, token-wise feature caching (ours: astraea.toca): ratio (fresh
                      tokens), interval (self-attention and MLP force cycle), cross
                      (cross-attention's), first (full first steps); `make` builds it
Each call runs inside `transformer.cache_context("cfg")` and tells the hooks the current
timestep, as diffusers pipelines do; `close()` removes the hooks.
"""

from __future__ import annotations

import torch

from .schema import KNOBS, PEERS, parse_setting  # noqa: F401  (the settings' grammar: a config value)


def _config(name: str, knobs: dict, timestep, blocks: tuple[str, ...]):
    import diffusers

    if name == "pab":
        span = (knobs.get("lo", 100), knobs.get("hi", 800))
        return diffusers.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=int(knobs.get("skip", 2)), spatial_attention_timestep_skip_range=span,
            cross_attention_block_skip_range=knobs.get("cross"), cross_attention_timestep_skip_range=span,
            current_timestep_callback=timestep)
    if name == "first_block_cache":
        return diffusers.FirstBlockCacheConfig(threshold=float(knobs.get("threshold", 0.05)))
    if name == "taylorseer":
        return diffusers.TaylorSeerCacheConfig(cache_interval=int(knobs.get("interval", 5)),
                                               max_order=int(knobs.get("order", 1)),
                                               disable_cache_before_step=int(knobs.get("warmup", 3)),
                                               # whole blocks: its default names miss Wan's attn1/attn2
                                               cache_identifiers=[rf"^{b}\.\d+$" for b in blocks])
    if name == "faster_cache":
        return diffusers.FasterCacheConfig(
            spatial_attention_block_skip_range=int(knobs.get("skip", 2)),
            spatial_attention_timestep_skip_range=(knobs.get("lo", -1), knobs.get("hi", 681)),
            current_timestep_callback=timestep, attention_weight_callback=lambda _: 0.3,
            tensor_format="BCFHW", is_guidance_distilled=bool(knobs.get("distilled", False)))
    if name == "mag_cache":
        return diffusers.MagCacheConfig(threshold=float(knobs.get("threshold", 0.06)),
                                        max_skip_steps=int(knobs.get("max_skip", 3)),
                                        retention_ratio=float(knobs.get("retention", 0.2)),
                                        num_inference_steps=int(knobs["steps"]), mag_ratios=knobs.get("ratios"),
                                        calibrate=knobs.get("ratios") is None)
    raise ValueError(f"unknown peer {name!r} (known: {', '.join(PEERS)})")


class PeerTransformer:
    """The diffusers transformer with a peer's cache hooks; called like it."""

    def __init__(self, transformer: torch.nn.Module, name: str, blocks: tuple[str, ...] = ("blocks",), **knobs):
        self.transformer = transformer
        self.timestep = None
        transformer.enable_cache(_config(name, knobs, lambda: self.timestep, blocks))

    def __call__(self, **kwargs):
        t = kwargs.get("timestep")
        self.timestep = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else t
        with self.transformer.cache_context("cfg"):
            return self.transformer(**kwargs)

    def close(self) -> None:
        self.transformer.disable_cache()


def calibrate_mag_cache(transformer: torch.nn.Module, blocks: tuple[str, ...], steps: int, sample) -> list[float]:
    """MagCache's per-step magnitude ratios for this model: `sample(peer)` runs one dense
    sample of `steps` steps through the calibrating hooks, which print the ratios at the end
    (diffusers' calibration interface); they are read back from that line."""
    import ast
    import contextlib
    import io

    peer = PeerTransformer(transformer, "mag_cache", blocks, steps=steps)
    text = io.StringIO()
    try:
        with contextlib.redirect_stdout(text):
            sample(peer)
    finally:
        peer.close()
    lines = [line for line in text.getvalue().splitlines() if line.startswith("[")]
    if not lines:
        raise RuntimeError("MagCache's calibration printed no ratios (diffusers' MagCache interface changed?)")
    ratios = [float(r) for r in ast.literal_eval(lines[-1])]
    if len(ratios) != steps:
        raise RuntimeError(f"MagCache calibrated {len(ratios)} ratios for {steps} steps")
    return ratios


def make(model, name: str, **knobs):
    """A peer of `model` (a LoadedModel) by name: ToCa (ours) or a diffusers cache."""
    if name == "toca":
        from .toca import ToCa

        return ToCa(model.transformer, model.family.name, model.family.block_containers, **knobs)
    return PeerTransformer(model.transformer, name, model.family.block_containers, **knobs)
