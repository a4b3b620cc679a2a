"""The hand-wired token-wise Wan block against the oracle of ASTRAEA.md section 1."""

from __future__ import annotations

import pytest
import torch

from astraea import loader
from astraea.handwired import BlockState, wan_block_tokenwise
from astraea.sampling import first_step_kwargs
from conftest import block_calls, tiny_config


@pytest.mark.parametrize("budget", [1.0, 0.5, 0.13])
def test_selected_rows_are_the_dense_rows_and_the_rest_is_cache(budget):
    cfg = tiny_config("wan", "tiny", video={"frames": 9, "height": 48, "width": 64})
    model = loader.load_model(cfg)
    block = model.transformer.blocks[0]
    call = block_calls(model, first_step_kwargs(model, cfg.video, cfg.sampling))[0][0]
    x0, enc, temb, rope = (call[k] for k in ("hidden_states", "encoder_hidden_states", "temb", "rotary_emb"))
    n = x0.shape[1]
    k = max(1, round(budget * n))
    state = BlockState.empty(x0)
    with torch.no_grad():
        dense0 = block(x0, enc, temb, rope)
        out0 = wan_block_tokenwise(block, x0, enc, temb, rope, state, n)  # the first step is dense
        torch.testing.assert_close(out0, dense0, atol=1e-5, rtol=1e-5)
        for step in range(1, 4):  # later steps: new inputs, k rows recomputed
            x = x0 + 0.1 * step * torch.randn_like(x0)
            before = state.cache.clone()
            skips_before = state.skips.clone()
            out = wan_block_tokenwise(block, x, enc, temb, rope, state, k)
            dense = block(x, enc, temb, rope)
            fresh = state.skips == 0
            assert fresh.sum(dim=1).tolist() == [k, k]
            torch.testing.assert_close(out[fresh], dense[fresh], atol=1e-5, rtol=1e-5)
            assert torch.equal(out[~fresh], before[~fresh])  # bit-identical cache rows
            assert torch.equal(state.skips[~fresh], skips_before[~fresh] + 1)
            assert torch.equal(state.ref[fresh], x[fresh])
