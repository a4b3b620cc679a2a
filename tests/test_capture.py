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
