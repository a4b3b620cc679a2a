"""Samples and prompt-following of the bundled reference model, for its model card.

`python tools/reference_card.py --out docs/reference-model` samples one-shape prompts
(colour x shape x motion x background, deterministic), judges each decoded video with
`astraea.bundled.judge`, and writes samples.png (a row of frames per prompt) and judge.json.
Runs on the CPU (about 15 s a prompt on 2 cores) or a GPU. `--family opensora` does the same
for the bundled STDiT3 model (docs/reference-model/stdit3/). `--golden FILE` writes instead
the 4-step sample of the first prompt (seed 0, the bundled config's defaults, CPU) that
tests/bundled pins a shipped weights file with: run it when new weights ship.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from astraea import bundled, config, loader  # noqa: E402
from astraea.bundled import data, judge  # noqa: E402
from astraea.io import atomic_file  # noqa: E402
from astraea.sampling import denoise, prompt_inputs  # noqa: E402

PROMPTS = [
    "a red circle moving left over a striped background",
    "a blue square moving right over a checkered background",
    "a yellow triangle moving up over a plain background",
    "a green ring growing over a gradient background",
    "a white square shrinking over a dotted background",
    "a purple circle moving down over a striped background",
    "a orange ring moving right over a plain background",
    "a cyan triangle moving left over a checkered background",
    "a red square growing over a plain background",
    "a blue ring moving up over a gradient background",
    "a yellow circle shrinking over a checkered background",
    "a green triangle moving down over a dotted background",
]


def sample_videos(prompts: list[str], steps: int, guidance: float, device: str, seed: int = 0,
                  family: str = "wan") -> list[torch.Tensor]:
    cfg = config.bundled_config(prompts, steps, guidance, [seed], device, family)
    model = loader.load_model(cfg)
    videos = []
    for prompt in tqdm(prompts, desc="sample", unit="prompt"):
        inputs = prompt_inputs(model, cfg.video, cfg.sampling, prompt, seed)
        videos.append(model.decoder(denoise(model, cfg.video, cfg.sampling, inputs))[0].cpu())
    return videos


def grid(videos: list[torch.Tensor], captions: list[str], path: Path, frames: int = 6, scale: int = 2) -> None:
    rows = []
    for video, caption in zip(videos, captions):
        idx = np.linspace(0, video.shape[1] - 1, frames).round().astype(int)
        tiles = [((video[:, f].permute(1, 2, 0).clamp(-1, 1) + 1) / 2 * 255).byte().numpy() for f in idx]
        strip = Image.fromarray(np.concatenate(tiles, axis=1)).resize((64 * frames * scale, 64 * scale), Image.NEAREST)
        label = Image.new("RGB", (strip.width, 14), "white")
        ImageDraw.Draw(label).text((4, 1), caption, fill="black")
        row = Image.new("RGB", (strip.width, strip.height + 14))
        row.paste(label, (0, 0))
        row.paste(strip, (0, 14))
        rows.append(row)
    out = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)))
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height
    out.save(path)


def golden_sample(family: str) -> torch.Tensor:
    """The shipped model's 4-step latents for PROMPTS[0], seed 0: what its golden file stores."""
    cfg = config.bundled_config([PROMPTS[0]], 4, family=family)
    model = loader.load_model(cfg)
    return denoise(model, cfg.video, cfg.sampling, prompt_inputs(model, cfg.video, cfg.sampling, PROMPTS[0], 0))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/reference-model"))
    p.add_argument("--prompts", type=int, default=len(PROMPTS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--family", default="wan", choices=("wan", "opensora"), help="which bundled model")
    p.add_argument("--golden", type=Path, help="write the golden 4-step sample to this file instead")
    args = p.parse_args(argv)
    if args.golden:
        from safetensors.torch import save

        with atomic_file(args.golden, "wb") as fh:
            fh.write(save({"latents": golden_sample(args.family).contiguous()}))
        print(f"golden sample of the bundled {args.family} model: {args.golden}")
        return
    prompts = PROMPTS[: args.prompts]
    videos = sample_videos(prompts, args.steps, args.guidance, args.device, family=args.family)
    verdicts = [judge.judge(v, c) for v, c in zip(videos, prompts)]
    rendered = data.render([_scene(c) for c in prompts], *bundled.VIDEO[:2])
    truth = [judge.judge(v, c) for v, c in zip(rendered, prompts)]
    args.out.mkdir(parents=True, exist_ok=True)
    grid(videos, prompts, args.out / "samples.png")
    mean_abs = [float((a - b).abs().mean()) for a, b in zip(videos[:-1], videos[1:])]
    report = {
        "family": args.family, "steps": args.steps, "guidance": args.guidance, "seed": 0,
        "prompts": [{"prompt": c, "colour": v.colour, "motion": v.motion, "travel_px": v.travel,
                     "area_ratio": v.area_ratio, "passed": v.passed} for c, v in zip(prompts, verdicts)],
        "passed": sum(v.passed for v in verdicts), "total": len(verdicts),
        "rendered_data_passed": sum(v.passed for v in truth),
        "mean_abs_difference_between_consecutive_prompts": mean_abs,
    }
    (args.out / "judge.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"prompt-following: {report['passed']}/{report['total']} (the rendered data: {report['rendered_data_passed']}/{len(truth)})")


def _scene(caption: str) -> data.Scene:
    """The one-shape scene a caption describes, centred (for the judge's ground truth)."""
    words = caption.split()
    motion = " ".join(words[3:words.index("over")])
    return data.Scene((data.Shape(words[1], words[2], motion, 0.0, 0.0, 0.26),), words[-2], 0, 0.0)


if __name__ == "__main__":
    main()
