"""The token-wise form of a transformer: rewritten programs per budget and a callable that
runs a per-step schedule of them in the family's sampling loop.

`rewrite(model, cfg, k)` captures the transformer (capture.py) and runs the pass pipeline
(astraea.passes) at budget k. `TokenwiseTransformer` owns the per-block state across
steps, runs step i at `schedule[i]` rows (the first step dense; budget 0 reuses the last
output without running anything) and is called like the diffusers transformer, so
`sampling.denoise(..., transformer=...)` samples with it. `build_programs` rewrites one
capture at every budget a schedule or search needs. `TensorStep` is a program with its
non-tensor inputs bound, the function of tensors that engines (backends) export.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from .capture import Captured, capture
from .families import LoadedModel
from .manifest import TensorSpec
from .schema import RunConfig

log = logging.getLogger("astraea")

EXPORTED = torch.export.graph_signature.InputKind


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

    from .parallel import ulysses_group

    cap = captured or capture(model, cfg)
    gm = copy_graph_module(cap.program.graph_module) if captured else cap.program.graph_module
    sel, ranks = cfg.selection, cfg.parallel.ulysses
    # under sequence parallelism a rank's program holds N / P rows and selects its ceil(k / P) among
    # them; one process selecting in P shards takes as many a shard (what the ranks will run)
    per_shard = -(-budget // (ranks if ranks > 1 else sel.shards))
    local = min(cap.layout.video_tokens, per_shard if ranks > 1 else per_shard * sel.shards)
    ctx = pipeline.PassContext(model.family, cap.layout, dump_dir=dump_dir, budget=local, w_beta=sel.w_beta,
                               sketch_dim=sel.sketch_dim if sel.delta == "sketch" else 0,
                               cache_dtype=torch.float8_e4m3fn if sel.cache == "float8" else None,
                               shards=1 if ranks > 1 else sel.shards, ulysses=ranks,
                               ulysses_group=ulysses_group(ranks, cfg.parallel.cfg) if ranks > 1 else None)
    pipeline.run(gm, ctx)
    return TokenwiseProgram(cap.program, gm, budget, len(ctx.blocks), ctx.stats)


def build_programs(model: LoadedModel, cfg: RunConfig, tokens: list[int], progress: bool = True,
                   dump_root: Path | None = None, example: dict | None = None) -> dict[int, TokenwiseProgram]:
    """One rewritten program per distinct non-zero row count, from a single capture
    (`dump_root`: every pass's graphs under <dump_root>/k<k>-passes; `example`: capture
    at these transformer inputs instead of the first step's)."""
    t0 = time.perf_counter()
    cap = capture(model, cfg, example)
    t1 = time.perf_counter()
    wanted = sorted({k for k in tokens if k > 0})
    programs = {k: rewrite(model, cfg, k, captured=cap, dump_dir=None if dump_root is None else dump_root / f"k{k}-passes")
                for k in tqdm(wanted, desc="rewrite", unit="budget", disable=not progress, leave=False)}
    log.debug("programs: capture %.1f s, %d rewrite(s) %.1f s", t1 - t0, len(wanted), time.perf_counter() - t1)
    return programs


def compiled(programs: dict[int, TokenwiseProgram]) -> dict[int, TokenwiseProgram]:
    """The same programs with their graphs compiled by torch.compile (Inductor, static shapes)
    at their first call; the programs' other attributes and the GraphModule's are kept."""
    return {k: dataclasses.replace(tp, graph=torch.compile(tp.graph, dynamic=False)) for k, tp in programs.items()}


def graphed(programs: dict[int, TokenwiseProgram]) -> dict[int, TokenwiseProgram]:
    """The same programs replayed as CUDA graphs (`GraphReplay`), their captures in one memory pool."""
    pool = torch.cuda.graph_pool_handle()
    return {k: dataclasses.replace(tp, graph=GraphReplay(tp.graph, pool)) for k, tp in programs.items()}


class GraphReplay:
    """A program's graph as CUDA graphs, one an input signature (shapes, dtypes, non-tensor
    values): the first call runs eagerly (warm-up: Triton autotuning, cuDNN plans), the
    second captures, every later call copies its tensors into the capture's inputs and
    replays. Tensors passed at the same address on both first calls (the weights) are used
    in place, not copied (the same tensor object at the same address); a later call that
    passes another address there runs eagerly. The outputs are copied
    out, as the next replay overwrites the capture's own. Attributes other than the call are
    the wrapped graph's (`.graph.nodes`)."""

    def __init__(self, fn, pool):
        self.fn, self.pool = fn, pool
        self.captures: dict[tuple, tuple] = {}  # signature -> ("warm", ids, addresses) | (graph, inputs, fixed, outputs)
        self.replays = 0

    def __getattr__(self, name):
        return getattr(self.__dict__["fn"], name)

    def __call__(self, *args):
        sig = tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else ("value", repr(a))
                    for a in args)
        where = [a.data_ptr() if isinstance(a, torch.Tensor) else None for a in args]
        entry = self.captures.get(sig)
        if entry is None:
            self.captures[sig] = ("warm", [id(a) for a in args], where)
            return self.fn(*args)
        if entry[0] == "warm":
            _, ids, first = entry
            same = [w is not None and w == f and id(a) == i for a, w, f, i in zip(args, where, first, ids)]
            entry = self.captures[sig] = self._capture(args, same)
        graph, inputs, fixed, outputs = entry
        if any(f is not None and f != w for f, w in zip(fixed, where)):
            return self.fn(*args)
        for static, a in zip(inputs, args):
            if static is not None:
                static.copy_(a)
        graph.replay()
        self.replays += 1
        return tuple(o.clone() for o in outputs)

    def _capture(self, args, same: list[bool]) -> tuple:
        from .errors import AstraeaError

        inputs = [a.clone() if isinstance(a, torch.Tensor) and not keep else None for a, keep in zip(args, same)]
        fixed = [a.data_ptr() if keep else None for a, keep in zip(args, same)]
        call = [a if s is None else s for s, a in zip(inputs, args)]
        try:
            graph, out = self._record(call)
        except RuntimeError as e:
            raise AstraeaError(f"search.cuda_graphs: a fitness program cannot be captured as a CUDA graph "
                               f"({str(e).splitlines()[0]}): turn search.cuda_graphs off") from None
        return graph, inputs, fixed, tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def _record(self, call: list) -> tuple:
        """(a CUDA graph of fn(*call), its outputs): a warm-up on a side stream, then the capture."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.fn(*call)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(*call)
        return graph, out


@dataclass(frozen=True)
class Signature:
    """A rewritten program as a function of tensors: (weights..., tensor inputs..., block
    state...) in this order; `layout` rebinds the program's flat inputs from them (("t",
    None) takes the next tensor, ("c", value) a constant bound at export)."""

    weights: tuple[str, ...]  # state-dict names, in the program's order
    inputs: tuple[TensorSpec, ...]  # the transformer's tensor inputs
    constants: dict  # its non-tensor inputs, by name
    layout: tuple
    state: tuple[TensorSpec, ...]


def signature(tp: TokenwiseProgram, kwargs: dict) -> Signature:
    ep = tp.program
    flat = tp.flat_inputs(kwargs)
    weights, inputs, constants, layout = [], [], {}, []
    for spec, value in zip(ep.graph_signature.input_specs, flat):
        if spec.kind == EXPORTED.USER_INPUT:
            if isinstance(value, torch.Tensor):
                inputs.append(TensorSpec(tuple(value.shape), str(value.dtype).split(".")[1], spec.arg.name))
                layout.append(("t", None))
            else:
                constants[spec.arg.name] = value
                layout.append(("c", value))
        else:
            weights.append(spec.target)
            layout.append(("t", None))
    state = [n.meta["val"] for n in tp.graph.graph.nodes if n.op == "placeholder"][len(flat):]
    return Signature(tuple(weights), tuple(inputs), constants, tuple(layout),
                     tuple(TensorSpec(tuple(v.shape), str(v.dtype).split(".")[1]) for v in state))


def weight_tensors(tp: TokenwiseProgram, names) -> dict[str, torch.Tensor]:
    ep = tp.program
    return {n: (ep.state_dict[n] if n in ep.state_dict else ep.constants[n]) for n in names}


class TensorStep(torch.nn.Module):
    """A rewritten GraphModule with its non-tensor inputs bound: tensors in, tensors out.

    in_place: the new block state is copied back into the state inputs and only the output
    is returned; Inductor and AOTInductor then write the selected rows straight into the
    caller's buffers (write_cache.py), so a step holds the state once. Otherwise the new
    state is returned after the output (the functional pair, for backends such as TensorRT
    that double-buffer)."""

    def __init__(self, graph: fx.GraphModule, layout: list, in_place: bool = True):
        super().__init__()
        self.graph_module, self.layout, self.in_place = graph, layout, in_place  # layout: ("t", None) or ("c", value)

    def forward(self, *tensors):
        it = iter(tensors)
        args = [next(it) if kind == "t" else value for kind, value in self.layout]
        state = list(it)
        out = self.graph_module(*args, *state)
        if not self.in_place:
            return tuple(out)
        for old, new in zip(state, out[1:], strict=True):
            old.copy_(new)
        return (out[0],)


class TokenwiseTransformer:
    """Runs `schedule[step]` rows per block at each call; owns the block state. With
    `precisions` (one a step, "model" or "fp8") a step marked fp8 runs `fp8`'s program of its
    row count instead: the FP8 model's, whose block state is the same tensors (its Linear
    layers alone differ), so the steps of both share one state."""

    def __init__(self, programs: dict[int, TokenwiseProgram], schedule: list[int],
                 precisions: list[str] | None = None, fp8: dict[int, TokenwiseProgram] | None = None):
        if not schedule or schedule[0] != max(programs):
            raise ValueError("the first step must be dense (budget N): the caches are empty before it")
        if precisions is not None and len(precisions) != len(schedule):
            raise ValueError(f"{len(precisions)} precisions for {len(schedule)} steps")
        marked = precisions or ["model"] * len(schedule)
        for name, table in (("model", programs), ("fp8", fp8 or {})):
            missing = {k for k, p in zip(schedule, marked) if k and p == name} - set(table)
            if missing:
                raise ValueError(f"no {'' if name == 'model' else 'fp8 '}program for budgets {sorted(missing)}")
        self.programs, self.schedule, self.fp8, self.precisions = programs, schedule, fp8 or {}, marked
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
        k, precision = self.schedule[self.step], self.precisions[self.step]
        self.step += 1
        if k == 0:
            return (self.last,)
        tp = (self.fp8 if precision == "fp8" else self.programs)[k]
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
