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
from astraea.sampling import denoise, first_step_kwargs, prompt_inputs


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


def _one_call(case) -> torch.Tensor:
    """The transformer's output at the first step: the same before a peer and after its close()
    (hooks removed, blocks restored)."""
    cfg, model, inputs, _ = case
    with torch.no_grad():  # the families' kwargs ask for a tuple (return_dict=False), as sampling calls it
        return model.transformer(**first_step_kwargs(model, cfg.video, cfg.sampling, inputs))[0]


def test_a_peer_that_skips_nothing_is_dense(case):
    before = _one_call(case)
    got = _sample(case, "first_block_cache", threshold=0.0)
    torch.testing.assert_close(got, case[3], atol=1e-5, rtol=1e-5)
    assert torch.equal(_one_call(case), before)  # close() removed the hooks


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


def _forced_every_step_is_dense(case):
    before = _one_call(case)
    got, _ = _toca(case, interval=1, cross=1)
    torch.testing.assert_close(got, case[3], atol=1e-5, rtol=1e-5)
    assert torch.equal(_one_call(case), before)  # close() restored the blocks


def test_toca_every_step_forced_is_dense(case):
    _forced_every_step_is_dense(case)


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


def test_toca_roles_cover_every_family_and_refuse_others():
    from astraea.schema import TOCA_FAMILIES, peer_refusal
    from astraea.toca import ROLES, ToCa

    assert set(ROLES) == set(TOCA_FAMILIES) == set(registry_names())
    with pytest.raises(ValueError, match="toca is defined for the wan, opensora, cogvideox, hunyuan_video families' blocks, "
                                         "not 'pixart'"):
        ToCa(torch.nn.Module(), "pixart", ("blocks",), steps=4)
    assert peer_refusal("toca", "pixart") == ("toca is defined for wan, opensora, cogvideox, hunyuan_video blocks, not "
                                              "pixart's: drop it")


def registry_names():
    from astraea.families.base import FAMILIES

    return FAMILIES.names()


JOINT = [("cogvideox", "tiny"), ("cogvideox", "tiny-rotary"), ("hunyuan_video", "tiny")]


def _joint_case(family, preset):
    """A joint-attention family's tiny model, 8 steps, and its dense sample."""
    from conftest import tiny_config

    cfg = tiny_config(family, preset, sampling={"steps": 8})
    model = loader.load_model(cfg)
    inputs = prompt_inputs(model, cfg.video, cfg.sampling, cfg.sampling.prompts[0], 0)
    return cfg, model, inputs, denoise(model, cfg.video, cfg.sampling, inputs)


@pytest.fixture(scope="module", params=JOINT, ids=["-".join(j) for j in JOINT])
def joint(request):
    return _joint_case(*request.param)


def test_toca_on_joint_attention_forced_every_step_is_dense(joint):
    _forced_every_step_is_dense(joint)


def test_toca_on_joint_attention_computes_its_published_rows(joint):
    """8 steps, the published setting: the joint attention whole at steps 0-3 and 6, the MLPs
    (and HunyuanVideo's single-stream output projections) whole then, at steps 4, 5 and 7 on
    the text rows and int(0.1 x 1.495 x N) video rows; HunyuanVideo's dual-stream MLP sees
    video rows only."""
    cfg, model, inputs, dense = joint
    got, rows = _toca(joint)
    n, b = model.layout(cfg.video).video_tokens, 2 if inputs.cfg else 1
    text = first_step_kwargs(model, cfg.video, cfg.sampling, inputs)["encoder_hidden_states"].shape[1]
    k = int(0.1 * (1 + 0.33 * 1.5) * n)
    t = model.transformer
    if model.family.name == "cogvideox":
        per_batch = len(t.transformer_blocks) * (5 * n + 5 * (n + text) + 3 * (k + text))
    else:
        dual = len(t.transformer_blocks) * (5 * n + 5 * n + 3 * k)
        per_batch = dual + len(t.single_transformer_blocks) * (5 * n + 2 * (5 * (n + text) + 3 * (k + text)))
    assert rows == b * per_batch
    rel = ((got - dense).norm() / dense.norm()).item()
    assert torch.isfinite(got).all() and 1e-6 < rel < 1.0, rel


def test_toca_single_stream_projection_is_exact_token_wise(monkeypatch):
    """HunyuanVideo's single-stream output projection recomputed on the MLP's rows only gives
    what projecting every row gives (its other rows' inputs did not change)."""
    from astraea import toca

    joint = _joint_case("hunyuan_video", "tiny")
    rowwise, _ = _toca(joint)
    single = dict(toca.ROLES["hunyuan_video"]["single_transformer_blocks"])
    del single["proj_out"]
    monkeypatch.setitem(toca.ROLES["hunyuan_video"], "single_transformer_blocks", single)
    whole, _ = _toca(joint)
    torch.testing.assert_close(rowwise, whole, atol=1e-5, rtol=1e-5)


def test_joint_text_map_is_the_processors_attention_over_the_text(joint, monkeypatch):
    """Each block's map = the attention probabilities of the processor's own queries and keys
    (recorded at its SDPA call), computed in float64, at the video queries and text keys,
    renormalised over the text, the head mean."""
    from astraea.toca import joint_text_map

    cfg, model, inputs, _ = joint
    seen, maps = [], []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def record(*args, **kw):  # diffusers' dispatcher calls it with query=, key=, value=
        named = dict(zip(("query", "key", "value"), args)) | kw
        seen.append((named["query"].detach(), named["key"].detach(), named.get("attn_mask")))
        return sdpa(*args, **kw)

    def wrap(attn):
        forward = attn.forward

        def hooked(*args, **kwargs):
            maps.append(joint_text_map(attn, kwargs["hidden_states"], kwargs["encoder_hidden_states"],
                                       kwargs.get("image_rotary_emb"), kwargs.get("attention_mask")))
            return forward(*args, **kwargs)
        monkeypatch.setattr(attn, "forward", hooked)

    t = model.transformer
    for block in [*t.transformer_blocks, *getattr(t, "single_transformer_blocks", [])]:
        wrap(block.attn1 if hasattr(block, "attn1") else block.attn)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", record)
    kwargs = first_step_kwargs(model, cfg.video, cfg.sampling, inputs)
    with torch.no_grad():
        t(**kwargs)
    seen = seen[-len(maps):]  # HunyuanVideo's token refiner attends first
    n = model.layout(cfg.video).video_tokens
    text = kwargs["encoder_hidden_states"].shape[1]
    video_first = model.family.name == "hunyuan_video"
    assert len(maps) == len(seen) > 0
    for got, (q, k, mask) in zip(maps, seen):
        q, k = q.double(), k.double()  # (B, H, S, D), S = N + L
        s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if mask is not None:
            s = s.masked_fill(~mask.bool(), float("-inf"))
        p = torch.softmax(s, dim=-1)
        vid, txt = (slice(0, n), slice(n, n + text)) if video_first else (slice(text, text + n), slice(0, text))
        p = p[:, :, vid, txt]
        want = (p / p.sum(-1, keepdim=True)).mean(1)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
