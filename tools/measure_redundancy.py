"""The premise of token-wise acceleration, measured on the bundled reference model.

For every block and every pair of adjacent denoising steps of a dense sample:
  - the cosine similarity of the self-attention log-sum-exp (per token, mean over heads)
    between the two steps (the paper reports 99.1% on Wan 2.1);
  - the fraction of tokens whose block output changes by less than 1% (relative L2 over
    the hidden dim) between the two steps: the tokens a cache could serve unchanged.
`python tools/measure_redundancy.py --out docs/reference-model` writes redundancy.json and
redundancy.png (CPU: about a minute).
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffusers.models.transformers.transformer_wan as wan_module  # noqa: E402

from astraea import config, loader  # noqa: E402
from astraea.sampling import denoise, prompt_inputs  # noqa: E402

THRESHOLDS = {"stable_fraction": 0.01, "stable_fraction_5pct": 0.05, "stable_fraction_10pct": 0.10}
PROMPTS = ["a red circle moving left over a striped background", "a green ring growing over a gradient background"]


@contextmanager
def record_self_attention_lse(store: list):
    """Wrap Wan's attention dispatch: for self-attention calls, append the per-token LSE
    (B, N), mean over heads, computed exactly in float64 from the same q and k."""
    original = wan_module.dispatch_attention_fn

    def wrapped(query, key, value, *args, **kwargs):
        if query.shape[1] == key.shape[1]:  # (B, N, H, D): self-attention over the video tokens
            q, k = query.double().transpose(1, 2), key.double().transpose(1, 2)
            scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
            store.append(torch.logsumexp(scores, dim=-1).mean(dim=1).float().cpu())
        return original(query, key, value, *args, **kwargs)

    wan_module.dispatch_attention_fn = wrapped
    try:
        yield
    finally:
        wan_module.dispatch_attention_fn = original


def measure(prompt: str, steps: int, device: str) -> dict:
    cfg = config.bundled_config([prompt], steps, 5.0, [0], device)
    model = loader.load_model(cfg)
    blocks = model.transformer.blocks
    outputs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, a, o: outputs.append(o.detach().float().cpu())) for b in blocks]
    lse: list[torch.Tensor] = []
    inputs = prompt_inputs(model, cfg.video, cfg.sampling, prompt, 0)
    with record_self_attention_lse(lse):
        denoise(model, cfg.video, cfg.sampling, inputs)
    for h in hooks:
        h.remove()
    n_blocks = len(blocks)
    out = torch.stack(outputs).view(steps, n_blocks, *outputs[0].shape)  # S, L, B, N, D
    lse_t = torch.stack(lse).view(steps, n_blocks, *lse[0].shape)  # S, L, B, N
    cos = torch.nn.functional.cosine_similarity(lse_t[1:], lse_t[:-1], dim=-1).mean(dim=-1)  # S-1, L
    change = (out[1:] - out[:-1]).norm(dim=-1) / out[:-1].norm(dim=-1).clamp(min=1e-12)  # S-1, L, B, N
    result = {"lse_cosine": cos.tolist(), "median_relative_change": change.median(dim=-1).values.mean(dim=-1).tolist()}
    for name, threshold in THRESHOLDS.items():
        result[name] = (change < threshold).float().mean(dim=(-1, -2)).tolist()  # S-1, L
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cos = torch.tensor(result["lse_cosine"])
    steps = range(1, cos.shape[0] + 1)
    fig, axes = plt.subplots(1, 1 + len(THRESHOLDS), figsize=(5 * (1 + len(THRESHOLDS)), 3.6), dpi=110)
    for b in range(cos.shape[1]):
        axes[0].plot(steps, cos[:, b], lw=1, label=f"block {b}")
        for ax, name in zip(axes[1:], THRESHOLDS):
            ax.plot(steps, torch.tensor(result[name])[:, b] * 100, lw=1, label=f"block {b}")
    axes[0].set_title("self-attention LSE: cosine to previous step", fontsize=9)
    for ax, (name, threshold) in zip(axes[1:], THRESHOLDS.items()):
        ax.set_title(f"tokens whose block output moved < {threshold:.0%} (%)", fontsize=9)
        ax.set_ylim(-2, 102)
    for ax in axes:
        ax.set_xlabel("denoising step (pair step-1, step)")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/reference-model"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    runs = [measure(prompt, args.steps, args.device) for prompt in PROMPTS]
    result = {k: torch.tensor([r[k] for r in runs]).mean(dim=0).tolist() for k in runs[0]}
    result |= {"prompts": PROMPTS, "steps": args.steps, "guidance": 5.0}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"redundancy-{args.steps}steps.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / f"redundancy-{args.steps}steps.png")
    cos = torch.tensor(result["lse_cosine"])
    print(f"LSE cosine: mean {cos.mean():.4f}, min {cos.min():.4f}")
    for name, threshold in THRESHOLDS.items():
        stable = torch.tensor(result[name])
        print(f"tokens < {threshold:.0%} change: mean {stable.mean():.1%}, first pair {stable[0].mean():.1%}, "
              f"last pair {stable[-1].mean():.1%}, best block/step {stable.max():.1%}")


if __name__ == "__main__":
    main()
