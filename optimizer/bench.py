"""Latency of one dense denoising step (the transformer call, CFG batch included).

Warm-up first, then `bench.repeats` timed calls; CUDA events on a GPU, perf_counter on the
CPU; the median is the number; peak GPU memory is read after the timed calls. Later stages
(compiled, Astraea, peers) add their rows to the same report format.
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import trange

from .config import RunConfig
from .families import LoadedModel
from .io import atomic_file, write_json
from .sampling import first_step_kwargs


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def time_call(device: torch.device, fn) -> float:
    """Milliseconds of one call of fn: CUDA events on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


@torch.no_grad()
def dense_step(cfg: RunConfig, model: LoadedModel, progress: bool = True) -> dict:
    dev = model.device
    kwargs = first_step_kwargs(model, cfg.video, cfg.sampling)
    batch = kwargs["hidden_states"].shape[0]

    def call():
        return model.transformer(**kwargs)[0]

    for _ in trange(cfg.bench.warmup, desc="warm-up", disable=not progress):
        call()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    last = [None]

    def kept():
        last[0] = call()

    times = [time_call(dev, kept) for _ in trange(cfg.bench.repeats, desc="timed", disable=not progress)]
    if not torch.isfinite(last[0]).all():
        raise RuntimeError("the dense step produced non-finite values")
    layout = model.layout(cfg.video)
    return {
        "config": cfg.name, "family": cfg.model.family, "source": model.identity["source"],
        "device": device_name(dev), "torch": torch.__version__, "dtype": cfg.model.dtype,
        "video": f"{cfg.video.width}x{cfg.video.height}x{cfg.video.frames}", "batch": batch,
        "video_tokens": layout.video_tokens, "text_tokens": model.text_length,
        "params": sum(p.numel() for p in model.transformer.parameters()),
        "warmup": cfg.bench.warmup, "repeats": cfg.bench.repeats, "step_ms": times,
        "median_ms": statistics.median(times),
        "peak_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
    }


def markdown(reports: list[dict]) -> str:
    head = "| config | device | video (WxHxF) | tokens | batch | dtype | median step (ms) | peak (GiB) |\n|---|---|---|---|---|---|---|---|\n"
    rows = []
    for r in reports:
        peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.1f}"
        rows.append(
            f"| {r['config']} | {r['device']} | {r['video']} | {r['video_tokens']} | {r['batch']} | {r['dtype']} "
            f"| {r['median_ms']:.1f} | {peak} |"
        )
    return head + "\n".join(rows) + "\n"


def write_report(report: dict, folder: Path) -> None:
    write_json(folder / "dense-step.json", report)
    with atomic_file(folder / "dense-step.md") as fh:
        fh.write(markdown([report]))
