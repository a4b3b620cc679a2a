"""Sampling with rewritten programs: budget N equals the dense model over a whole run; mixed
schedules with skipped steps run; the rewritten program re-exports and round-trips .pt2."""

from __future__ import annotations

import pytest
import torch

from astraea import loader
from astraea.sampling import denoise, prompt_inputs
from astraea.tokenwise import TokenwiseTransformer, rewrite
from conftest import tiny_config


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config("wan", "tiny", sampling={"steps": 5})
    model = loader.load_model(cfg)
    n = model.layout(cfg.video).video_tokens
    programs = {k: rewrite(model, cfg, k) for k in (n, n // 2, 3)}
    return cfg, model, n, programs


def _sample(cfg, model, transformer=None):
    inputs = prompt_inputs(model, cfg.video, cfg.sampling, cfg.sampling.prompts[0], 0)
    return denoise(model, cfg.video, cfg.sampling, inputs, transformer=transformer)


@pytest.mark.parametrize("family,preset", [("wan", "tiny"), ("cogvideox", "tiny-rotary"), ("hunyuan_video", "tiny")])
def test_full_budget_run_equals_the_dense_model(family, preset):
    cfg = tiny_config(family, preset, sampling={"steps": 4})
    model = loader.load_model(cfg)
    n = model.layout(cfg.video).video_tokens
    dense = _sample(cfg, model)
    tokenwise = _sample(cfg, model, TokenwiseTransformer({n: rewrite(model, cfg, n)}, [n] * cfg.sampling.steps))
    torch.testing.assert_close(tokenwise, dense, atol=1e-5, rtol=1e-5)


def test_pass_counts_on_wan(setup):
    """Expected and unexpected ops, exactly: 2 blocks, each one selection, one query-only
    attention (the cross-attention keeps SDPA), four gathers and its state in and out."""
    cfg, model, n, programs = setup
    stats = programs[3].stats
    assert stats["annotate_blocks"] == {"blocks": 2, "self_attention": 2, "cross_attention": 2}
    assert stats["insert_selection"] == {"selections": 2, "state_inputs": 8}
    assert stats["gather_subset"]["gathers"] == 8
    assert stats["replace_attention"] == {"sparse_attention": 2}
    assert stats["write_cache"] == {"caches": 2, "state_outputs": 8}
    assert stats["cleanup"]["marks_removed"] == 2 * 3  # a token mark and two rotary tables a block
    targets = [str(x.target) for x in programs[3].graph.graph.nodes if x.op == "call_function"]
    assert targets.count("astraea.token_select.default") == 2
    assert targets.count("astraea.sparse_attention.default") == 2
    assert targets.count("aten.scaled_dot_product_attention.default") == 2
    assert not [t for t in targets if "token_mark" in t or "token_table" in t]


def test_mixed_schedule_with_a_skipped_step(setup):
    cfg, model, n, programs = setup
    runner = TokenwiseTransformer(programs, [n, n // 2, 0, 3, n // 2])
    out = _sample(cfg, model, runner)
    assert runner.step == 5 and torch.isfinite(out).all()
    assert not torch.allclose(out, _sample(cfg, model))  # it did skip work
    with pytest.raises(ValueError, match="first step must be dense"):
        TokenwiseTransformer(programs, [3, n])
    with pytest.raises(ValueError, match="no program for budgets \\[7\\]"):
        TokenwiseTransformer(programs, [n, 7])


def test_rewritten_program_reexports_and_round_trips(setup, tmp_path):
    cfg, model, n, programs = setup
    tp = programs[3]
    from astraea.sampling import first_step_kwargs

    flat = tp.flat_inputs(first_step_kwargs(model, cfg.video, cfg.sampling))
    state = TokenwiseTransformer._empty_state(tp, flat)
    want = tp.graph(*flat, *state)
    ep = torch.export.export(tp.graph, (*flat, *state))
    targets = {str(x.target) for x in ep.graph.nodes if x.op == "call_function"}
    assert {"astraea.token_select.default", "astraea.sparse_attention.default"} <= targets
    assert "aten.scaled_dot_product_attention.default" in targets  # the cross-attention keeps SDPA
    torch.export.save(ep, tmp_path / "k3.pt2")
    got = torch.export.load(tmp_path / "k3.pt2").module()(*flat, *state)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert tp.stats["replace_attention"] == {"sparse_attention": 2}


def test_one_capture_rewrites_at_several_budgets(setup):
    """rewrite(captured=...) copies the captured graph: the capture stays unchanged and each
    budget's program samples exactly like a program from its own fresh capture."""
    from astraea.capture import capture

    cfg, model, n, programs = setup
    cap = capture(model, cfg)
    before = len(cap.program.graph_module.graph.nodes)
    shared = {k: rewrite(model, cfg, k, captured=cap) for k in (n, n // 2)}
    assert len(cap.program.graph_module.graph.nodes) == before
    assert shared[n // 2].stats == programs[n // 2].stats
    schedule = [n, n // 2, n // 2, n, n // 2]
    got = _sample(cfg, model, TokenwiseTransformer(shared, schedule))
    want = _sample(cfg, model, TokenwiseTransformer({k: programs[k] for k in (n, n // 2)}, schedule))
    assert torch.equal(got, want)
