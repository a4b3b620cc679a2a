"""The dense reference: final latents of the unaccelerated model for every prompt and seed.

Stored under `<run>/reference/<key>/` (latents.safetensors, reference.json, preview PNGs),
where the key hashes everything that changes the latents: model identity, video shape,
sampling settings, prompts, dtype, device type and torch version. A run whose key exists
is reused, never recomputed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .conditioning import encode_prompt
from .families import LoadedModel
from .families.base import config_hash, decode_frames
from .io import atomic_dir, read_tensors, stable_hash, write_json
from .sampling import denoise, make_inputs
from .schema import RunConfig


@dataclass
class DenseReference:
    key: str
    folder: Path
    latents: dict[str, torch.Tensor]  # "p<prompt index>_s<seed>" -> (1, *latent_shape) float32
    reused: bool
    seconds: dict[str, float] = field(default_factory=dict)  # computed here: each sample's wall time


def sample_name(prompt_index: int, seed: int) -> str:
    return f"p{prompt_index}_s{seed}"


def reference_key(cfg: RunConfig, model: LoadedModel) -> str:
    sampling = asdict(cfg.sampling)
    sampling.pop("prompt_file")  # the prompts themselves are in the key
    sampling["text_length"] = model.text_length
    return stable_hash({
        "model": model.identity, "dtype": cfg.model.dtype, "device": model.device.type,
        "torch": ".".join(torch.__version__.split(".")[:2]), "video": asdict(cfg.video), "sampling": sampling,
        "scheduler": [type(model.scheduler).__name__, config_hash(dict(model.scheduler.config))],
    })


def run(cfg: RunConfig, model: LoadedModel, out_dir: Path, progress: bool = True) -> DenseReference:
    """Compute the dense reference, or load it if this exact one was computed before."""
    key = reference_key(cfg, model)
    folder = out_dir / "reference" / key
    if (folder / "latents.safetensors").is_file():
        latents = read_tensors(folder / "latents.safetensors", f"delete {folder} to sample the dense reference again")
        return DenseReference(key, folder, latents, reused=True)

    s = cfg.sampling
    cache = out_dir / "embeddings"
    negative = encode_prompt(model, s.negative_prompt, cache)
    latents, timings, step_times = {}, {}, []
    total = len(s.prompts) * len(s.seeds) * s.steps
    bar = tqdm(total=total, desc="dense reference", unit="step", disable=not progress, leave=False)
    for pi, prompt in enumerate(s.prompts):
        cond = encode_prompt(model, prompt, cache)
        for seed in s.seeds:
            inputs = make_inputs(model, cfg.video, s, cond, negative, seed)
            last = [time.perf_counter()]

            def tick(i, t, x):
                _sync(model.device)
                now = time.perf_counter()
                step_times.append(now - last[0])
                last[0] = now
                bar.update()

            start = time.perf_counter()
            name = sample_name(pi, seed)
            latents[name] = denoise(model, cfg.video, s, inputs, on_step=tick).cpu().contiguous()
            timings[name] = time.perf_counter() - start
    bar.close()
    timesteps = model.family.set_timesteps(model.scheduler, s.steps, "cpu")
    record = {
        "key": key, "model": model.identity, "video": asdict(cfg.video), "sampling": asdict(s),
        "text_length": model.text_length, "dtype": cfg.model.dtype, "device": str(model.device),
        "torch": torch.__version__, "scheduler": type(model.scheduler).__name__,
        "timesteps": [float(t) for t in timesteps], "samples": sorted(latents),
        "latent_shape": list(next(iter(latents.values())).shape[1:]), "layout": model.family.layout,
        "seconds_per_sample": timings, "median_step_seconds": float(np.median(step_times)),
    }
    with atomic_dir(folder) as tmp:
        save_file(latents, str(tmp / "latents.safetensors"))
        write_json(tmp / "reference.json", record)
        _preview(latents, model.family.layout, tmp / "latents.png")
        if model.decoder is not None:
            for name, x in latents.items():
                _strip(decode_frames(model, x), tmp / f"frames_{name}.png")
    return DenseReference(key, folder, latents, reused=False, seconds=timings)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(x, 1), np.percentile(x, 99)
    return (np.clip((x - lo) / max(hi - lo, 1e-8), 0, 1) * 255).astype(np.uint8)


def _preview(latents: dict[str, torch.Tensor], layout: str, path: Path) -> None:
    """One row per sample, one tile per latent frame: latent channels 0-2 as RGB."""
    rows = []
    for x in latents.values():
        x = x[0] if layout == "BCFHW" else x[0].transpose(0, 1)  # -> C, F, H, W
        tiles = [_to_uint8(x[:3, f].permute(1, 2, 0).numpy()) for f in range(x.shape[1])]
        rows.append(np.concatenate(tiles, axis=1))
    img = Image.fromarray(np.concatenate(rows, axis=0))
    scale = max(1, 256 // img.height)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def _strip(frames: np.ndarray, path: Path, count: int = 8) -> None:
    """Decoded frames (F, H, W, 3) in [0, 1] -> a PNG strip of `count` evenly spaced frames."""
    idx = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)
    Image.fromarray((np.concatenate(list(frames[idx]), axis=1) * 255).round().astype(np.uint8)).save(path)
