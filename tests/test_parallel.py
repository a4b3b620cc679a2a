"""Sequence parallelism on gloo processes (CPU): Ulysses' all-to-all around
astraea::sparse_attention gives each rank what one process holding every rank's rows
computes (2 and 4 ranks, with and without a key mask)."""

from __future__ import annotations

import pytest
import torch

B, H, M, N, D = 2, 4, 3, 5, 16  # a rank's selected rows M and shard N


def _inputs(world: int):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, world * M, D, generator=g)
    k = torch.randn(B, H, world * N, D, generator=g)
    v = torch.randn(B, H, world * N, D, generator=g)
    mask = torch.rand(B, world * N, generator=g) > 0.3
    mask[:, 0] = True
    return q, k, v, mask


TEXT = (2, 3)  # text rows before and after the video rows (joint attention)


def _text():
    """Text rows' q, k, v (B, H, T, D) and key mask (B, T)."""
    g = torch.Generator().manual_seed(1)
    t = sum(TEXT)
    qt, kt, vt = (torch.randn(B, H, t, D, generator=g) for _ in range(3))
    mt = torch.rand(B, t, generator=g) > 0.4
    return qt, kt, vt, mt


def _joined(text: torch.Tensor, video: torch.Tensor, dim: int) -> torch.Tensor:
    """[text before; video; text after] along the row dimension `dim`."""
    before, after = text.split(TEXT, dim=dim)
    return torch.cat([before, video, after], dim=dim)


def _worker(rank: int, world: int, init: str, out: str):
    import torch.distributed as dist

    from astraea.parallel import ulysses_sparse_attention

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        q, k, v, mask = _inputs(world)
        rows, shard = slice(rank * M, (rank + 1) * M), slice(rank * N, (rank + 1) * N)
        got = {}
        for masked in (False, True):
            o, lse = ulysses_sparse_attention(q[:, :, rows], k[:, :, shard], v[:, :, shard],
                                              mask[:, shard] if masked else None)
            got[masked] = (o, lse)
            # joint attention: text rows (the same on every rank) before and after this rank's video rows
            t = _text()
            mine = (q[:, :, rows], k[:, :, shard], v[:, :, shard])
            o, lse = ulysses_sparse_attention(*(_joined(a, b, 2) for a, b in zip(t, mine)),
                                              _joined(t[3], mask[:, shard], 1) if masked else None,
                                              before=TEXT[0], after=TEXT[1])
            got["joint", masked] = (o, lse)
        torch.save(got, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_attention_is_the_one_process_attention(world, tmp_path):
    import torch.multiprocessing as mp

    import astraea.plugins  # noqa: F401

    mp.spawn(_worker, args=(world, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=world)
    q, k, v, mask = _inputs(world)
    for masked in (False, True):
        want, want_lse = torch.ops.astraea.sparse_attention(q, k, v, mask if masked else None, None)
        for rank in range(world):
            o, lse = torch.load(tmp_path / f"rank{rank}.pt")[masked]
            rows = slice(rank * M, (rank + 1) * M)
            torch.testing.assert_close(o, want[:, :, rows], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lse, want_lse[:, :, rows], atol=1e-5, rtol=1e-5)
        t = _text()  # joint: one process over [text before; every rank's video; text after]
        want, want_lse = torch.ops.astraea.sparse_attention(
            *(_joined(a, b, 2) for a, b in zip(t, (q, k, v))), _joined(t[3], mask, 1) if masked else None, None)
        for rank in range(world):
            o, lse = torch.load(tmp_path / f"rank{rank}.pt")["joint", masked]
            rows = [*range(TEXT[0]), *(TEXT[0] + rank * M + i for i in range(M)),
                    *range(TEXT[0] + world * M, TEXT[0] + world * M + TEXT[1])]
            torch.testing.assert_close(o, want[:, :, rows], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lse, want_lse[:, :, rows], atol=1e-5, rtol=1e-5)


def test_one_process_is_the_op_and_odd_heads_are_refused(monkeypatch):
    import astraea.parallel as par

    q, k, v, mask = _inputs(1)
    out, lse = par.ulysses_sparse_attention(q, k, v, mask)
    want, want_lse = torch.ops.astraea.sparse_attention(q, k, v, mask, None)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    monkeypatch.setattr(par, "world", lambda group=None: (0, 3))
    with pytest.raises(ValueError, match=r"heads \(4\) divisible by the ranks \(3\)"):
        par.ulysses_sparse_attention(q, k, v)


def test_parallel_keys_are_validated():
    from astraea.errors import ConfigError
    from conftest import tiny_config

    cfg = tiny_config("wan", "tiny", parallel={"ulysses": 2})
    assert cfg.selection.shards == 2  # the one-process programs (the search's) select as the ranks do
    for sections, key in (({"parallel": {"ring": 2}}, "parallel.ring"), ({"parallel": {"cfg": True}, "sampling": {"guidance": 1.0}}, "parallel.cfg"),
                          ({"parallel": {"ulysses": 2}, "selection": {"shards": 3}}, "selection.shards"),
                          ({"parallel": {"ulysses": 2}, "build": {"backend": "tensorrt"}}, "build.backend"),
                          ({"parallel": {"ulysses": 0}}, "parallel.ulysses")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            tiny_config("wan", "tiny", **sections)


def test_a_rank_program_needs_its_world_and_a_context_parallel_plan(monkeypatch):
    """Outside torchrun (one process) a parallel.ulysses 2 capture names the command; a model
    without a context-parallel plan (none in diffusers, none in its adapter) is refused in one
    line."""
    from astraea import loader
    from astraea.capture import capture
    from astraea.errors import AstraeaError
    from conftest import tiny_config

    cfg = tiny_config("wan", "tiny", parallel={"ulysses": 2})
    model = loader.load_model(cfg)
    with pytest.raises(AstraeaError, match="torchrun --nproc-per-node 2"):
        capture(model, cfg)
    monkeypatch.setattr(type(model.transformer), "_cp_plan", None)  # a diffusers model without one
    with pytest.raises(AstraeaError, match="no context-parallel plan"):
        capture(model, cfg)
