"""The opensora family: Open-Sora v1.2's sampler against its formulas, dense sampling on the
tiny preset, a checkpoint folder in the public layout, ToCa on its blocks, the token-wise
programs sampling, and the bench."""

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


def test_sampling_shift_is_open_soras_transform_scale():
    """`sampling.shift` multiplies the transform's ratio (Open-Sora's transform_scale): the
    timesteps are a flow shift of ratio x scale, the same formula as Wan's shift."""
    cfg = _cfg(sampling={"steps": 4, "shift": 3.0})
    model = loader.load_model(cfg)
    ratio = 3.0 * math.sqrt(32 * 48 / 512**2) * math.sqrt(5)
    want = [ratio * t / (1 + (ratio - 1) * t) * 1000 for t in (1.0, 0.75, 0.5, 0.25)]
    got = model.family.set_timesteps(model.scheduler, 4, "cpu")
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-3, rtol=1e-6)
    from astraea import bundled
    from astraea.families.opensora import BUNDLED_SCALE, RFlow

    # the scale the bundled STDiT3 is trained at samples its video at the Wan reference model's shift
    rflow = RFlow(*bundled.VIDEO[1:], bundled.VIDEO[0], scale=BUNDLED_SCALE)
    rflow.set_timesteps(10)
    sigmas = torch.linspace(1, 0, 11)[:-1].double()
    shifted = bundled.SHIFT * sigmas / (1 + (bundled.SHIFT - 1) * sigmas) * 1000
    torch.testing.assert_close(rflow.timesteps.double(), shifted, atol=1e-3, rtol=1e-6)


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


def test_the_rewritten_programs_sample_and_decompose_for_compilers():
    """The token-wise programs (attention within a frame or a position on every row; the oracle
    is tests/passes/test_rewrite.py's): at 100% the whole sampling equals dense, at 50% it stays
    close; the decomposition engines compile (factored attention as its grouping around
    astraea::sparse_attention) computes what the op does."""
    from astraea import plugins
    from astraea.tokenwise import TokenwiseTransformer, build_programs

    cfg = _cfg()
    model = loader.load_model(cfg)
    n = model.layout(cfg.video).video_tokens
    inputs = prompt_inputs(model, cfg.video, cfg.sampling, cfg.sampling.prompts[0], 0)
    dense = denoise(model, cfg.video, cfg.sampling, inputs)
    programs = build_programs(model, cfg, [n, n // 2], progress=False)
    full = denoise(model, cfg.video, cfg.sampling, inputs, TokenwiseTransformer(programs, [n] * 4))
    torch.testing.assert_close(full, dense, atol=1e-5, rtol=1e-5)
    half = denoise(model, cfg.video, cfg.sampling, inputs, TokenwiseTransformer(programs, [n] + [n // 2] * 3))
    assert 1e-6 < ((half - dense).norm() / dense.norm()).item() < 1.0
    kwargs = first_step_kwargs(model, cfg.video, cfg.sampling)
    ep = torch.export.export(model.transformer, (), kwargs, strict=False)
    op = torch.ops.astraea.factored_attention.default
    assert sum(node.target is op for node in ep.graph.nodes) == 4  # 2 spatial + 2 temporal blocks
    flat = plugins.decompose(ep)
    assert not any(node.target is op for node in flat.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(flat.module()(**kwargs)[0], model.transformer(**kwargs)[0], atol=1e-5, rtol=1e-5)


def test_an_engine_export_traces_the_ops_implementations_in_one_pass():
    """engines.inlined: the rewritten STDiT3 program (query-only group attention in every
    block) exported once with the ops' implementations traced in has none of the ops a
    compiler must see through, computes what the program computes (output and the state it
    updates, from a state left by a dense step), and leaves the program itself as it was."""
    from astraea import engines, plugins, runtime
    from astraea.manifest import input_value
    from astraea.tokenwise import TensorStep, build_programs, signature, weight_tensors

    cfg = _cfg()
    model = loader.load_model(cfg)
    n = model.layout(cfg.video).video_tokens
    programs = build_programs(model, cfg, [n, n // 2], progress=False)
    kwargs = first_step_kwargs(model, cfg.video, cfg.sampling)
    table = plugins.decompositions()
    tp = programs[n // 2]
    before = tp.graph.code
    sig = signature(tp, kwargs)
    weights = weight_tensors(tp, sig.weights)
    args = [weights[k] for k in sig.weights] + [input_value(kwargs, s.name) for s in sig.inputs]
    state = runtime.empty_state(sig.state, model.device)
    with torch.no_grad():
        TensorStep(programs[n].graph, sig.layout)(*args, *state)  # the dense step fills the state
        graph = engines.inlined(tp.graph)
        assert sum(node.target in table for node in tp.graph.graph.nodes) >= 4 and tp.graph.code == before
        ep = torch.export.export(TensorStep(graph, sig.layout), tuple(args + [t.clone() for t in state]), strict=False)
        assert not any(node.target in table for node in ep.graph.nodes)
        mine, want = [t.clone() for t in state], [t.clone() for t in state]
        got = ep.module()(*args, *mine)[0]
        ref = TensorStep(tp.graph, sig.layout)(*args, *want)[0]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(mine, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert any((a != s).any() for a, s in zip(mine, state))  # the step updated the state


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
