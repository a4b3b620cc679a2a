"""Capture a family's transformer as a functional graph at static shapes (torch.export).

`torch.export` at the config's shapes (batch 2 under CFG), then `run_decompositions({})`:
functionalisation with an empty decomposition table, so SDPA stays one node while in-place
writes (Wan's rotary `empty_like` + indexed stores) become functional `slice_scatter`s. A
graph that still mutates anything is refused (PASS-NOTES: classified by dataflow, an
in-place K-side write landed in a gathered copy and gave silently wrong numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .conditioning import encode_prompt
from .config import RunConfig
from .errors import AstraeaError
from .families import LoadedModel, TokenLayout
from .sampling import make_inputs


class CaptureError(AstraeaError):
    """The model cannot be captured as a functional graph."""


@dataclass
class Captured:
    program: torch.export.ExportedProgram  # functional; parameters and buffers lifted as inputs
    example: dict  # the example call (transformer kwargs) it was captured at
    layout: TokenLayout


def example_inputs(model: LoadedModel, cfg: RunConfig) -> dict:
    """The transformer's kwargs of the first denoising step of the first prompt and seed."""
    s = cfg.sampling
    inputs = make_inputs(model, cfg.video, s, encode_prompt(model, s.prompts[0], None),
                         encode_prompt(model, s.negative_prompt, None), s.seeds[0])
    x = inputs.noise.to(model.device, model.dtype)
    x = torch.cat([x, x]) if inputs.cfg else x
    t = model.family.set_timesteps(model.scheduler, s.steps, model.device)[0]
    return model.family.model_inputs(x, t, inputs.cond, model.family.static_inputs(model, cfg.video, s))


def capture(model: LoadedModel, cfg: RunConfig) -> Captured:
    model.family.prepare_capture(model, cfg.video)
    example = example_inputs(model, cfg)
    try:
        with torch.no_grad():
            program = torch.export.export(model.transformer, (), example, strict=False).run_decompositions({})
    except Exception as e:  # export failures are long; the first line names the construct
        raise CaptureError(f"torch.export of the {cfg.model.family} transformer failed: {str(e).splitlines()[0]}") from e
    for node in program.graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable:
            raise CaptureError(f"the captured graph still mutates in place ({target} at {node.name}); "
                               "the token rewrite needs a functional graph")
    return Captured(program, example, model.layout(cfg.video))
