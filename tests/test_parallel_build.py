"""Multi-rank builds and benchmarks on gloo processes (CPU), as torchrun starts them:
astraea-build with Ulysses and CFG parallelism on every family, astraea-bench's dense on
diffusers' context parallelism. (The ops and the rank programs: test_parallel.py.)"""

from __future__ import annotations

import pytest


def _build_rank(rank: int, world: int, port: int, runs: list, out: str):
    """One rank of `astraea-build` as torchrun starts it, for each (name, argv) of `runs` in turn
    (one process: torch is imported once)."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from astraea.cli import build_main

    for name, args in runs:
        code = build_main(args)
        with open(f"{out}/{name}-exit{rank}", "w") as fh:
            fh.write(str(code))


RANK_BUILDS = {  # world size: the (family, parallel) builds its ranks run
    2: [("wan", {"ulysses": 2}), ("cogvideox", {"cfg": True}), ("hunyuan_video", {"cfg": True}),
        ("opensora", {"cfg": True})],  # Wan's CFG axis: with Ulysses on 4 ranks
    4: [("wan", {"ulysses": 2, "cfg": True})],
}


@pytest.mark.parametrize("world", sorted(RANK_BUILDS))
def test_astraea_build_under_ranks(world, tmp_path):
    """astraea-build as torchrun starts it (RANK/WORLD_SIZE in the environment, gloo here), on
    every family with CFG parallelism and on Wan with Ulysses (2 ranks) and both (4 ranks): one
    search (its candidates over the ranks), each rank's engines in engines/rank<r> with the world
    size and mesh in its manifest, the check stage sampling through them on every rank at the
    search's PSNR (Ulysses: each rank half the rows; CFG parallelism: each group of ranks one
    guidance branch, the outputs exchanged); one process loading the folder, or a rank loading
    another's, is refused in one line."""
    import json
    import socket

    import torch.multiprocessing as mp
    import yaml

    from astraea import runtime
    from astraea.errors import EngineError
    from conftest import tiny_raw

    runs, expect = [], {}
    for family, parallel in RANK_BUILDS[world]:
        name = f"{family}-" + "-".join(f"{k}{v}" for k, v in parallel.items())
        video = {"frames": 17, "height": 32, "width": 32} if family == "opensora" else {}  # its VAE's 17k frames
        raw = tiny_raw(family, video=video, target={"budget": 0.5}, parallel=parallel, build={"backend": "eager"},
                       search={"levels": 3, "population": 3, "children": 2, "generations": 1})
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
        runs.append((name, [str(tmp_path / f"{name}.yaml"), "--out", str(tmp_path / name), "--quiet"]))
        expect[name] = family, parallel.get("ulysses", 1), parallel.get("cfg", False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_build_rank, args=(world, port, runs, str(tmp_path)), nprocs=world)
    for name, (family, ulysses, cfg) in expect.items():
        out = tmp_path / name
        assert [(tmp_path / f"{name}-exit{r}").read_text() for r in range(world)] == ["0"] * world, name
        for rank in range(world):
            manifest = json.loads((out / "engines" / f"rank{rank}" / "manifest.json").read_text())
            assert manifest["build"]["parallel"] == {"ulysses": ulysses, "cfg": cfg, "rank": rank, "world_size": world,
                                                     "mesh": {**({"cfg": 2} if cfg else {}), "ring": 1,
                                                              "ulysses": ulysses}}, name
            assert manifest["state"][1]["shape"][0] == 1 and manifest["per_branch"]  # a branch's block state
            if family == "wan":
                assert manifest["state"][1]["shape"][1] == 18 // ulysses  # this rank's rows
        (folder,) = (out / "search").iterdir()
        schedule = json.loads((folder / "schedule.json").read_text())
        check = json.loads((out / "engines-check.json").read_text())
        assert check["psnr"] == pytest.approx(schedule["per_sample"]["p0_s0"]["psnr"], abs=1e-3), name
    out = tmp_path / runs[0][0]
    with pytest.raises(EngineError, match=rf"for {world} ranks .* has 1: run under `torchrun --nproc-per-node {world}`"):
        runtime.load(out / "engines", device="cpu")
    with pytest.raises(EngineError, match=f"rank 1 of {world}'s engines, not rank 0 of 1's"):
        runtime.load(out / "engines" / "rank1", device="cpu")
