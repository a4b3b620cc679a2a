"""Sequence parallelism for the token-wise step: the video rows in P contiguous shards, one a
rank (torch.distributed; NCCL on GPUs, gloo on CPUs), and query-only attention over all
rows by Ulysses' all-to-all (DeepSpeed-Ulysses, as diffusers' context parallelism does for
dense attention) around `astraea::sparse_attention`.

In a sequence-parallel step each rank holds its shard of every block's input, cache and
state, selects its share of the step's rows among its own (`selection.shards`:
passes/insert_selection.py), and runs every row-local op on them; self-attention is the one
op that needs every rank's rows. `ulysses_sparse_attention` exchanges heads for rows: after
one all-to-all each rank holds H/P heads of every rank's selected queries and of all N keys
and values, runs the op, and a second all-to-all returns each rank its own queries' output
and LSE over all heads. Static per-step budgets give every rank the same number of
selected rows, so the exchanges are even.

    out, lse = ulysses_sparse_attention(q, k, v)    # q (B, H, m, D) this rank's selected rows;
                                                    # k, v (B, H, n, D) this rank's shard

Also the process group from torchrun's environment (`init_from_env`), the context-parallel
mesh diffusers' hooks and the engines' collectives use (`cp_config`), and the model's plan
(`cp_plan`). Runtime code: the engines call it; the capture of a rank's program is
`capture.sharded`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

import astraea.plugins  # noqa: F401  (registers the astraea ops)

from .errors import AstraeaError


def world(group=None) -> tuple[int, int]:
    """(rank, size) of `group`, (0, 1) without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def barrier() -> None:
    """Every rank waits for the others (nothing without torch.distributed or with one rank)."""
    if world()[1] > 1:
        dist.barrier()


def _group(group):
    """A process group from None (the world), a group or a group's name (what a graph stores)."""
    if group is None:
        return dist.group.WORLD
    if isinstance(group, str):
        from torch.distributed.distributed_c10d import _resolve_process_group

        return _resolve_process_group(group)
    return group


def _exchange(t: torch.Tensor, group) -> torch.Tensor:
    """all_to_all over dim 0 (P equal chunks): chunk j goes to rank j, chunk j of the result
    came from rank j. Functional collectives: a captured program keeps them as graph ops
    (Inductor and AOTInductor compile them; eager runs them on the process group)."""
    return funcol.wait_tensor(funcol.all_to_all_single(t.contiguous(), None, None, _group(group)))


def heads_to_rows(t: torch.Tensor, size: int, group) -> torch.Tensor:
    """(B, H, r, ...) this rank's rows, all heads -> (B, H / P, P r, ...) every rank's rows
    (in rank order), this rank's group of heads."""
    b, h, r, *rest = t.shape
    chunks = t.reshape(b, size, h // size, r, *rest).movedim(1, 0)  # (P, B, H/P, r, ...): group j to rank j
    got = _exchange(chunks, group)  # (P, B, H/P, r, ...): rank j's rows of my head group
    return got.movedim(0, 2).reshape(b, h // size, size * r, *rest)


def rows_to_heads(t: torch.Tensor, size: int, group) -> torch.Tensor:
    """The inverse of heads_to_rows: (B, H / P, P r, ...) -> (B, H, r, ...)."""
    b, hp, pr, *rest = t.shape
    r = pr // size
    chunks = t.reshape(b, hp, size, r, *rest).movedim(2, 0)  # (P, B, H/P, r, ...): rank j's rows to rank j
    got = _exchange(chunks, group)  # (P, B, H/P, r, ...): head group j of my rows
    return got.movedim(0, 1).reshape(b, size * hp, r, *rest)


def _check_heads(q: torch.Tensor, size: int) -> None:
    if q.shape[1] % size:
        raise ValueError(f"Ulysses sequence parallelism needs the heads ({q.shape[1]}) divisible by the ranks ({size})")


def _all_rows(q, k, v, group, size: int):
    """q, k, v with this rank's rows of all heads exchanged for H / P heads of every rank's rows."""
    _check_heads(q, size)
    return (heads_to_rows(t, size, group) for t in (q, k, v))


def _like(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The attention ops' contract: the output laid out like q (a graph views the permuted output)."""
    return out if out.stride() == q.stride() else torch.empty_like(q).copy_(out)


def _joint(q, k, v, key_mask, scale, group, size: int, before: int, after: int):
    """Ulysses with text rows beside the video rows (joint attention, every rank holding all of
    them): the video rows are exchanged, the text rows of this rank's heads taken as they are;
    the text rows' output gathered back over the heads, identical on every rank. A key mask
    (B, before + n + after): its video part gathered from every rank, its text part this
    rank's (the same on every rank)."""
    rank = dist.get_rank(group)
    hp = q.shape[1] // size
    heads = slice(rank * hp, (rank + 1) * hp)

    def joined(t):
        end = t.shape[2] - after
        return torch.cat([t[:, heads, :before], heads_to_rows(t[:, :, before:end], size, group), t[:, heads, end:]], 2)

    mask = None
    if key_mask is not None:
        end = key_mask.shape[1] - after
        parts = funcol.wait_tensor(funcol.all_gather_tensor(key_mask[:, before:end].contiguous(), 0, group))
        mask = torch.cat([key_mask[:, :before], *parts.chunk(size, dim=0), key_mask[:, end:]], dim=1)
    out, lse = torch.ops.astraea.sparse_attention(joined(q), joined(k), joined(v), mask, scale)
    rows = out.shape[2] - before - after  # every rank's selected video rows

    def back(t):
        parts = [t[:, :, :before], t[:, :, before + rows:]]
        text = [funcol.wait_tensor(funcol.all_gather_tensor(x.contiguous(), 1, group)) for x in parts]
        return torch.cat([text[0], rows_to_heads(t[:, :, before:before + rows], size, group), text[1]], 2)

    return _like(back(out), q), back(lse)


def ulysses_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
                             scale: float | None = None, group=None, before: int = 0,
                             after: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """astraea::sparse_attention over the rows of every rank: q (B, H, m, D) this rank's
    selected query rows (m equal on every rank), k, v (B, H, n, D) and key_mask (B, n) this
    rank's shard (n equal on every rank). Returns this rank's out (B, H, m, D) and lse
    (B, H, m), as one process holding every rank's rows would compute them."""
    group = _group(group)
    _, size = world(group)
    if size == 1:
        return torch.ops.astraea.sparse_attention(q, k, v, key_mask, scale)
    if before or after:  # joint attention: text rows (the same on every rank) beside this rank's video rows
        _check_heads(q, size)
        return _joint(q, k, v, key_mask, scale, group, size, before, after)
    qh, kh, vh = _all_rows(q, k, v, group, size)
    mask = None
    if key_mask is not None:
        parts = funcol.wait_tensor(funcol.all_gather_tensor(key_mask.contiguous(), 0, group))
        mask = torch.cat(parts.chunk(size, dim=0), dim=1)  # (P B, n) in rank order -> (B, P n)
    out, lse = torch.ops.astraea.sparse_attention(qh, kh, vh, mask, scale)
    return _like(rows_to_heads(out, size, group), q), rows_to_heads(lse, size, group)


def ulysses_factored_attention(q, k, v, frames: int, temporal: bool, group=None):
    """astraea::factored_attention over every rank's rows (all rows queries, the dense budget):
    q, k, v (B, H, n, D) this rank's contiguous shard; after the all-to-all each rank holds H / P
    heads of the whole token axis, where the frames and positions are whole."""
    group = _group(group)
    _, size = world(group)
    if size == 1:
        return torch.ops.astraea.factored_attention(q, k, v, frames, temporal)
    out, lse = torch.ops.astraea.factored_attention(*_all_rows(q, k, v, group, size), frames, temporal)
    return rows_to_heads(out, size, group), rows_to_heads(lse, size, group)


def ulysses_group_attention(q, k, v, index, frames: int, temporal: bool, group=None):
    """astraea::group_attention over every rank's rows: q (B, H, m, D) this rank's selected rows,
    `index` (B, m) their indices in its shard, k, v (B, H, n, D) the shard. Every rank's indices,
    moved to the whole axis (rank r's shard starts at r n), in rank order stay ascending."""
    group = _group(group)
    _, size = world(group)
    if size == 1:
        return torch.ops.astraea.group_attention(q, k, v, index, frames, temporal)
    n = k.shape[2]
    qh, kh, vh = _all_rows(q, k, v, group, size)
    ranks = funcol.wait_tensor(funcol.all_gather_tensor(index.contiguous(), 0, group))  # (P B, m)
    offsets = torch.arange(size, device=index.device).repeat_interleave(index.shape[0])[:, None] * n
    every = (ranks + offsets).view(size, *index.shape).movedim(0, 1).reshape(index.shape[0], -1)  # (B, P m)
    out, lse = torch.ops.astraea.group_attention(qh, kh, vh, every, frames, temporal)
    return _like(rows_to_heads(out, size, group), q), rows_to_heads(lse, size, group)


# --- Sequence-parallel programs: diffusers' context parallelism splits and gathers the rows ---

_MESHES: dict = {}  # (device type, ulysses, cfg) -> (ContextParallelConfig or None, the mesh)


def _mesh_key(ulysses: int, cfg: bool) -> tuple:
    return ("cuda" if torch.cuda.is_available() else "cpu", ulysses, cfg)


def cp_config(ulysses: int, cfg: bool = False):
    """diffusers' ContextParallelConfig for `ulysses` ranks, set up once a process (its mesh's
    process groups are created in the same order on every rank and in every process that runs
    the programs). With `cfg` the world is two groups of `ulysses` ranks, one a CFG branch: the
    mesh is (cfg 2, ring 1, ulysses P) and the config this rank's branch's sub-mesh."""
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    rank, size = world()
    want = ulysses * (2 if cfg else 1)
    if size != want:
        what = f"parallel.ulysses {ulysses}" + (" x 2 CFG branches" if cfg else "")
        raise AstraeaError(f"{what} needs {want} processes but this run has {size}: start it with "
                           f"`torchrun --nproc-per-node {want} ...`")
    key = _mesh_key(ulysses, cfg)
    device_type = key[0]
    if key not in _MESHES:
        shape, names = ((2, 1, ulysses), ("cfg", "ring", "ulysses")) if cfg else ((1, ulysses), ("ring", "ulysses"))
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
        device = torch.device(device_type, rank % max(1, torch.cuda.device_count())) if device_type == "cuda" \
            else torch.device("cpu")
        config = None
        if ulysses > 1:
            config = ContextParallelConfig(ulysses_degree=ulysses, mesh=mesh["ring", "ulysses"] if cfg else mesh)
            config.setup(rank % ulysses, ulysses, device, config.mesh)
        _MESHES[key] = (config, mesh)
    return _MESHES[key][0]


def ulysses_group(ulysses: int, cfg: bool = False) -> str | None:
    """The name of this rank's Ulysses process group (what a rank's program's collectives name)."""
    config = cp_config(ulysses, cfg)
    return None if config is None else config._flattened_mesh.get_group().group_name


def cfg_branch(ulysses: int) -> tuple[int, object]:
    """(this rank's CFG branch, the process group of the two ranks that hold the branches of its rows)."""
    cp_config(ulysses, True)
    mesh = _MESHES[_mesh_key(ulysses, True)][1]
    return mesh.get_local_rank("cfg"), mesh["cfg"].get_group()


def cp_plan(transformer: torch.nn.Module, family=None) -> dict:
    """The model's context-parallel plan (diffusers' `_cp_plan`: where the rows are split and
    gathered), else the family adapter's (`cp_plan()`, in diffusers' format); a one-line error
    for a model with neither."""
    plan = getattr(transformer, "_cp_plan", None) or (family.cp_plan() if family is not None else None)
    if not plan:
        raise AstraeaError(f"parallel.ulysses: {type(transformer).__name__} has no context-parallel plan (diffusers' "
                           "`_cp_plan` or its adapter's): set parallel.ulysses: 1")
    return plan


def init_from_env() -> int:
    """Under torchrun (WORLD_SIZE > 1 in the environment) the process group, NCCL on GPUs and
    gloo on CPUs, each rank on its local GPU; returns this rank (0 without torchrun)."""
    import atexit
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(dist.destroy_process_group)
    return dist.get_rank()


@contextmanager
def main_rank_first() -> Iterator[None]:
    """Rank 0 runs the block first, the other ranks after it (they find its files: the dense
    reference is computed once); a plain block without torch.distributed."""
    rank, size = world()
    if size > 1 and rank > 0:
        barrier()
    yield
    if size > 1 and rank == 0:
        barrier()
