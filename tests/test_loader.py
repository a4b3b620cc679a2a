"""Loading from local diffusers checkpoints (made here, tiny): text encoder, cache, VAE, errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    FlowMatchEulerDiscreteScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

from astraea import config, loader, reference
from astraea.conditioning import encode_prompt
from astraea.errors import AstraeaError, ConfigError
from astraea.families import get_family
from conftest import tiny_raw

WORDS = "<pad> </s> <unk> a red blue circle square moving left right growing over striped background blurry".split()


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _tiny_wan_pipeline() -> WanPipeline:
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    te = UMT5EncoderModel(UMT5Config(vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                     relative_attention_num_buckets=8)).eval()  # no dropout
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel.from_config(get_family("wan").presets["tiny"].config)
    return WanPipeline(tokenizer=tokenizer, text_encoder=te, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=2.0),
                       transformer=transformer).to(torch.float32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan-ckpt")
    pipe = _tiny_wan_pipeline()
    pipe.save_pretrained(folder)
    return folder, pipe


def _tiny_cogvideox_pipeline() -> CogVideoXPipeline:
    torch.manual_seed(0)
    te = T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)).eval()
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), latent_channels=16, layers_per_block=1, norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    transformer = CogVideoXTransformer3DModel.from_config(get_family("cogvideox").presets["tiny"].config)
    scheduler = get_family("cogvideox").make_scheduler("default", None, dict(transformer.config), None)
    return CogVideoXPipeline(tokenizer=_tokenizer(), text_encoder=te, vae=vae, transformer=transformer, scheduler=scheduler)


def test_cogvideox_checkpoint(tmp_path):
    source = _tiny_cogvideox_pipeline()
    source.save_pretrained(tmp_path / "ckpt")
    raw = tiny_raw("cogvideox")
    raw["model"].pop("preset")
    raw["model"]["checkpoint"] = str(tmp_path / "ckpt")
    cfg = config.from_dict(raw)
    model = loader.load_model(cfg)
    assert isinstance(model.scheduler, CogVideoXDDIMScheduler) and model.text_length == 16
    want, _ = source.encode_prompt(["a red circle"], do_classifier_free_guidance=False, max_sequence_length=16)
    torch.testing.assert_close(encode_prompt(model, "a red circle", None).embeds, want)
    ref = reference.run(cfg, model, tmp_path / "run", progress=False)
    strip = np.asarray(Image.open(ref.folder / "frames_p0_s0.png"))
    assert strip.shape == (cfg.video.height, 8 * cfg.video.width, 3)


def _cfg(folder, **sampling):
    raw = tiny_raw()
    raw["model"].pop("preset")
    raw["model"]["checkpoint"] = str(folder)
    raw["sampling"].update(sampling)
    return config.from_dict(raw)


def test_full_checkpoint_uses_its_own_components(checkpoint, tmp_path):
    folder, source = checkpoint
    model = loader.load_model(_cfg(folder))
    assert model.pipeline is not None and model.decoder is not None
    assert isinstance(model.scheduler, FlowMatchEulerDiscreteScheduler) and model.scheduler.config.shift == 2.0
    for (name, ours), theirs in zip(model.transformer.state_dict().items(), source.transformer.state_dict().values()):
        assert torch.equal(ours, theirs), name
    want, _ = source.encode_prompt(["a red circle"], do_classifier_free_guidance=False, max_sequence_length=model.text_length)
    got = encode_prompt(model, "a red circle", tmp_path)
    torch.testing.assert_close(got.embeds, want)
    pseudo = model.family.pseudo_condition("a red circle", dict(model.transformer.config), model.text_length)
    assert not torch.allclose(got.embeds, pseudo.embeds)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1


def test_embedding_cache_is_read_back(checkpoint, tmp_path, monkeypatch):
    model = loader.load_model(_cfg(checkpoint[0]))
    first = encode_prompt(model, "a blue square", tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("the text encoder ran although the embedding is cached")

    monkeypatch.setattr(type(model.family), "encode", refuse)
    torch.testing.assert_close(encode_prompt(model, "a blue square", tmp_path).embeds, first.embeds, rtol=0, atol=0)


def test_reference_decodes_frames(checkpoint, tmp_path):
    cfg = _cfg(checkpoint[0])
    ref = reference.run(cfg, loader.load_model(cfg), tmp_path, progress=False)
    strip = np.asarray(Image.open(ref.folder / "frames_p0_s0.png"))
    assert strip.shape == (cfg.video.height, 8 * cfg.video.width, 3)  # 9 decoded frames, 8 shown
    assert strip.std() > 0


def test_shift_override(checkpoint):
    model = loader.load_model(_cfg(checkpoint[0], shift=7.0))
    assert model.scheduler.config.shift == 7.0


def test_transformer_only_checkpoint(checkpoint, tmp_path):
    folder, _ = checkpoint
    shutil.copytree(folder / "transformer", tmp_path / "transformer")
    model = loader.load_model(_cfg(tmp_path))
    assert model.pipeline is None and model.decoder is None and model.encoder is None
    cond = encode_prompt(model, "a red circle", None)
    pseudo = model.family.pseudo_condition("a red circle", dict(model.transformer.config), model.text_length)
    torch.testing.assert_close(cond.embeds, pseudo.embeds)
    before = model.identity["weights"]
    weights = next((tmp_path / "transformer").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert loader.load_model(_cfg(tmp_path)).identity["weights"] != before


def test_corrupt_checkpoint_is_one_line(checkpoint, tmp_path):
    shutil.copytree(checkpoint[0] / "transformer", tmp_path / "transformer")
    weights = next((tmp_path / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated download
    with pytest.raises(AstraeaError, match=r"^model.checkpoint: cannot load .*transformer") as e:
        loader.load_model(_cfg(tmp_path))
    assert "\n" not in str(e.value)
    (tmp_path / "transformer" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"^model.checkpoint: .*config.json is not valid JSON") as e:
        _cfg(tmp_path)
    assert "\n" not in str(e.value)


def test_cuda_requested_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    cfg = config.from_dict(tiny_raw(model={"device": "cuda"}))
    with pytest.raises(AstraeaError, match="model.device: cuda was asked for but no CUDA device is visible"):
        loader.load_model(cfg)
