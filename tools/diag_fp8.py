"""Do the compiled FP8 programs quantize as the eager op does? One transformer call of a
tiny bf16 model on the GPU, eager and exported + plugins.decompose + torch.compile (as the
engines compile it), with and without FP8 Linear layers: relative L2 distances between them.
If the compiled FP8 call sits as far from eager FP8 as FP8 sits from bf16, and close to bf16,
it does not quantize.

    python3 tools/diag_fp8.py [--family wan] [--preset tiny] [--scheme channel|tensor]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from astraea import config, loader, plugins, quantize  # noqa: E402
from astraea.plugins import fp8_linear  # noqa: E402
from astraea.sampling import first_step_kwargs  # noqa: E402


def rel(a, b) -> float:
    return (torch.linalg.vector_norm((a - b).float()) / torch.linalg.vector_norm(b.float())).item()


def compiled(module, kwargs):
    ep = plugins.decompose(torch.export.export(module, (), kwargs, strict=False))
    return torch.compile(ep.module(), dynamic=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="wan")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--scheme", default="channel", choices=("channel", "tensor"))
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    cfg = config.from_dict({"model": {"family": args.family, "preset": args.preset, "dtype": "bf16", "device": args.device},
                            "video": {"frames": 17, "height": 64, "width": 64}, "sampling": {"steps": 4, "prompts": ["diag"]}})
    model = loader.load_model(cfg)
    kwargs = first_step_kwargs(model, cfg.video, cfg.sampling)
    names = quantize.candidates(model.transformer)
    amax = {}
    for n, m in names.items():
        w = m.weight.detach().float().abs()
        amax[f"{n}.weight_amax"] = w.amax(dim=1) if args.scheme == "channel" else w.amax()
        if args.scheme == "tensor":
            amax[f"{n}.input_amax"] = torch.tensor(4.0)
    fp8 = quantize.convert(model.transformer, amax, set(names))
    with torch.no_grad():
        out = {"bf16 eager": model.transformer(**kwargs)[0], "fp8 eager": fp8(**kwargs)[0],
               "bf16 compiled": compiled(model.transformer, kwargs)(**kwargs)[0],
               "fp8 compiled": compiled(fp8, kwargs)(**kwargs)[0]}
        # one layer alone, its input from a LayerNorm in bf16
        lin = torch.nn.Linear(256, 512).to(args.device, torch.bfloat16)
        norm = torch.nn.LayerNorm(256).to(args.device, torch.bfloat16)
        x = torch.randn(4, 300, 256, device=args.device, dtype=torch.bfloat16) * 3
        w = lin.weight.float().abs()
        layer = fp8_linear.Fp8Linear.from_linear(lin, w.amax(dim=1) if args.scheme == "channel" else w.amax(),
                                                 None if args.scheme == "channel" else torch.tensor(4.0, device=args.device))
        block = torch.nn.Sequential(norm, layer)
        one = {"layer bf16": torch.nn.Sequential(norm, lin)(x), "layer fp8 eager": block(x),
               "layer fp8 compiled": compiled(block, {"input": x})(input=x)}
    for table in (out, one):
        keys = list(table)
        for i, a in enumerate(keys):
            for b in keys[i + 1:]:
                print(f"{args.scheme:8s} {a:>20s} vs {b:<20s} {rel(table[a], table[b]):.5f}")


if __name__ == "__main__":
    main()
