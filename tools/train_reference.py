"""Train the bundled reference model (astraea.bundled) from scratch with flow matching.

Run on the GPU (device tool): `python3 tools/train_reference.py --out $OUT/train --minutes 8`.
`--family opensora` trains the second one, Open-Sora's STDiT3 at the same size
(bundled.STDIT3_CONFIG), on the same data with Open-Sora's conventions: velocity x0 - noise,
timesteps moved by its sampler's resolution/length transform, caption mask, fps and size
inputs; it writes astraea-tiny-stdit3.safetensors. The transform's scale (`--transform-scale`;
by default the one that moves the bundled video's noise levels as the Wan model's shift 2 does,
where Open-Sora's own would move them down) is recorded in the file, which is sampled at it.
Deterministic for a seed on a given device: the data pool is rendered from a seeded scene
list, each step draws its batch, noise and timesteps from generators seeded by (seed, step),
so a resumed run continues exactly where a checkpoint stopped. Writes, atomically:
  ckpt.pt                     model, text encoder, EMA, optimiser, step (resume with --resume)
  log.jsonl                   loss, lr, throughput every --log-every steps
  astraea-tiny-t2v.safetensors  the EMA weights in fp16 (what ships)
  loss.png                    the loss curve
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from astraea import bundled  # noqa: E402
from astraea.bundled import codec, data  # noqa: E402
from astraea.bundled.text import TextEncoder  # noqa: E402
from astraea.families import get_family  # noqa: E402
from astraea.io import atomic_file  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=100_000, help="stop after this many steps")
    p.add_argument("--minutes", type=float, default=8.0, help="or after this wall time (then save)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--decay-steps", type=int, default=12_000, help="cosine decay horizon")
    p.add_argument("--decay-by-time", action="store_true",
                   help="the decay also follows the wall time, so it ends decayed when --minutes stops it first")
    p.add_argument("--pool", type=int, default=40_000, help="videos rendered once, drawn with replacement")
    p.add_argument("--drop-text", type=float, default=0.1, help="caption dropout (for CFG)")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=2000)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--family", choices=("wan", "opensora"), default="wan", help="the architecture trained")
    p.add_argument("--transform-scale", type=float, default=None,
                   help="opensora: the scale on Open-Sora's noise shift, recorded in the weights file (default: "
                        "the one that samples the bundled video at the Wan model's shift)")
    return p.parse_args(argv)


def render_pool(count: int, seed: int, device) -> tuple[torch.Tensor, list[str]]:
    frames, height, _ = bundled.VIDEO
    scenes = data.scenes_for(seed, count)
    latents = []
    for start in tqdm(range(0, count, 256), desc="render data", unit="chunk"):
        video = data.render(scenes[start : start + 256], frames, height, device)
        latents.append(codec.encode(video).to(torch.bfloat16))
    return torch.cat(latents), [s.caption for s in scenes]


def lr_at(step: int, args, elapsed_s: float = 0.0) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.decay_steps - args.warmup))
    if args.decay_by_time:
        progress = max(progress, min(1.0, elapsed_s / (args.minutes * 60)))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def export(ema: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in ema.items()}
    with atomic_file(path, "wb") as fh:
        from safetensors.torch import save

        fh.write(save(tensors, metadata={"format": "pt", "model": path.stem, **(metadata or {})}))


class Objective:
    """What the trained architecture is fed and asked for, per family."""

    def __init__(self, family: str, device: torch.device, seed: int, transform_scale: float | None = None):
        from astraea.families.base import Preset

        self.family = family
        self.metadata: dict[str, str] = {}
        frames, height, width = bundled.VIDEO
        if family == "opensora":
            from astraea.families.opensora import BUNDLED_SCALE, RFlow

            preset = Preset("bundled-training", bundled.STDIT3_CONFIG, bundled.TEXT_LENGTH, bundled.VIDEO)
            scale = BUNDLED_SCALE if transform_scale is None else transform_scale
            self.rflow = RFlow(height, width, frames, scale=scale)  # the file records it: sampled at the same levels
            self.metadata = {bundled.TRANSFORM_SCALE_KEY: repr(scale)}
            self.size = torch.tensor([float(height)], device=device), torch.tensor([float(width)], device=device)
            self.weights = bundled.STDIT3_WEIGHTS.name
        else:
            preset = get_family("wan").preset("bundled")
            self.weights = bundled.WEIGHTS.name
        self.model = get_family(family).build_random(preset, device, torch.float32, seed).train().requires_grad_(True)

    def sigma(self, u: torch.Tensor) -> torch.Tensor:
        """Noise levels from logit-normal draws u in (0, 1), moved as the family's sampler moves them."""
        if self.family == "opensora":
            return self.rflow.transform(u * 1000) / 1000
        return bundled.SHIFT * u / (1 + (bundled.SHIFT - 1) * u)

    def loss(self, forward, text, prompts, x0, noise, sigma) -> torch.Tensor:
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        if self.family == "opensora":  # Open-Sora: the velocity x0 - noise; the caption mask (one row at least)
            mask = text.tokenize(prompts).to(x0.device) != 0
            mask[:, 0] = True
            height, width = self.size
            pred = forward(xt, sigma * 1000, text(prompts), mask, torch.tensor([24.0], device=x0.device),
                           height.expand(len(prompts)), width.expand(len(prompts)))[0]
            return F.mse_loss(pred[:, : x0.shape[1]].float(), x0 - noise)
        pred = forward(xt, sigma * 1000, text(prompts), return_dict=False)[0]
        return F.mse_loss(pred.float(), noise - x0)


def plot_loss(log: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching MSE")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title(f"{png.parent.name}: training loss")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    tf32 = torch.backends.cuda.matmul.allow_tf32  # a process-wide setting: restored for callers in-process
    try:
        train(parse(argv))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def train(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    objective = Objective(args.family, device, args.seed, args.transform_scale)
    model = objective.model
    torch.manual_seed(args.seed)
    text = TextEncoder(bundled.TEXT_DIM, bundled.TEXT_LENGTH).to(device)
    params = {f"transformer.{k}": v for k, v in model.named_parameters()} | {
        f"text_encoder.{k}": v for k, v in text.named_parameters()
    }
    ema = {k: v.detach().clone() for k, v in params.items()}
    decay, no_decay = [v for v in params.values() if v.ndim >= 2], [v for v in params.values() if v.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.99), fused=device.type == "cuda")
    step = 0
    ckpt = args.out / "ckpt.pt"
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt, map_location=device)
        model.load_state_dict(state["model"])
        text.load_state_dict(state["text"])
        opt.load_state_dict(state["opt"])
        ema = state["ema"]
        step = state["step"]
        old = {bundled.TRANSFORM_SCALE_KEY: repr(1.0)} if args.family == "opensora" else {}  # before it was recorded
        trained = state.get("metadata", old)
        if trained != objective.metadata:
            raise SystemExit(f"train_reference: {ckpt} was trained with {trained or 'no transform scale'}, "
                             f"not {objective.metadata or 'none'}; pass its --transform-scale or start a new --out")
        print(f"resumed at step {step}")
    pool, captions = render_pool(args.pool, args.seed, device)
    forward = torch.compile(model) if args.compile else model
    log = args.out / "log.jsonl"
    start, window, last_t = time.time(), [], time.time()
    bar = tqdm(total=args.steps, initial=step, desc="train", unit="step")

    def save():
        with atomic_file(ckpt, "wb") as fh:
            torch.save({"model": model.state_dict(), "text": text.state_dict(), "opt": opt.state_dict(),
                        "ema": ema, "step": step, "args": vars(args) | {"out": str(args.out)},
                        "metadata": objective.metadata}, fh)

    while step < args.steps and (time.time() - start) < args.minutes * 60:
        rng = np.random.default_rng([args.seed, step])
        idx = torch.from_numpy(rng.integers(0, len(captions), size=args.batch)).to(device)
        prompts = ["" if rng.random() < args.drop_text else captions[i] for i in idx.tolist()]
        g = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + step)
        x0 = pool[idx].float()
        noise = torch.randn(x0.shape, generator=g, device=device)
        sigma = objective.sigma(torch.sigmoid(torch.randn(args.batch, generator=g, device=device)))  # the sampling shift
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args, time.time() - start)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = objective.loss(forward, text, prompts, x0, noise, sigma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        step += 1
        d = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.values()), [p.detach() for p in params.values()], 1 - d)
        window.append(loss.detach())
        if step % args.log_every == 0:
            now = time.time()
            row = {"step": step, "loss": torch.stack(window).mean().item(), "lr": lr_at(step, args, now - start),
                   "steps_per_s": args.log_every / (now - last_t), "elapsed_s": now - start}
            with log.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            window, last_t = [], now
        if step % args.save_every == 0:
            save()
        bar.update()
    bar.close()
    save()
    # the EMA parameters, and the model's persistent buffers (STDiT3's rotary frequencies: its checkpoint holds them)
    buffers = {f"transformer.{k}": v for k, v in model.state_dict().items() if f"transformer.{k}" not in params}
    export(ema | buffers, args.out / objective.weights, objective.metadata)
    if log.is_file():
        plot_loss(log, args.out / "loss.png")
    print(json.dumps({"step": step, "minutes": (time.time() - start) / 60, "out": str(args.out)}))


if __name__ == "__main__":
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    main()
