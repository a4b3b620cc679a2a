"""Capture: a functional exported graph at static shapes that computes what eager computes."""

from __future__ import annotations

import torch

from astraea import loader
from astraea.capture import capture
from astraea.sampling import first_step_kwargs
from conftest import tiny_config


def test_captured_graph_equals_eager_and_is_functional(family_preset):
    family, preset = family_preset
    cfg = tiny_config(family, preset)
    model = loader.load_model(cfg)
    with torch.no_grad():  # eager before capture touches the model (CogVideoX stores its table)
        want = model.transformer(**first_step_kwargs(model, cfg.video, cfg.sampling))[0]
    captured = capture(model, cfg)
    nodes = list(captured.program.graph.nodes)
    sdpa = [n for n in nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert sdpa, "SDPA must stay one node"
    assert not [n for n in nodes if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable]
    with torch.no_grad():
        got = captured.program.module()(**captured.example)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_each_block_token_stream_is_marked_once(family_preset):
    from astraea.passes import pipeline

    family, preset = family_preset
    cfg = tiny_config(family, preset)
    model = loader.load_model(cfg)
    cap = capture(model, cfg)
    gm = cap.program.graph_module
    pipeline.run(gm, pipeline.PassContext(model.family, cap.layout), [("annotate_blocks", pipeline.annotate_blocks)])
    marks = [n for n in gm.graph.nodes if n.target is torch.ops.astraea.token_mark.default]
    names = [f"{c}.{j}" for c in model.family.block_containers for j in range(len(getattr(model.transformer, c)))]
    assert [m.args[1] for m in marks] == list(range(len(names)))
    for mark in marks:
        assert mark.meta["val"].shape[1] == cap.layout.video_tokens  # asserted, never used to find it
        assert {u.meta.get("astraea_block") for u in mark.users} == {names[mark.args[1]]}  # its own block only
