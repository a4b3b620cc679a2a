"""Several ranks on gloo processes (CPU), as torchrun starts them, one spawn a world size (torch
imported once a process): the rank programs against one process, astraea-build with Ulysses
and CFG parallelism on every family, astraea-bench's dense on diffusers' context parallelism.
(The Ulysses op and the keys: test_parallel.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _programs(world: int, out: str) -> None:
    """This rank's programs captured under diffusers' context parallelism (parallel.ulysses),
    sampled dense and at half the rows; the gathered latents saved."""
    import torch.distributed as dist

    from astraea import loader
    from astraea.sampling import denoise, prompt_inputs
    from astraea.tokenwise import TokenwiseTransformer, build_programs
    from conftest import tiny_config

    cfg = tiny_config("wan", "tiny", parallel={"ulysses": world}, sampling={"steps": 4})
    model = loader.load_model(cfg)
    n = model.layout(cfg.video).video_tokens
    k = world * (n // (2 * world))  # about half, a multiple of the ranks: each selects k / P of its rows
    programs = build_programs(model, cfg, [n, k], progress=False)
    inputs = prompt_inputs(model, cfg.video, cfg.sampling, cfg.sampling.prompts[0], 0)
    got = {name: denoise(model, cfg.video, cfg.sampling, inputs, TokenwiseTransformer(programs, sched))
           for name, sched in (("dense", [n] * 4), ("half", [n] + [k] * 3))}
    got["stats"] = programs[k].stats
    torch.save(got, f"{out}/programs{dist.get_rank()}.pt")


def _bench(world: int, out: str) -> None:
    import torch.distributed as dist

    from astraea import bench, loader
    from conftest import tiny_config

    cfg = tiny_config("wan", "tiny", parallel={"ulysses": world}, bench={"warmup": 0, "repeats": 1},
                      build={"backend": "eager"})
    result = bench.run(cfg, loader.load_model(cfg), Path(out) / "bench-run",
                       methods=("dense", "dense-cp", "astraea", "peers"), progress=False)
    torch.save([(r["method"], r["setting"], r["psnr_latent"]) for r in result["rows"]],
               f"{out}/bench{dist.get_rank()}.pt")


def _rank(rank: int, world: int, port: int, runs: list, out: str):
    """One rank as torchrun starts it: the programs check and the bench (2 ranks), then
    `astraea-build` for each (name, argv) of `runs` in turn."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from astraea.cli import build_main
    from astraea.parallel import init_from_env

    init_from_env()
    # diffusers' enable_parallelism places rank r on accelerator r % device_count(): 0 on a CPU
    torch.accelerator.device_count = lambda: 1
    if world == 2:
        _programs(world, out)
        _bench(world, out)
    for name, args in runs:
        code = build_main(args)
        with open(f"{out}/{name}-exit{rank}", "w") as fh:
            fh.write(str(code))


RANK_BUILDS = {  # world size: the (family, parallel) builds its ranks run
    # Wan's CFG axis: with Ulysses on 4 ranks. HunyuanVideo: its text rows after the video rows, a key mask
    2: [("wan", {"ulysses": 2}), ("opensora", {"ulysses": 2}), ("cogvideox", {"ulysses": 2}),
        ("hunyuan_video", {"ulysses": 2})],
    # Open-Sora's CFG axis: the runtime's, as Wan's (with Ulysses on 4 ranks)
    4: [("wan", {"ulysses": 2, "cfg": True})],
}


def _check_programs(world: int, tmp_path: Path) -> None:
    """The two ranks' programs (each on half the rows, split and gathered by diffusers' hooks,
    attention by Ulysses' all-to-all around the query-only op) equal dense sampling at every
    row, and one process selecting per shard (selection.shards 2) at half the rows: the oracle
    where the selections agree."""
    from astraea import loader
    from astraea.sampling import denoise, prompt_inputs
    from astraea.tokenwise import TokenwiseTransformer, build_programs
    from conftest import tiny_config

    cfg = tiny_config("wan", "tiny", selection={"shards": world}, sampling={"steps": 4})
    model = loader.load_model(cfg)
    n = model.layout(cfg.video).video_tokens
    inputs = prompt_inputs(model, cfg.video, cfg.sampling, cfg.sampling.prompts[0], 0)
    dense = denoise(model, cfg.video, cfg.sampling, inputs)
    k = world * (n // (2 * world))
    programs = build_programs(model, cfg, [n, k], progress=False)
    half = denoise(model, cfg.video, cfg.sampling, inputs, TokenwiseTransformer(programs, [n] + [k] * 3))
    for rank in range(world):
        got = torch.load(tmp_path / f"programs{rank}.pt")
        assert got["stats"]["shard_attention"]["ulysses_attention"] == 2  # both blocks' self-attention
        torch.testing.assert_close(got["dense"], dense, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["half"], half, atol=1e-5, rtol=1e-5)
    assert (half - dense).abs().max() > 1e-4  # half the rows is not dense: the comparison can fail


def _check_bench(tmp_path: Path) -> None:
    """astraea-bench on two ranks: dense (one process each), then dense on diffusers' own context
    parallelism (enable_parallelism, Ulysses over the ranks), eager and compiled, equal to
    dense; one-GPU rows (astraea eager, peers) are left out; rank 0 writes the report."""
    rows = torch.load(tmp_path / "bench0.pt")
    assert [(m, s) for m, s, _ in rows] == [
        ("dense", "diffusers, eager"), ("dense-cp", "diffusers context parallelism, Ulysses 2, eager"),
        ("dense-cp", "diffusers context parallelism, Ulysses 2, torch.compile")]
    assert all(p > 80 for _, _, p in rows[1:]), rows  # the same computation, split over the ranks
    assert (tmp_path / "bench-run" / "bench" / "bench.json").is_file()


@pytest.mark.parametrize("world", sorted(RANK_BUILDS))
def test_ranks(world, tmp_path):
    """Two ranks: the programs and the bench (above), then astraea-build as torchrun starts it
    (RANK/WORLD_SIZE in the environment, gloo here), with Ulysses on Wan and Open-Sora (its
    factored attention) and CFG parallelism on CogVideoX (2 ranks), both on Wan (4 ranks): one
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
        preset = "tiny-rotary" if family == "cogvideox" else "tiny"  # CogVideoX: text rows first, rotary tables split
        video = {"frames": 17, "height": 32, "width": 32} if family == "opensora" else {}  # its VAE's 17k frames
        raw = tiny_raw(family, preset, video=video, target={"budget": 0.5}, parallel=parallel, build={"backend": "eager"},
                       search={"levels": 3, "population": 3, "children": 2, "generations": 1})
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
        runs.append((name, [str(tmp_path / f"{name}.yaml"), "--out", str(tmp_path / name), "--quiet"]))
        expect[name] = family, parallel.get("ulysses", 1), parallel.get("cfg", False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(world, port, runs, str(tmp_path)), nprocs=world)
    if world == 2:
        _check_programs(world, tmp_path)
        _check_bench(tmp_path)
    for name, (family, ulysses, cfg) in expect.items():
        out = tmp_path / name
        assert [(tmp_path / f"{name}-exit{r}").read_text() for r in range(world)] == ["0"] * world, name
        for rank in range(world):
            manifest = json.loads((out / "engines" / f"rank{rank}" / "manifest.json").read_text())
            assert manifest["build"]["parallel"] == {"ulysses": ulysses, "cfg": cfg, "rank": rank, "world_size": world,
                                                     "mesh": {**({"cfg": 2} if cfg else {}), "ring": 1,
                                                              "ulysses": ulysses}}, name
            per_branch = cfg or family in ("wan", "hunyuan_video")  # CFG parallelism, or the pipeline's convention
            assert manifest["per_branch"] == per_branch and manifest["state"][1]["shape"][0] == (1 if per_branch else 2)
            if family == "wan":
                assert manifest["state"][1]["shape"][1] == 18 // ulysses  # this rank's rows
        (folder,) = (out / "search").iterdir()
        schedule = json.loads((folder / "schedule.json").read_text())
        assert [s["budget"] for s in manifest["steps"]] == schedule["budget_per_step"], name
        check = json.loads((out / "engines-check.json").read_text())
        assert check["psnr"] == pytest.approx(schedule["per_sample"]["p0_s0"]["psnr"], abs=1e-3), name
        if family == "opensora":  # its factored attention, query-only below dense (the rewrite's line in the log)
            assert "4 blocks, 0 query-only attentions, 4 query-only factored each" in (out / "build.log").read_text()
    out = tmp_path / runs[0][0]
    with pytest.raises(EngineError, match=rf"for {world} ranks .* has 1: run under `torchrun --nproc-per-node {world}`"):
        runtime.load(out / "engines", device="cpu")
    with pytest.raises(EngineError, match=f"rank 1 of {world}'s engines, not rank 0 of 1's"):
        runtime.load(out / "engines" / "rank1", device="cpu")
