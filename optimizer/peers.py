"""The peers diffusers ships for the same transformers, applied the way their pipelines use
them, so `astraea-bench` and tools/measure_peers.py compare Astraea with them on the same
model, prompts and seeds.

    transformer = PeerTransformer(model.transformer, "first_block_cache", model.family.block_containers,
                                  threshold=0.05)
    latents = sampling.denoise(model, video, sampling, inputs, transformer)
    transformer.close()

Peers and their knobs (diffusers' cache configs; a knob left out takes diffusers' default):
  pab                 PyramidAttentionBroadcast: skip (spatial attention broadcast range, steps),
                      lo / hi (timesteps between which it broadcasts)
  first_block_cache   FirstBlockCache: threshold (relative change of the first block's output)
  taylorseer          TaylorSeer: interval (a full step every interval), order, warmup (steps)
  faster_cache        FasterCache: skip (attention broadcast range), lo / hi (timesteps)
Each call runs inside `transformer.cache_context("cfg")` and tells the hooks the current
timestep, as diffusers pipelines do; `close()` removes the hooks.
"""

from __future__ import annotations

import torch

PEERS = ("pab", "first_block_cache", "taylorseer", "faster_cache")


def _config(name: str, knobs: dict, timestep, blocks: tuple[str, ...]):
    import diffusers

    if name == "pab":
        return diffusers.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=int(knobs.get("skip", 2)),
            spatial_attention_timestep_skip_range=(knobs.get("lo", 100), knobs.get("hi", 800)),
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
            tensor_format="BCFHW", is_guidance_distilled=False)
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
