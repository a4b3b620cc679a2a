"""Frames side by side, one row a method, as the paper's site shows them: dense, Astraea's
searched schedules, ToCa and PAB on the bundled model (whose decoder turns latents into
pixels), for each prompt given. Each row is labelled with its PSNR against dense (decoded
frames). Writes frames_p<i>.png and frames.json (PSNR per method and prompt).

    python tools/compare_frames.py --out docs/results/compare-frames --steps 50 \\
        --schedules docs/results/search-cpu-50steps/searched-schedules.json \\
        --peers toca "pab skip=2 cross=6" --prompts 0 3

`--family opensora` does the same on the bundled STDiT3 model (ToCa only: PAB is a diffusers
hook, which our STDiT3 is not).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from astraea import config, loader  # noqa: E402
from astraea.families.base import decode_frames  # noqa: E402
from astraea.metrics import psnr  # noqa: E402
from astraea.peers import make, parse_setting  # noqa: E402
from astraea.plots import pyplot, save_png  # noqa: E402
from astraea.sampling import denoise, prompt_inputs  # noqa: E402
from astraea.schedule import read_schedules  # noqa: E402
from astraea.tokenwise import TokenwiseTransformer, build_programs  # noqa: E402

PROMPTS = ["a red circle moving left over a striped background", "a green ring growing over a gradient background",
           "a blue square bouncing over a plain background", "a yellow triangle moving right over a checkered background"]


def pixel_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Frames in [0, 1]: metrics.psnr over a peak of 1."""
    return psnr(float(((a - b) ** 2).mean()), 1.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--schedules", type=Path, required=True, help="{name: [budget per step]} or a schedule.json")
    p.add_argument("--peers", nargs="*", default=["toca", "pab skip=2 cross=6"])
    p.add_argument("--prompts", type=int, nargs="+", default=[0, 3], help="indices into the bundled bench's 4 prompts")
    p.add_argument("--frames", type=int, default=5, help="frames shown a row, evenly spaced")
    p.add_argument("--family", default="wan", choices=("wan", "opensora"), help="which bundled model")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = config.bundled_config([PROMPTS[i] for i in args.prompts], steps=args.steps, family=args.family)
    model = loader.load_model(cfg)
    n = model.layout(cfg.video).video_tokens
    schedules = read_schedules(args.schedules, args.steps, n)
    programs = build_programs(model, cfg, sorted({k for s in schedules.values() for k in s.tokens if k}), progress=False)
    report = {"steps": args.steps, "prompts": {}}
    for i in args.prompts:
        inputs = prompt_inputs(model, cfg.video, cfg.sampling, PROMPTS[i], cfg.sampling.seeds[0])
        rows: dict[str, np.ndarray] = {}
        with torch.no_grad():
            rows["dense"] = decode_frames(model, denoise(model, cfg.video, cfg.sampling, inputs))
            for name, s in schedules.items():
                label = "Astraea " + name.split(" (")[0]
                rows[label] = decode_frames(model, denoise(model, cfg.video, cfg.sampling, inputs,
                                                           TokenwiseTransformer(programs, list(s.tokens))))
            for text in args.peers:
                peer_name, knobs = parse_setting(text)
                if peer_name == "toca":
                    knobs |= {"steps": args.steps, "cfg": inputs.cfg}
                peer = make(model, peer_name, **knobs)
                try:
                    rows[text] = decode_frames(model, denoise(model, cfg.video, cfg.sampling, inputs, peer))
                finally:
                    peer.close()
        psnrs = {label: pixel_psnr(frames, rows["dense"]) for label, frames in rows.items()}
        report["prompts"][PROMPTS[i]] = psnrs
        grid(rows, psnrs, args.frames, f"{PROMPTS[i]} ({args.steps} steps)", args.out / f"frames_p{i}.png")
        print(json.dumps({"prompt": i, **{k: round(v, 2) for k, v in psnrs.items()}}), flush=True)
    (args.out / "frames.json").write_text(json.dumps(report, indent=1))


def grid(rows: dict[str, np.ndarray], psnrs: dict[str, float], count: int, title: str, path: Path) -> None:
    plt = pyplot()
    frames = next(iter(rows.values()))
    idx = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)
    fig, axes = plt.subplots(len(rows), len(idx), figsize=(1.3 * len(idx) + 1.6, 1.3 * len(rows)), dpi=110,
                             squeeze=False)
    for r, (label, video) in enumerate(rows.items()):
        for c, f in enumerate(idx):
            ax = axes[r][c]
            ax.imshow(video[f])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {f}", fontsize=7)
        psnr = psnrs[label]
        axes[r][0].set_ylabel(f"{label}\n{'' if psnr == float('inf') else f'{psnr:.1f} dB'}", fontsize=6,
                              rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    from PIL import Image

    Image.open(path).convert("RGB").quantize(colors=256).save(path, optimize=True)  # a palette: half the bytes


if __name__ == "__main__":
    main()
