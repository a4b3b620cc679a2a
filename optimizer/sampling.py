"""The denoising loop every stage shares: the family's scheduler, CFG as one batch of two.

`denoise` takes any transformer-shaped callable, so the dense reference, the search's
rewritten graphs and the compiled engines all run through the same loop. `Sampler` is the
same loop a step at a time, over a `Trajectory` that can be copied mid-way.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .conditioning import encode_prompt
from .families import Conditioning, LoadedModel
from .schema import SamplingSpec, VideoSpec


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


def batch_inputs(parts: list[SampleInputs]) -> SampleInputs:
    """Several samples as one batch: noise stacked, under CFG the conditioning ordered
    [negatives..., prompts...] so the loop's chunk(2) splits the branches. For deterministic
    schedulers only (the batch keeps the first sample's generator)."""
    noise = torch.cat([p.noise for p in parts])
    if parts[0].cfg:
        cond = Conditioning.cat([p.cond.rows(0, 1) for p in parts] + [p.cond.rows(1, 2) for p in parts])
    else:
        cond = Conditioning.cat([p.cond for p in parts])
    return SampleInputs(noise, cond, parts[0].cfg, parts[0].rng_state)


def prompt_inputs(model: LoadedModel, video: VideoSpec, sampling: SamplingSpec, prompt: str, seed: int,
                  cache_dir=None) -> SampleInputs:
    """One prompt and seed: the prompt and the config's negative prompt encoded, the noise drawn."""
    return make_inputs(model, video, sampling, encode_prompt(model, prompt, cache_dir),
                       encode_prompt(model, sampling.negative_prompt, cache_dir), seed)


def timesteps(model: LoadedModel, steps: int) -> list[float]:
    """The scheduler's timesteps for `steps` steps (a copy of it: the model's stays where it is)."""
    return [float(t) for t in model.family.set_timesteps(copy.deepcopy(model.scheduler), steps, "cpu")]


def first_step_kwargs(model: LoadedModel, video: VideoSpec, sampling: SamplingSpec,
                      inputs: SampleInputs | None = None) -> dict:
    """The transformer's kwargs at the first denoising step of the first prompt and seed, or
    of `inputs` (what benchmarks time and what the graph is captured at)."""
    inputs = inputs or prompt_inputs(model, video, sampling, sampling.prompts[0], sampling.seeds[0])
    x = inputs.noise.to(model.device, model.dtype)
    x = torch.cat([x, x]) if inputs.cfg else x
    t = model.family.set_timesteps(model.scheduler, sampling.steps, model.device)[0]
    return model.family.model_inputs(x, t, inputs.cond, model.family.static_inputs(model, video, sampling))


StepHook = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step, timestep, latents after the step)


@dataclass
class Trajectory:
    """Where one sample stands between steps: enough to continue it, or to copy it and
    continue the copy differently (the budget search's shared schedule prefixes)."""

    step: int  # steps done
    latents: torch.Tensor
    scheduler: object  # this trajectory's own scheduler (multistep schedulers keep history)
    extra: dict  # the family's scheduler_step state (e.g. CogVideoX DPM's old prediction)
    rng_state: torch.Tensor  # the sample's CPU generator (stochastic schedulers)

    def copy(self) -> Trajectory:
        extra = {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in self.extra.items()}
        return Trajectory(self.step, self.latents.clone(), copy.deepcopy(self.scheduler), extra, self.rng_state.clone())


class Sampler:
    """The denoising loop of one sample, a step at a time (`denoise` runs it to the end)."""

    def __init__(self, model: LoadedModel, video: VideoSpec, sampling: SamplingSpec, inputs: SampleInputs):
        self.model, self.sampling, self.inputs = model, sampling, inputs
        self.timesteps = model.family.set_timesteps(model.scheduler, sampling.steps, model.device)
        self.static = model.family.static_inputs(model, video, sampling)

    def start(self) -> Trajectory:
        model = self.model
        scheduler = copy.deepcopy(model.scheduler)  # set_timesteps above: fresh, positioned at step 0
        latents = self.inputs.noise.to(model.device) * getattr(scheduler, "init_noise_sigma", 1.0)
        if model.family.latents_in_model_dtype:
            latents = latents.to(model.dtype)
        return Trajectory(0, latents, scheduler, {}, self.inputs.rng_state.clone())

    def advance(self, traj: Trajectory, transformer: Callable, on_step: StepHook | None = None) -> Trajectory:
        """One step of `traj`, in place: the transformer call, CFG, the scheduler step."""
        model, family, inputs = self.model, self.model.family, self.inputs
        i, t = traj.step, self.timesteps[traj.step]
        latents = traj.latents
        x = torch.cat([latents, latents]) if inputs.cfg else latents
        if hasattr(traj.scheduler, "scale_model_input"):
            x = traj.scheduler.scale_model_input(x, t)
        kwargs = family.model_inputs(x.to(model.dtype), t, inputs.cond, self.static)
        pred = transformer(**kwargs)[0].float()
        if inputs.cfg:
            uncond, cond = pred.chunk(2)
            pred = uncond + self.sampling.guidance * (cond - uncond)
        generator = torch.Generator()
        generator.set_state(traj.rng_state)
        state = {**traj.extra, "i": i, "timesteps": self.timesteps, "generator": generator}
        latents = family.scheduler_step(traj.scheduler, pred, t, latents, state)
        if family.latents_in_model_dtype:
            latents = latents.to(model.dtype)
        traj.extra = {k: v for k, v in state.items() if k not in ("i", "timesteps", "generator")}
        traj.rng_state, traj.latents, traj.step = generator.get_state(), latents, i + 1
        if on_step is not None:
            on_step(i, t, latents)
        return traj


@torch.no_grad()
def denoise(model: LoadedModel, video: VideoSpec, sampling: SamplingSpec, inputs: SampleInputs,
            transformer: Callable | None = None, on_step: StepHook | None = None) -> torch.Tensor:
    """Run all steps from the noise; returns the final latents (float32, family layout)."""
    sampler = Sampler(model, video, sampling, inputs)
    traj = sampler.start()
    for _ in range(sampling.steps):
        sampler.advance(traj, transformer or model.transformer, on_step)
    return traj.latents.float()
