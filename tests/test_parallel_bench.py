"""astraea-bench on gloo processes (CPU), as torchrun starts it: dense on diffusers' own
context parallelism beside dense. (The builds: test_parallel_build.py.)"""

from __future__ import annotations

import torch


def _bench_rank(rank: int, world: int, init: str, out: str):
    import torch.distributed as dist

    from astraea import bench, loader
    from conftest import tiny_config

    # diffusers' enable_parallelism places rank r on accelerator r % device_count(): 0 on a CPU
    torch.accelerator.device_count = lambda: 1
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        cfg = tiny_config("wan", "tiny", parallel={"ulysses": world}, bench={"warmup": 0, "repeats": 1},
                          build={"backend": "eager"})
        result = bench.run(cfg, loader.load_model(cfg), __import__("pathlib").Path(out),
                           methods=("dense", "dense-cp", "astraea", "peers"), progress=False)
        torch.save([(r["method"], r["setting"], r["psnr_latent"]) for r in result["rows"]], f"{out}/rows{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_bench_under_two_ranks_measures_dense_on_diffusers_context_parallelism(tmp_path):
    """astraea-bench on two gloo ranks: dense (one process each), then dense on diffusers' own
    context parallelism (enable_parallelism, Ulysses over the ranks), eager and compiled, equal
    to dense; one-GPU rows (astraea eager, peers) are left out; rank 0 writes the report."""
    import torch.multiprocessing as mp

    mp.spawn(_bench_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2)
    rows = torch.load(tmp_path / "rows0.pt")
    assert [(m, s) for m, s, _ in rows] == [
        ("dense", "diffusers, eager"), ("dense-cp", "diffusers context parallelism, Ulysses 2, eager"),
        ("dense-cp", "diffusers context parallelism, Ulysses 2, torch.compile")]
    assert all(p > 80 for _, _, p in rows[1:]), rows  # the same computation, split over the ranks
    assert (tmp_path / "bench" / "bench.json").is_file()
