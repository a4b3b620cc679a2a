"""The dense reference stage: stored, keyed by what changes it, reused, never half-written."""

from __future__ import annotations

import pytest
import torch

from astraea import loader, reference
from astraea.conditioning import encode_prompt
from astraea.sampling import denoise, make_inputs
from conftest import tiny_config


def _run(cfg, out):
    return reference.run(cfg, loader.load_model(cfg), out, progress=False)


def test_reference_equals_direct_sampling_and_is_reused(tmp_path):
    cfg = tiny_config(sampling={"prompts": ["a red circle", "a blue square"], "seeds": [3, 5]})
    ref = _run(cfg, tmp_path)
    assert not ref.reused and sorted(ref.latents) == ["p0_s3", "p0_s5", "p1_s3", "p1_s5"]
    model = loader.load_model(cfg)
    inputs = make_inputs(model, cfg.video, cfg.sampling, encode_prompt(model, "a blue square", None),
                         encode_prompt(model, "", None), 5)
    assert torch.equal(ref.latents["p1_s5"], denoise(model, cfg.video, cfg.sampling, inputs).cpu())
    again = _run(cfg, tmp_path)
    assert again.reused and again.key == ref.key
    assert all(torch.equal(again.latents[k], ref.latents[k]) for k in ref.latents)
    assert (ref.folder / "reference.json").is_file() and (ref.folder / "latents.png").is_file()


@pytest.mark.parametrize(
    "change",
    [
        {"sampling": {"steps": 4}},
        {"sampling": {"guidance": 2.0}},
        {"sampling": {"seeds": [1]}},
        {"sampling": {"prompts": ["another prompt"]}},
        {"sampling": {"negative_prompt": "ugly"}},
        {"sampling": {"shift": 5.0}},
        {"video": {"frames": 13}},
        {"model": {"weights_seed": 1}},
        {"model": {"dtype": "bf16"}},
    ],
    ids=lambda c: ".".join([next(iter(c)), next(iter(next(iter(c.values()))))]),
)
def test_key_changes_with_every_input(change):
    base = tiny_config()
    other = tiny_config(**change)
    key = reference.reference_key
    assert key(base, loader.load_model(base)) != key(other, loader.load_model(other))


def test_settings_that_do_not_change_latents_keep_the_key():
    base = tiny_config()
    other = tiny_config(target={"budget": 0.5}, search={"generations": 3}, bench={"repeats": 9})
    key = reference.reference_key
    assert key(base, loader.load_model(base)) == key(other, loader.load_model(other))


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    cfg = tiny_config(sampling={"seeds": [0, 1]})
    calls = []

    def boom(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return denoise(*args, **kwargs)

    monkeypatch.setattr(reference, "denoise", boom)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, tmp_path)
    assert not (tmp_path / "reference").exists() or not any((tmp_path / "reference").iterdir())
