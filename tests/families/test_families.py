"""Each family's tiny model: shapes, token layout, determinism, and the diffusers pipeline as reference."""

from __future__ import annotations

import copy

import diffusers
import pytest
import torch

from astraea import loader
from astraea.conditioning import encode_prompt
from astraea.families import get_family
from astraea.families.base import pseudo_embedding
from astraea.sampling import denoise, make_inputs, prompt_inputs
from conftest import tiny_config


def _sample(cfg, model, prompt="a red circle moving left", seed=0):
    return denoise(model, cfg.video, cfg.sampling, prompt_inputs(model, cfg.video, cfg.sampling, prompt, seed))


def test_forward_shape_and_token_count(family_preset):
    family, preset = family_preset
    cfg = tiny_config(family, preset)
    model = loader.load_model(cfg)
    layout = model.layout(cfg.video)
    seen = {}
    first_block = getattr(model.transformer, model.family.block_containers[0])[0]
    first_block.register_forward_pre_hook(lambda m, args, kwargs: seen.update(x=(args or [kwargs["hidden_states"]])[0]), with_kwargs=True)
    out = _sample(cfg, model)
    assert out.shape == (1, *layout.latent_shape) and torch.isfinite(out).all()
    # the tokens the first block really receives are the video tokens the layout promises
    assert seen["x"].shape[1] == layout.video_tokens == layout.grid[0] * layout.grid[1] * layout.grid[2]
    assert layout.text_tokens == (model.text_length if model.family.joint_attention else 0)


def test_sampling_is_deterministic(family_preset):
    family, preset = family_preset
    cfg = tiny_config(family, preset)
    a = _sample(cfg, loader.load_model(cfg))
    b = _sample(cfg, loader.load_model(cfg))  # fresh weights from the same seed, fresh scheduler
    assert torch.equal(a, b)
    model = loader.load_model(cfg)
    assert not torch.allclose(a, _sample(cfg, model, seed=1))
    assert not torch.allclose(a, _sample(cfg, model, prompt="a blue square growing"))


def _pipeline_latents(cfg, model, prompt, negative, seed):
    """The family's own diffusers pipeline, given the same embeddings and a generator of the seed."""
    family = cfg.model.family
    pipe_cls = getattr(diffusers, model.family.pipeline_class)
    modules = {"scheduler": copy.deepcopy(model.scheduler), "transformer": model.transformer}
    if family == "hunyuan_video":
        modules.update(text_encoder_2=None, tokenizer_2=None)
    pipe = pipe_cls(tokenizer=None, text_encoder=None, vae=None, **modules)
    pipe.set_progress_bar_config(disable=True)
    v, s = cfg.video, cfg.sampling
    kwargs = dict(
        height=v.height, width=v.width, num_frames=v.frames, num_inference_steps=s.steps,
        generator=torch.Generator().manual_seed(seed), output_type="latent", return_dict=False,
        prompt_embeds=prompt.embeds, negative_prompt_embeds=negative.embeds,
    )
    if family == "hunyuan_video":
        kwargs.update(
            guidance_scale=s.embedded_guidance or 6.0, true_cfg_scale=s.guidance,
            pooled_prompt_embeds=prompt.pooled, prompt_attention_mask=prompt.mask,
            negative_pooled_prompt_embeds=negative.pooled, negative_prompt_attention_mask=negative.mask,
        )
    else:
        kwargs.update(guidance_scale=s.guidance)
    return pipe(**kwargs)[0].float()


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_matches_the_diffusers_pipeline(family_preset, guidance):
    family, preset = family_preset
    cfg = tiny_config(family, preset, sampling={"guidance": guidance, "negative_prompt": "blurry"})
    model = loader.load_model(cfg)
    prompt = encode_prompt(model, cfg.sampling.prompts[0], None)
    negative = encode_prompt(model, cfg.sampling.negative_prompt, None)
    inputs = make_inputs(model, cfg.video, cfg.sampling, prompt, negative, 0)
    ours = denoise(model, cfg.video, cfg.sampling, inputs)
    theirs = _pipeline_latents(cfg, model, prompt, negative, 0)
    assert ours.shape == theirs.shape
    err = (ours - theirs).norm() / theirs.norm()
    assert err < 1e-5, f"relative error {err:.2e} against {model.family.pipeline_class}"


def test_pseudo_embeddings():
    a, ma = pseudo_embedding("a red circle", 8, 16)
    b, _ = pseudo_embedding("a red circle", 8, 16)
    c, _ = pseudo_embedding("a blue circle", 8, 16)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[0], c[0]) and torch.equal(a[2], c[2])  # words are shared, position by position
    assert ma.tolist() == [1, 1, 1, 0, 0, 0, 0, 0] and a[3:].abs().sum() == 0
    empty, me = pseudo_embedding("", 8, 16)
    assert me.sum() == 1 and empty.abs().sum() == 0  # one masked-in zero row keeps pooling finite


# Real sizes, built on the meta device: published sizes and token counts (ASTRAEA.md, GPU.md).
REAL = [
    ("wan", "wan2.1-t2v-1.3b", (1.3e9, 1.5e9), (65, 480, 832), 26520, 0),
    ("wan", "wan2.1-t2v-1.3b", (1.3e9, 1.5e9), (81, 480, 832), 32760, 0),
    ("wan", "wan2.1-t2v-14b", (13.5e9, 15e9), (81, 720, 1280), 75600, 0),
    ("cogvideox", "cogvideox-2b", (1.5e9, 2.1e9), (49, 480, 720), 17550, 226),
    ("cogvideox", "cogvideox-5b", (5.0e9, 6.0e9), (49, 480, 720), 17550, 226),
    ("hunyuan_video", "hunyuanvideo", (12e9, 14e9), (129, 544, 960), 67320, 256),
]


@pytest.mark.parametrize("family,preset,params,video,tokens,text", REAL, ids=[f"{r[1]}-{r[3][0]}f" for r in REAL])
def test_real_size_presets(family, preset, params, video, tokens, text):
    fam = get_family(family)
    p = fam.preset(preset)
    model = fam.build_random(p, torch.device("meta"), torch.bfloat16, 0)
    n = sum(x.numel() for x in model.parameters())
    assert params[0] < n < params[1]
    keep = tuple(model._keep_in_fp32_modules or ())
    for name, x in model.named_parameters():
        want = torch.float32 if any(k in name.split(".") for k in keep) else torch.bfloat16
        assert x.dtype == want, name
    cfg = tiny_config(family, preset, video=dict(zip(("frames", "height", "width"), video)))
    layout = fam.token_layout(p.config, cfg.video, p.text_length)
    assert (layout.video_tokens, layout.text_tokens) == (tokens, text)
    assert layout.video_offset == (text if family == "cogvideox" else 0)
