"""The denoising loop every stage shares: the family's scheduler, CFG as one batch of two.

`denoise` takes any transformer-shaped callable, so the dense reference, the search's
rewritten graphs and the compiled engines all run through the same loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .conditioning import encode_prompt
from .config import SamplingSpec, VideoSpec
from .families import Conditioning, LoadedModel


@dataclass
class SampleInputs:
    """What one sample needs besides the model: its noise and its (CFG-batched) conditioning."""

    noise: torch.Tensor  # (1, *latent_shape), float32, before init_noise_sigma
    cond: Conditioning  # batch 2 ([negative, prompt]) under CFG, else batch 1
    cfg: bool
    rng_state: torch.Tensor  # the CPU generator after the noise draw: stochastic schedulers continue it

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        g.set_state(self.rng_state)
        return g


def initial_noise(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded noise drawn on the CPU (as diffusers' pipelines draw it from a CPU generator), so a
    seed gives the same latents on every device. Returns (noise, generator state after it)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, *shape), generator=g, dtype=torch.float32)
    return noise, g.get_state()


def make_inputs(model: LoadedModel, video: VideoSpec, sampling: SamplingSpec, prompt: Conditioning,
                negative: Conditioning, seed: int) -> SampleInputs:
    layout = model.layout(video)
    cfg = sampling.guidance > 1.0
    cond = Conditioning.cat([negative, prompt]) if cfg else prompt
    noise, rng_state = initial_noise(layout.latent_shape, seed)
    return SampleInputs(noise, cond, cfg, rng_state)


def prompt_inputs(model: LoadedModel, video: VideoSpec, sampling: SamplingSpec, prompt: str, seed: int,
                  cache_dir=None) -> SampleInputs:
    """One prompt and seed: the prompt and the config's negative prompt encoded, the noise drawn."""
    return make_inputs(model, video, sampling, encode_prompt(model, prompt, cache_dir),
                       encode_prompt(model, sampling.negative_prompt, cache_dir), seed)


def first_step_kwargs(model: LoadedModel, video: VideoSpec, sampling: SamplingSpec) -> dict:
    """The transformer's kwargs at the first denoising step of the first prompt and seed
    (what benchmarks time and what the graph is captured at)."""
    inputs = prompt_inputs(model, video, sampling, sampling.prompts[0], sampling.seeds[0])
    x = inputs.noise.to(model.device, model.dtype)
    x = torch.cat([x, x]) if inputs.cfg else x
    t = model.family.set_timesteps(model.scheduler, sampling.steps, model.device)[0]
    return model.family.model_inputs(x, t, inputs.cond, model.family.static_inputs(model, video, sampling))


StepHook = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step, timestep, latents after the step)


@torch.no_grad()
def denoise(model: LoadedModel, video: VideoSpec, sampling: SamplingSpec, inputs: SampleInputs,
            transformer: Callable | None = None, on_step: StepHook | None = None) -> torch.Tensor:
    """Run all steps from the noise; returns the final latents (float32, family layout)."""
    family, scheduler = model.family, model.scheduler
    transformer = transformer or model.transformer
    timesteps = family.set_timesteps(scheduler, sampling.steps, model.device)
    static = family.static_inputs(model, video, sampling)
    latents = inputs.noise.to(model.device) * getattr(scheduler, "init_noise_sigma", 1.0)
    if family.latents_in_model_dtype:
        latents = latents.to(model.dtype)
    state: dict = {"timesteps": timesteps, "generator": inputs.generator()}
    for i, t in enumerate(timesteps):
        state["i"] = i
        x = torch.cat([latents, latents]) if inputs.cfg else latents
        if hasattr(scheduler, "scale_model_input"):
            x = scheduler.scale_model_input(x, t)
        kwargs = family.model_inputs(x.to(model.dtype), t, inputs.cond, static)
        pred = transformer(**kwargs)[0].float()
        if inputs.cfg:
            uncond, cond = pred.chunk(2)
            pred = uncond + sampling.guidance * (cond - uncond)
        latents = family.scheduler_step(scheduler, pred, t, latents, state)
        if family.latents_in_model_dtype:
            latents = latents.to(model.dtype)
        if on_step is not None:
            on_step(i, t, latents)
    return latents.float()
