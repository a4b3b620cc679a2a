"""Capture a family's transformer as a functional graph at static shapes (torch.export).

Under `parallel.ulysses: P` (one process a rank) the capture is this rank's program: the
rows split and gathered by diffusers' context-parallel hooks, its layout N / P rows.

`torch.export` at the config's shapes (batch 2 under CFG), then `run_decompositions({})`:
functionalisation with an empty decomposition table, so SDPA stays one node while in-place
writes (Wan's rotary `empty_like` + indexed stores) become functional `slice_scatter`s. A
graph that still mutates anything is refused (PASS-NOTES: classified by dataflow, an
in-place K-side write landed in a gathered copy and gave silently wrong numbers).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

import astraea.plugins  # noqa: F401  (registers astraea::token_mark)

from .errors import AstraeaError
from .families import LoadedModel, TokenLayout
from .sampling import first_step_kwargs
from .schema import RunConfig


class CaptureError(AstraeaError):
    """The model cannot be captured as a functional graph."""


@dataclass
class Captured:
    program: torch.export.ExportedProgram  # functional; parameters and buffers lifted as inputs
    example: dict  # the example call (transformer kwargs) it was captured at
    layout: TokenLayout


def _marker(model: LoadedModel):
    """mark(bound, i): block i's bound arguments with `hidden_states` through astraea::token_mark
    and each token-indexed table (the adapter's `token_tables`) through astraea::token_table."""
    tables = model.family.token_tables

    def table(value, dim):
        if isinstance(value, torch.Tensor):
            return torch.ops.astraea.token_table(value, dim)
        return type(value)(table(v, dim) for v in value) if isinstance(value, (tuple, list)) else value

    def mark(bound, index):
        bound.arguments["hidden_states"] = torch.ops.astraea.token_mark(bound.arguments["hidden_states"], index)
        for name, dim in tables.items():
            if bound.arguments.get(name) is not None:
                bound.arguments[name] = table(bound.arguments[name], dim)

    return mark


@contextmanager
def marked_token_streams(model: LoadedModel, ulysses: int = 1, cfg: bool = False) -> Iterator[int]:
    """While active, every block's `hidden_states` (the adapter's token stream) passes through
    astraea::token_mark(x, block index) and each of its token-indexed tables (the adapter's
    `token_tables`, e.g. rotary cos/sin) through astraea::token_table(t, dim); yields the
    number of blocks. The passes find token sources by these ops, never by sizes. With
    `ulysses` > 1 the transformer runs one rank's shard of the rows under diffusers' context
    parallelism (`sharded`), marked after the split."""
    blocks = [b for name in model.family.block_containers for b in getattr(model.transformer, name)]
    mark = _marker(model)
    if ulysses > 1:
        with sharded(model.transformer, ulysses, blocks, mark, cfg, model.family):
            yield len(blocks)
        return

    def hook(index):
        def pre(module, args, kwargs):
            bound = inspect.signature(module.forward).bind(*args, **kwargs)
            mark(bound, index)
            return bound.args, bound.kwargs

        return pre

    handles = [b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        yield len(blocks)
    finally:
        for h in handles:
            h.remove()


def _mark_hook(fn):
    """A diffusers ModelHook calling fn(bound arguments) before the block's forward: registered
    before the context-parallel hooks, it runs inside them, so under context parallelism the
    block's rows are already this rank's when capture marks them."""
    from diffusers.hooks import ModelHook

    class Mark(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
            fn(bound)
            return bound.args[1:], bound.kwargs

    return Mark()


@contextmanager
def sharded(transformer: torch.nn.Module, ulysses: int, blocks: list, mark, cfg: bool = False,
            family=None) -> Iterator[None]:
    """While active, `transformer` runs one rank's shard of the video rows: diffusers' context
    parallelism splits them where the model's plan says (before the first block, its rotary
    tables) and gathers them where it says (before the output projection); `mark(bound, i)`
    marks block i's bound arguments inside the split. Attention stays the model's own
    per-rank op: the rewrite's `shard_attention` pass makes it Ulysses' (our query-only op
    between two all-to-alls), which diffusers' dense attention backends cannot be."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.context_parallel import apply_context_parallel, remove_context_parallel

    from .parallel import cp_config, cp_plan

    plan = cp_plan(transformer, family)
    config = cp_config(ulysses, cfg)  # with cfg: this rank's CFG branch's group of ranks
    registries = []
    for i, block in enumerate(blocks):
        registry = HookRegistry.check_if_exists_or_initialize(block)
        registry.register_hook(_mark_hook(lambda bound, i=i: mark(bound, i)), "astraea_token_mark")
        registries.append(registry)
    apply_context_parallel(transformer, config, plan)
    try:
        yield
    finally:
        remove_context_parallel(transformer, plan)
        for registry in registries:
            registry.remove_hook("astraea_token_mark")


def local_layout(layout, ulysses: int):
    """This rank's TokenLayout: N / P video rows (the split is along the token axis)."""
    if layout.video_tokens % ulysses:
        raise AstraeaError(f"parallel.ulysses: {layout.video_tokens} video tokens do not split into {ulysses} equal "
                           "shards: choose a degree that divides them")
    return dataclasses.replace(layout, video_tokens=layout.video_tokens // ulysses)


def capture(model: LoadedModel, cfg: RunConfig, example: dict | None = None) -> Captured:
    """The transformer as a functional ExportedProgram, each block's token stream marked,
    at the first step's inputs (or at `example`, e.g. one CFG branch)."""
    model.family.prepare_capture(model, cfg.video)
    example = example or first_step_kwargs(model, cfg.video, cfg.sampling)
    ulysses = cfg.parallel.ulysses
    try:
        with torch.no_grad(), marked_token_streams(model, ulysses, cfg.parallel.cfg):
            program = torch.export.export(model.transformer, (), example, strict=False).run_decompositions({})
    except AstraeaError:
        raise
    except Exception as e:  # export failures are long; the first line names the construct
        raise CaptureError(f"torch.export of the {cfg.model.family} transformer failed: {str(e).splitlines()[0]}") from e
    for node in program.graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable:
            raise CaptureError(f"the captured graph still mutates in place ({target} at {node.name}); "
                               "the token rewrite needs a functional graph")
    layout = model.layout(cfg.video)
    if ulysses > 1:
        layout = local_layout(layout, ulysses)
    return Captured(program, example, layout)
