"""The opensora family: Open-Sora v1.2's sampler against its formulas, dense sampling on the
tiny preset, a checkpoint folder in the public layout, ToCa on its blocks, and the rewrite
refusing STDiT3's factored attention in one line (until grouped attention lands)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from astraea import config, loader
from astraea.sampling import denoise, first_step_kwargs, prompt_inputs
from conftest import tiny_config

VIDEO = {"frames": 17, "height": 32, "width": 48}


def _cfg(**sections):
    return tiny_config("opensora", "tiny", video=VIDEO, **{"sampling": {"steps": 4}, **sections})


def test_rflow_is_open_soras_sampler():
    cfg = _cfg()
    model = loader.load_model(cfg)
    ratio = math.sqrt(32 * 48 / 512**2) * math.sqrt(17 // 17 * 5)
    want = [ratio * t / (1 + (ratio - 1) * t) * 1000 for t in (1.0, 0.75, 0.5, 0.25)]
    got = model.family.set_timesteps(model.scheduler, 4, "cpu")
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-3, rtol=1e-6)
    z, v = torch.randn(1, 4, 5, 4, 6), torch.randn(1, 8, 5, 4, 6)  # the velocity is the first 4 channels
    stepped = model.family.scheduler_step(model.scheduler, v, got[1], z, {})
    torch.testing.assert_close(stepped, z + v[:, :4] * (want[1] - want[2]) / 1000)
    last = model.family.scheduler_step(model.scheduler, v, got[3], z, {})
    torch.testing.assert_close(last, z + v[:, :4] * want[3] / 1000)


def test_dense_sampling_and_a_checkpoint_in_the_public_layout(tmp_path):
    from safetensors.torch import save_file

    cfg = _cfg()
    model = loader.load_model(cfg)
    inputs = prompt_inputs(model, cfg.video, cfg.sampling, cfg.sampling.prompts[0], 0)
    assert inputs.cfg and inputs.cond.mask is not None  # the CFG batch, the caption mask
    dense = denoise(model, cfg.video, cfg.sampling, inputs)
    assert dense.shape == (1, 4, 5, 4, 6) and torch.isfinite(dense).all()
    torch.testing.assert_close(denoise(model, cfg.video, cfg.sampling, inputs), dense)
    folder = tmp_path / "ckpt" / "transformer"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.transformer.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(model.transformer.config))
    raw = {**cfg.model.__dict__, "preset": None, "checkpoint": str(tmp_path / "ckpt")}
    ckpt = loader.load_model(tiny_config("opensora", "tiny", video=VIDEO, sampling={"steps": 4},
                                         model={k: v for k, v in raw.items() if k in ("family", "checkpoint", "dtype",
                                                                                     "device", "preset")}))
    kwargs = first_step_kwargs(model, cfg.video, cfg.sampling)
    with torch.no_grad():
        torch.testing.assert_close(ckpt.transformer(**kwargs)[0], model.transformer(**kwargs)[0])
    (folder / "config.json").unlink()
    with pytest.raises(config.ConfigError, match=r"ckpt is not a diffusers checkpoint folder \(no transformer/config.json\)"):
        tiny_config("opensora", "tiny", video=VIDEO, model={"preset": None, "checkpoint": str(tmp_path / "ckpt")})
    with pytest.raises(config.ConfigError, match="video.frames: opensora needs frames = 17k .* try 17 or 34"):
        tiny_config("opensora", "tiny", video={"frames": 21, "height": 32, "width": 48})


def test_toca_on_stdit3_blocks():
    """ToCa's own target: every step forced is dense; the published setting engages."""
    from astraea.peers import make

    cfg = _cfg(sampling={"steps": 8})
    model = loader.load_model(cfg)
    inputs = prompt_inputs(model, cfg.video, cfg.sampling, cfg.sampling.prompts[0], 0)
    dense = denoise(model, cfg.video, cfg.sampling, inputs)
    for knobs, same in (({"interval": 1, "cross": 1}, True), ({}, False)):
        peer = make(model, "toca", steps=8, cfg=True, **knobs)
        try:
            got = denoise(model, cfg.video, cfg.sampling, inputs, peer)
        finally:
            peer.close()
        rel = ((got - dense).norm() / dense.norm()).item()
        assert rel < 1e-5 if same else 1e-6 < rel < 1.0, (knobs, rel)


def test_the_rewrite_refuses_factored_attention_in_one_line():
    from astraea.passes.pipeline import PassError
    from astraea.tokenwise import build_programs

    cfg = _cfg()
    model = loader.load_model(cfg)
    with pytest.raises(PassError, match=r"classify_rows .* aten.view.default merges or splits the token axis") as e:
        build_programs(model, cfg, [10], progress=False)
    assert "\n" not in str(e.value)


def test_the_bench_runs_toca_and_leaves_diffusers_hooks_out(tmp_path):
    """astraea-bench's default peers on opensora: ToCa's two settings, no diffusers hook (which
    needs a diffusers model); one given explicitly is refused at validation."""
    from astraea import bench

    cfg = _cfg(bench={"warmup": 0, "repeats": 1}, sampling={"steps": 8})
    model = loader.load_model(cfg)
    report = bench.run(cfg, model, tmp_path, methods=("dense", "peers"), progress=False)
    assert [(r["method"], r["setting"]) for r in report["rows"]] == [
        ("dense", "STDiT3, eager"), ("toca", "defaults"), ("toca", "interval=5 cross=10")]
    dense, toca = report["rows"][0], report["rows"][1]
    assert dense["work_fraction"] == dense["row_work_fraction"] == 1.0
    # partial calls (the MLP on 15% of the rows) make the rows' fraction the smaller
    assert toca["row_work_fraction"] < min(1.0, toca["work_fraction"])
    with pytest.raises(config.ConfigError, match=r"bench.peers\[0\]: pab is one of diffusers' cache hooks"):
        _cfg(bench={"peers": ["pab skip=2"]})
