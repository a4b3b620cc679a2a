"""The token-wise rewrite of the tiny Wan model against the dense model and the oracle of
ASTRAEA.md section 1 (selected rows = the dense block's rows on the same full input; the
others = the block's cache), over two steps."""

from __future__ import annotations

import pytest
import torch

from astraea import loader
from astraea.capture import capture
from astraea.passes import pipeline
from conftest import tiny_config

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _rewritten(k):
    cfg = tiny_config("wan", "tiny", video={"frames": 9, "height": 48, "width": 64})
    model = loader.load_model(cfg)
    cap = capture(model, cfg)
    gm = cap.program.graph_module
    ctx = pipeline.PassContext(model.family, cap.layout, budget=k)
    pipeline.run(gm, ctx)
    return model, cap, gm, ctx


def _block_args(model, example):
    """Block 0's real arguments (its input, text, time embedding, rotary tables) in eager."""
    seen = {}
    handle = model.transformer.blocks[0].register_forward_pre_hook(lambda m, a: seen.update(args=a))
    with torch.no_grad():
        out = model.transformer(**example)[0]
    handle.remove()
    return seen["args"], out


def _run(cap, gm, example, state):
    flat = cap.program._graph_module_flat_inputs((), example)
    with torch.no_grad():
        out = gm(*flat, *state)
    return out[0], list(out[1:])


def _zero_state(x, blocks):
    b, n, d = x.shape
    one = [torch.zeros(b, n, d), torch.zeros(b, n), torch.zeros(b, n, d), torch.zeros(b, n, dtype=torch.int32)]
    return [t.clone() for _ in range(blocks) for t in one]



@pytest.mark.parametrize("budget", [1.0, 0.5, 0.09])
def test_rewrite_follows_the_oracle_over_two_steps(budget):
    probe = tiny_config("wan", "tiny", video={"frames": 9, "height": 48, "width": 64})
    n = loader.load_model(probe).layout(probe.video).video_tokens
    k = max(1, round(budget * n))
    dense_model, cap_dense, gm_dense, _ = _rewritten(n)  # step 0 is always dense
    model, cap, gm, ctx = _rewritten(k)
    assert not [x for x in gm.graph.nodes if x.target is SDPA and x.meta.get("astraea_attention") == "self"]
    ex0 = cap.example
    (x0, enc, temb, rope), want0 = _block_args(model, ex0)
    out0, state = _run(cap_dense, gm_dense, ex0, _zero_state(x0, 2))
    torch.testing.assert_close(out0, want0, atol=1e-5, rtol=1e-5)  # budget N == the dense model
    ex1 = dict(ex0, hidden_states=ex0["hidden_states"] + 0.3 * torch.randn_like(ex0["hidden_states"]),
               timestep=ex0["timestep"] * 0.9)
    (x1, enc1, temb1, rope1), _ = _block_args(model, ex1)
    out1, new_state = _run(cap, gm, ex1, [t.clone() for t in state])
    block_in = x1
    for b in range(2):
        cache_old, skips_old = state[4 * b], state[4 * b + 3]
        cache, lse, ref, skips = new_state[4 * b: 4 * b + 4]
        with torch.no_grad():
            dense = model.transformer.blocks[b](block_in, enc1, temb1, rope1)
        fresh = skips == 0
        assert fresh.sum(dim=1).tolist() == [k, k]
        torch.testing.assert_close(cache[fresh], dense[fresh], atol=1e-5, rtol=1e-5)
        assert torch.equal(cache[~fresh], cache_old[~fresh])
        assert torch.equal(skips[~fresh], skips_old[~fresh] + 1)
        assert torch.equal(ref[fresh], block_in[fresh])
        block_in = cache  # the next block reads the full cache
