"""Diagnostic (device tool): where bf16 and fp32 samples of a tiny preset part on a GPU."""

import sys

import torch

sys.path.insert(0, "tests")
from astraea import loader  # noqa: E402
from astraea.conditioning import encode_prompt  # noqa: E402
from astraea.sampling import make_inputs  # noqa: E402
from conftest import tiny_config  # noqa: E402


def main(family: str, preset: str) -> None:
    outs = {}
    for dtype in ("fp32", "bf16"):
        cfg = tiny_config(family, preset, model={"device": "cuda", "dtype": dtype})
        m = loader.load_model(cfg)
        cond = encode_prompt(m, "a red circle", None)
        neg = encode_prompt(m, "", None)
        inp = make_inputs(m, cfg.video, cfg.sampling, cond, neg, 0)
        ts = m.family.set_timesteps(m.scheduler, 3, m.device)
        static = m.family.static_inputs(m, cfg.video, cfg.sampling)
        x = inp.noise.to(m.device, m.dtype)
        x = torch.cat([x, x])
        for backend in ("default", "math"):
            kw = m.family.model_inputs(x, ts[0], inp.cond, static)
            if backend == "math":
                with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
                    outs[dtype, backend] = m.transformer(**kw)[0].float()
            else:
                outs[dtype, backend] = m.transformer(**kw)[0].float()
    ref = outs["fp32", "math"]
    for k, v in outs.items():
        print(k, f"{((v - ref).norm() / ref.norm()).item():.3e}", f"max {v.abs().max().item():.3e}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
