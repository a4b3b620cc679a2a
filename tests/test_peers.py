"""The peers diffusers ships, applied as their pipelines apply them (astraea.peers): on the
bundled model each one's cache engages (its sample leaves the dense one, finite and
correlated with it) under settings that skip work, and a setting that skips nothing gives
the dense sample. How close each gets at equal speed is astraea-bench's measurement (at 8
steps TaylorSeer's extrapolation is far from dense: relative error 0.8)."""

from __future__ import annotations

import pytest
import torch

from astraea import config, loader
from astraea.peers import PeerTransformer
from astraea.sampling import denoise, prompt_inputs


@pytest.fixture(scope="module")
def case():
    cfg = config.bundled_config(["a red circle moving left over a striped background"], steps=8)
    model = loader.load_model(cfg)
    inputs = prompt_inputs(model, cfg.video, cfg.sampling, cfg.sampling.prompts[0], 0)
    return cfg, model, inputs, denoise(model, cfg.video, cfg.sampling, inputs)


def _sample(case, name, **knobs):
    cfg, model, inputs, _ = case
    peer = PeerTransformer(model.transformer, name, model.family.block_containers, **knobs)
    try:
        return denoise(model, cfg.video, cfg.sampling, inputs, peer)
    finally:
        peer.close()


@pytest.mark.parametrize("name,knobs", [("pab", {"skip": 2}), ("first_block_cache", {"threshold": 0.3}),
                                        ("taylorseer", {"interval": 2, "warmup": 3}), ("faster_cache", {"skip": 2})])
def test_each_peer_engages_and_stays_close(case, name, knobs):
    dense = case[3]
    got = _sample(case, name, **knobs)
    rel = ((got - dense).norm() / dense.norm()).item()
    assert torch.isfinite(got).all() and 1e-6 < rel < 1.0, rel


def test_a_peer_that_skips_nothing_is_dense(case):
    got = _sample(case, "first_block_cache", threshold=0.0)
    torch.testing.assert_close(got, case[3], atol=1e-5, rtol=1e-5)
    cfg, model, inputs, dense = case
    torch.testing.assert_close(denoise(model, cfg.video, cfg.sampling, inputs), dense)  # close() removed the hooks


def test_mag_cache_calibrates_then_skips(case):
    """MagCache's ratios come from a calibrating dense sample (one a step, the first 1.0);
    with them and a generous threshold it skips steps and stays close to dense."""
    from astraea.peers import calibrate_mag_cache

    cfg, model, inputs, dense = case
    ratios = calibrate_mag_cache(model.transformer, model.family.block_containers, cfg.sampling.steps,
                                 lambda peer: denoise(model, cfg.video, cfg.sampling, inputs, peer))
    assert len(ratios) == cfg.sampling.steps and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    got = _sample(case, "mag_cache", threshold=0.5, retention=0.2, steps=cfg.sampling.steps, ratios=ratios)
    rel = ((got - dense).norm() / dense.norm()).item()
    assert torch.isfinite(got).all() and 1e-6 < rel < 1.0, rel


@pytest.mark.parametrize("text,error", [("pabx skip=2", "unknown peer"), ("pab skip", "takes skip="),
                                        ("pab skip=two", "is not a int"), ("mag_cache interval=2", "takes threshold=")])
def test_settings_are_parsed_with_errors_that_name_the_fix(text, error):
    from astraea.peers import parse_setting

    assert parse_setting("pab skip=2 cross=6") == ("pab", {"skip": 2, "cross": 6})
    with pytest.raises(ValueError, match=error):
        parse_setting(text)


def _toca(case, **knobs):
    from astraea.peers import make

    cfg, model, inputs, _ = case
    peer = make(model, "toca", steps=cfg.sampling.steps, cfg=inputs.cfg, **knobs)
    try:
        return denoise(model, cfg.video, cfg.sampling, inputs, peer), peer.state.computed_rows
    finally:
        peer.close()


def test_toca_every_step_forced_is_dense(case):
    cfg, model, inputs, dense = case
    got, _ = _toca(case, interval=1, cross=1)
    torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(denoise(model, cfg.video, cfg.sampling, inputs), dense)  # close() restored the blocks


def test_toca_computes_what_its_published_setting_says(case):
    """8 steps at ratio 0.1, cycles 3 / 6 / 3, the first 3 full: self-attention and MLP whole
    at steps 0-3 and 6, cross-attention at 0-2 and 6 (its fresh ratio is under zero), and
    int(0.1 x 1.495 x N) MLP rows at steps 4, 5 and 7, one choice for both CFG branches."""
    cfg, model, inputs, dense = case
    got, rows = _toca(case)
    n = model.layout(cfg.video).video_tokens
    b = 2 if inputs.cfg else 1
    layers = len(model.transformer.blocks)
    k = int(0.1 * (1 + 0.33 * 1.5) * n)
    assert rows == layers * b * (5 * n + 4 * n + 5 * n + 3 * k)
    rel = ((got - dense).norm() / dense.norm()).item()
    assert torch.isfinite(got).all() and 1e-6 < rel < 1.0, rel


def test_toca_is_refused_where_blocks_attend_jointly():
    from astraea.schema import TOCA_FAMILIES
    from astraea.toca import ROLES, ToCa
    from conftest import tiny_config

    assert set(ROLES) == set(TOCA_FAMILIES)
    with pytest.raises(ValueError, match="toca is defined for the wan, opensora families' blocks .* not 'cogvideox'"):
        ToCa(torch.nn.Module(), "cogvideox", ("transformer_blocks",), steps=4)
    with pytest.raises(config.ConfigError, match=r"bench.peers\[1\]: toca is defined for wan, opensora blocks, not cogvideox's"):
        tiny_config("cogvideox", "tiny", bench={"peers": ["pab skip=2", "toca"]})
    tiny_config("cogvideox", "tiny")  # the default list holds toca: astraea-bench leaves it out there
