"""The token-wise rewrite against the dense model and the oracle of ASTRAEA.md section 1
(selected rows = the dense block's rows on the same full input; the others = the block's
cache), over two steps, for Wan (self + cross attention) and CogVideoX (joint [text; video]
attention, with and without rotary tables)."""

from __future__ import annotations

import pytest
import torch

from astraea import loader
from astraea.capture import capture
from astraea.passes import pipeline
from conftest import block_calls, tiny_config

SDPA = torch.ops.aten.scaled_dot_product_attention.default
VIDEO = {"frames": 9, "height": 48, "width": 64}


def _rewritten(family, preset, k):
    cfg = tiny_config(family, preset, video=VIDEO)
    model = loader.load_model(cfg)
    cap = capture(model, cfg)
    gm = cap.program.graph_module
    ctx = pipeline.PassContext(model.family, cap.layout, budget=k)
    pipeline.run(gm, ctx)
    return model, cap, gm, ctx


def _run(cap, gm, example, state):
    flat = cap.program._graph_module_flat_inputs((), example)
    with torch.no_grad():
        out = gm(*flat, *state)
    return out[0], list(out[1:])


def _zero_state(x, blocks):
    b, n, d = x.shape
    one = [torch.zeros(b, n, d), torch.zeros(b, n), torch.zeros(b, n, d), torch.zeros(b, n, dtype=torch.int32)]
    return [t.clone() for _ in range(blocks) for t in one]


@pytest.mark.parametrize("family,preset", [("wan", "tiny"), ("cogvideox", "tiny"), ("cogvideox", "tiny-rotary"), ("hunyuan_video", "tiny")])
@pytest.mark.parametrize("budget", [1.0, 0.5, 0.09])
def test_rewrite_follows_the_oracle_over_two_steps(family, preset, budget):
    probe = tiny_config(family, preset, video=VIDEO)
    n = loader.load_model(probe).layout(probe.video).video_tokens
    k = max(1, round(budget * n))
    _, cap_dense, gm_dense, _ = _rewritten(family, preset, n)  # step 0 is always dense
    model, cap, gm, ctx = _rewritten(family, preset, k)
    assert not [x for x in gm.graph.nodes if x.target is SDPA and x.meta.get("astraea_attention") == "self"]
    blocks = [b for name in model.family.block_containers for b in getattr(model.transformer, name)]
    ex0 = cap.example
    calls0, want0 = block_calls(model, ex0)
    out0, state = _run(cap_dense, gm_dense, ex0, _zero_state(calls0[0]["hidden_states"], len(blocks)))
    torch.testing.assert_close(out0, want0, atol=1e-5, rtol=1e-5)  # budget N == the dense model
    ex1 = dict(ex0, hidden_states=ex0["hidden_states"] + 0.3 * torch.randn_like(ex0["hidden_states"]),
               timestep=(ex0["timestep"] * 0.9).to(ex0["timestep"].dtype))
    calls, _ = block_calls(model, ex1)
    out1, new_state = _run(cap, gm, ex1, [t.clone() for t in state])
    chain = {}  # the token-wise run's own stream: block inputs are the previous caches
    for b, block in enumerate(blocks):
        call = {**calls[b], **chain}
        cache_old, skips_old = state[4 * b], state[4 * b + 3]
        cache, lse, ref, skips = new_state[4 * b: 4 * b + 4]
        with torch.no_grad():
            dense = block(**call)
        dense_video = dense[0] if isinstance(dense, tuple) else dense
        fresh = skips == 0
        assert fresh.sum(dim=1).tolist() == [k, k]
        torch.testing.assert_close(cache[fresh], dense_video[fresh], atol=1e-5, rtol=1e-5)
        assert torch.equal(cache[~fresh], cache_old[~fresh])
        assert torch.equal(skips[~fresh], skips_old[~fresh] + 1)
        assert torch.equal(ref[fresh], call["hidden_states"][fresh])
        chain["hidden_states"] = cache  # the next block reads the full cache ...
        if isinstance(dense, tuple):
            chain["encoder_hidden_states"] = dense[1]  # ... and the text rows, always recomputed
