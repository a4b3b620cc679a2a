"""The token-wise form of a transformer: rewritten programs per budget and a callable that
runs a per-step schedule of them in the family's sampling loop.

`rewrite(model, cfg, k)` captures the transformer (capture.py) and runs the pass pipeline
(astraea.passes) at budget k. `TokenwiseTransformer` owns the per-block state across
steps, runs step i at `schedule[i]` rows (the first step dense; budget 0 reuses the last
output without running anything) and is called like the diffusers transformer, so
`sampling.denoise(..., transformer=...)` samples with it. Engines (backends) wrap the same
programs later.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx

from .capture import Captured, capture
from .config import RunConfig
from .families import LoadedModel


@dataclass
class TokenwiseProgram:
    program: torch.export.ExportedProgram  # the captured original (its flat-input convention)
    graph: fx.GraphModule  # rewritten: flat inputs + per-block state in, output + new state out
    budget: int
    blocks: int
    stats: dict

    def flat_inputs(self, kwargs: dict) -> list:
        return list(self.program._graph_module_flat_inputs((), kwargs))


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of gm's graph (node metadata copied one level deep), so
    the passes can rewrite one capture at several budgets."""
    graph = fx.Graph()
    value = graph.graph_copy(gm.graph, {})
    graph.output(value).meta = dict(next(n for n in reversed(gm.graph.nodes) if n.op == "output").meta)
    graph._codegen = gm.graph._codegen
    return fx.GraphModule(gm, graph)


def rewrite(model: LoadedModel, cfg: RunConfig, budget: int, dump_dir: Path | None = None,
            captured: Captured | None = None) -> TokenwiseProgram:
    """The token-wise program at `budget` rows; pass `captured` (capture(model, cfg)) to rewrite
    one capture at several budgets without exporting again."""
    from astraea.passes import pipeline

    cap = captured or capture(model, cfg)
    gm = copy_graph_module(cap.program.graph_module) if captured else cap.program.graph_module
    sel = cfg.selection
    ctx = pipeline.PassContext(model.family, cap.layout, dump_dir=dump_dir, budget=budget, w_beta=sel.w_beta,
                               sketch_dim=sel.sketch_dim if sel.delta == "sketch" else 0,
                               cache_dtype=torch.float8_e4m3fn if sel.cache == "float8" else None)
    pipeline.run(gm, ctx)
    return TokenwiseProgram(cap.program, gm, budget, len(ctx.blocks), ctx.stats)


class TokenwiseTransformer:
    """Runs `schedule[step]` rows per block at each call; owns the block state."""

    def __init__(self, programs: dict[int, TokenwiseProgram], schedule: list[int]):
        if not schedule or schedule[0] != max(programs):
            raise ValueError("the first step must be dense (budget N): the caches are empty before it")
        missing = {k for k in schedule if k} - set(programs)
        if missing:
            raise ValueError(f"no program for budgets {sorted(missing)}")
        self.programs, self.schedule = programs, schedule
        self.step, self.state, self.last = 0, None, None

    def reset(self) -> None:
        self.step, self.state, self.last = 0, None, None

    def snapshot(self) -> tuple:
        """A copy of where the schedule stands (step, block state, last output)."""
        clone = lambda t: None if t is None else t.clone()  # noqa: E731
        return self.step, None if self.state is None else [t.clone() for t in self.state], clone(self.last)

    def restore(self, snap: tuple) -> None:
        step, state, last = snap
        self.step, self.last = step, None if last is None else last.clone()
        self.state = None if state is None else [t.clone() for t in state]

    @staticmethod
    def snapshot_bytes(snap: tuple) -> int:
        _, state, last = snap
        tensors = (state or []) + ([last] if last is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.no_grad()
    def __call__(self, **kwargs):
        k = self.schedule[self.step]
        self.step += 1
        if k == 0:
            return (self.last,)
        tp = self.programs[k]
        flat = tp.flat_inputs(kwargs)
        if self.state is None:
            self.state = self._empty_state(tp, flat)
        out = tp.graph(*flat, *self.state)
        self.last, self.state = out[0], list(out[1:])
        return (self.last,)

    @staticmethod
    def _empty_state(tp: TokenwiseProgram, flat: list) -> list[torch.Tensor]:
        state_inputs = [n for n in tp.graph.graph.nodes if n.op == "placeholder"][len(flat):]
        device = next(t.device for t in flat if isinstance(t, torch.Tensor))
        return [torch.zeros(n.meta["val"].shape, dtype=n.meta["val"].dtype, device=device) for n in state_inputs]
