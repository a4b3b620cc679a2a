"""The bundled reference model: data, codec, text encoder, judge, golden sample, training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from astraea import bundled, config, loader
from astraea.bundled import codec, data, judge
from astraea.bundled.text import TextEncoder
from astraea.sampling import denoise, prompt_inputs

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = {"wan": bundled.WEIGHTS, "opensora": bundled.STDIT3_WEIGHTS}  # the shipped file of each family
GOLDEN = {"wan": Path(__file__).with_name("golden_p0_s0_4steps.safetensors"),
          "opensora": Path(__file__).with_name("golden_stdit3_p0_s0_4steps.safetensors")}
PROMPT = "a red circle moving left over a striped background"


def _tool(name: str):
    """tools/<name>.py as a module, in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scenes_are_seeded_and_captions_say_what_is_drawn():
    a, b = data.scenes_for(7, 20), data.scenes_for(7, 20)
    assert a == b and a != data.scenes_for(8, 20)
    for scene in a:
        words = scene.caption.split()
        assert words[-1] == "background" and scene.background in words
        assert all(s.colour in words and s.shape in words for s in scene.shapes)
        assert set(words) <= set(data.vocabulary())
    video = data.render(a[:3], 9, 32)
    assert video.shape == (3, 3, 9, 32, 32) and video.min() >= -1 and video.max() <= 1
    assert torch.equal(video, data.render(a[:3], 9, 32))


def test_codec_is_invertible_and_has_the_adapter_geometry():
    video = torch.rand(2, 3, 17, 64, 64) * 2 - 1
    latents = codec.encode(video)
    assert latents.shape == (2, codec.CHANNELS, 9, 32, 32)
    assert torch.equal(codec.decode(latents), video)
    with pytest.raises(ValueError, match="2k\\+1"):
        codec.encode(torch.zeros(1, 3, 16, 64, 64))


def test_text_encoder_pads_and_masks():
    enc = TextEncoder(8, 6)
    ids = enc.tokenize(["a red circle zebra", ""])
    assert ids[0, :4].tolist() == [enc.index["a"], enc.index["red"], enc.index["circle"], 1] and ids[0, 4:].sum() == 0
    out = enc(["a red circle", ""])
    assert out[1].abs().sum() == 0 and out[0, 3:].abs().sum() == 0 and out[0, :3].abs().sum() > 0


@pytest.mark.parametrize("motion", ["moving left", "moving right", "moving up", "moving down", "growing", "shrinking"])
def test_judge_on_rendered_truth(motion):
    scene = data.Scene((data.Shape("red", "square", motion, 0.0, 0.0, 0.26),), "striped", 0, 0.0)
    video = data.render([scene], 17, 64)[0]
    assert judge.judge(video, scene.caption).passed
    opposite = {"moving left": "moving right", "moving right": "moving left", "moving up": "moving down",
                "moving down": "moving up", "growing": "shrinking", "shrinking": "growing"}[motion]
    assert not judge.judge(video, scene.caption.replace(motion, opposite)).passed
    assert not judge.judge(video, scene.caption.replace("red", "blue")).colour


def _bundled_config(steps=4, family="wan"):
    return config.bundled_config([PROMPT], steps, family=family)


def _sample(cfg, model):
    inputs = prompt_inputs(model, cfg.video, cfg.sampling, PROMPT, 0)
    return denoise(model, cfg.video, cfg.sampling, inputs)


@pytest.mark.parametrize("family", ["wan", "opensora"])
def test_bundled_preset_samples_the_golden_output(family):
    """Each shipped model (Wan's and the STDiT3 one) samples the stored 4-step output of its file."""
    cfg = _bundled_config(family=family)
    model = loader.load_model(cfg)
    assert model.layout(cfg.video).video_tokens == 2304 and model.identity["weights"] != "random"
    out = _sample(cfg, model)
    assert torch.equal(out, _sample(cfg, model))  # deterministic
    golden = load_file(str(GOLDEN[family]))["latents"]
    err = (out - golden).norm() / golden.norm()
    assert err < 1e-4, f"relative error {err:.2e} against the stored golden sample"


def test_the_card_tool_writes_the_golden_sample_the_test_pins(tmp_path):
    """tools/reference_card.py --golden (run when new weights ship) writes what the golden test
    compares against: for the shipped Wan model, its stored file."""
    card = _tool("reference_card")
    assert card.PROMPTS[0] == PROMPT
    card.main(["--golden", str(tmp_path / "golden.safetensors")])
    written = load_file(str(tmp_path / "golden.safetensors"))["latents"]
    golden = load_file(str(GOLDEN["wan"]))["latents"]
    assert (written - golden).norm() / golden.norm() < 1e-4


@pytest.mark.parametrize("family", ["wan", "opensora"])
def test_bundled_weights_are_small_and_complete(family):
    weights = WEIGHTS[family]
    assert weights.stat().st_size < 25 * 2**20
    tstate, xstate = bundled.split_state(load_file(str(weights)))
    assert set(xstate) == {"embed.weight", "position"}
    params = dict(loader.load_model(_bundled_config(family=family)).transformer.named_parameters())
    assert set(tstate) >= set(params) and len(params) > 0


@pytest.mark.parametrize("family", ["wan", "opensora"])
def test_training_resumes_to_the_same_weights(tmp_path, family):
    """tools/train_reference.py, in this process: 3 steps straight equal 2 steps, stopped,
    then resumed to 3 (the optimizer, EMA and data order restored); for both architectures."""
    train = _tool("train_reference")
    args = ["--device", "cpu", "--batch", "1", "--pool", "2", "--log-every", "1", "--warmup", "2", "--decay-steps", "4",
            "--family", family]
    weights = WEIGHTS[family].name
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main([*args, "--out", str(straight), "--steps", "3"])
    train.main([*args, "--out", str(resumed), "--steps", "2"])
    if family == "opensora":  # a checkpoint resumes only at the noise levels it was trained at
        with pytest.raises(SystemExit, match="pass its --transform-scale"):
            train.main([*args, "--out", str(resumed), "--steps", "3", "--resume", "--transform-scale", "1"])
    train.main([*args, "--out", str(resumed), "--steps", "3", "--resume"])
    a = load_file(str(straight / weights))
    b = load_file(str(resumed / weights))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [np.float64(line.split('"loss": ')[1].split(",")[0]) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert (straight / "loss.png").is_file()


def test_missing_or_corrupt_bundled_weights_are_one_line(tmp_path):
    from astraea.errors import AstraeaError
    from astraea.families import get_family

    family = get_family("wan")
    shell = family.build_random(family.preset("bundled"), torch.device("cpu"), torch.float32, 0)
    with pytest.raises(AstraeaError, match="bundled weights .* are missing; reinstall astraea"):
        bundled.load_model(shell, torch.device("cpu"), torch.float32, tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bundled.WEIGHTS.read_bytes()[:1000])
    with pytest.raises(AstraeaError, match="is not a valid safetensors file") as e:
        bundled.load_model(shell, torch.device("cpu"), torch.float32, bad)
    assert "\n" not in str(e.value)
    assert bundled.transform_scale(bad) == 1.0  # the opensora preset still builds; the load says what is wrong


def test_a_trained_stdit3_loads_as_the_opensora_bundled_preset(tmp_path, monkeypatch):
    """The trainer's STDiT3 file (one CPU step here) loads through the opensora family's
    `bundled` preset (offered once astraea-tiny-stdit3.safetensors ships): the pixel codec's
    geometry, the caption mask from the fixed vocabulary, and the rectified-flow sampler."""
    from astraea.families import get_family
    from astraea.families.opensora import BUNDLED_SCALE, bundled_preset

    train = _tool("train_reference")
    train.main(["--device", "cpu", "--batch", "1", "--pool", "2", "--steps", "1", "--family", "opensora",
                "--out", str(tmp_path)])
    family = get_family("opensora")
    trained = tmp_path / bundled.STDIT3_WEIGHTS.name
    assert bundled.transform_scale(trained) == BUNDLED_SCALE  # the noise levels it was trained at, recorded
    monkeypatch.setitem(family.presets, "bundled", bundled_preset(trained))
    frames, height, width = bundled.VIDEO
    cfg = config.from_dict({"model": {"family": "opensora", "preset": "bundled", "dtype": "fp32", "device": "cpu"},
                            "video": {"frames": frames, "height": height, "width": width},
                            "sampling": {"steps": 3, "prompts": [PROMPT, "a blue square"]}})
    model = loader.load_model(cfg)
    assert model.layout(cfg.video).video_tokens == 2304 and model.identity["weights"] != "random"
    assert model.scheduler.scale == BUNDLED_SCALE  # and is sampled at them
    cond = model.encoder([PROMPT, "a blue square"])
    assert cond.mask.shape == (2, bundled.TEXT_LENGTH) and cond.mask.sum(1).tolist() == [len(PROMPT.split()), 3]
    out = _sample(cfg, model)
    assert out.shape == (1, bundled.codec.CHANNELS, 9, 32, 32) and torch.isfinite(out).all()
