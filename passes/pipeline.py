"""The pass pipeline: an explicit ordered list, each pass counting what it changed.

A pass is `verb_object(gm, ctx) -> dict[str, int]` (its counts). `run` lints the graph
after every pass, logs the counts, dumps the graph before and after each pass when
`ctx.dump_dir` is set, and turns any failure into a `PassError` naming the pass and those
that ran before it. Passes work on `gm.graph` (fake-tensor propagation interprets the graph),
so the Python code is generated once, after the last pass. Passes land one per file; this
list is the table of contents.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx

import astraea.plugins  # noqa: F401  (the astraea:: ops the passes match and insert, registered first)
from astraea.errors import AstraeaError
from astraea.families import Family, TokenLayout

from .annotate_blocks import annotate_blocks
from .classify_rows import classify_rows
from .cleanup import cleanup
from .gather_subset import gather_subset
from .insert_selection import insert_selection
from .replace_attention import replace_attention
from .shard_attention import shard_attention
from .write_cache import write_cache

log = logging.getLogger("astraea.passes")


@dataclass
class PassContext:
    family: Family
    layout: TokenLayout
    dump_dir: Path | None = None
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    budget: int | None = None  # k, the rows each block recomputes (the rewrite passes)
    w_beta: float = 0.5  # staleness weight of the selection score
    sketch_dim: int = 0  # Delta from a sketch of the block input with this many dims (0: the full input)
    cache_dtype: torch.dtype | None = None  # the cached block outputs' dtype (None: the stream's); float8 adds a scale a row
    shards: int = 1  # the video rows in this many contiguous shards, each selecting its share (sequence parallelism)
    ulysses: int = 1  # sequence-parallel ranks: the program is one rank's (layout and budget its share)
    ulysses_group: str | None = None  # their process group's name (None: the world)
    blocks: dict[str, dict] = field(default_factory=dict)  # per block: its mark, index and state nodes


Pass = Callable[[fx.GraphModule, PassContext], dict[str, int]]

PIPELINE: list[tuple[str, Pass]] = [
    ("annotate_blocks", annotate_blocks),
    ("classify_rows", classify_rows),  # Wan today; joint attention (offsets along the token axis) pending
    ("insert_selection", insert_selection),
    ("gather_subset", gather_subset),
    ("replace_attention", replace_attention),
    ("shard_attention", shard_attention),  # sequence parallelism: attention over every rank's rows
    ("write_cache", write_cache),
    ("cleanup", cleanup),
]


class PassError(AstraeaError):
    def __init__(self, name: str, before: list[str], error: Exception):
        self.pass_name = name
        ran = ", ".join(before) or "none"
        super().__init__(f"pass {name} failed (passes run before it: {ran}): {type(error).__name__}: {error}")


def _dump(gm: fx.GraphModule, ctx: PassContext, name: str) -> None:
    if ctx.dump_dir is not None:
        ctx.dump_dir.mkdir(parents=True, exist_ok=True)
        (ctx.dump_dir / f"{name}.txt").write_text(str(gm.graph))


def run(gm: fx.GraphModule, ctx: PassContext, passes: list[tuple[str, Pass]] | None = None) -> fx.GraphModule:
    done: list[str] = []
    for i, (name, fn) in enumerate(PIPELINE if passes is None else passes):
        _dump(gm, ctx, f"{i:02d}-{name}-before")
        try:
            counts = fn(gm, ctx)
            gm.graph.lint()
        except AstraeaError as e:
            raise PassError(name, done, e) from e
        except Exception as e:  # a bug in a pass: still named
            raise PassError(name, done, e) from e
        ctx.stats[name] = counts
        log.info("%s: %s", name, ", ".join(f"{k} {v}" for k, v in counts.items()) or "no change")
        _dump(gm, ctx, f"{i:02d}-{name}-after")
        done.append(name)
    gm.recompile()
    return gm
