"""Every validation rule of model.yaml: good configs load, each bad one names its key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from astraea import config
from astraea.errors import ConfigError
from conftest import tiny_raw

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")) + sorted((ROOT / "tools/configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_examples_validate(path):
    cfg = config.load(path)
    assert cfg.name == path.stem and cfg.sampling.prompts


def test_defaults_are_the_papers_search():
    cfg = config.from_dict(tiny_raw())
    s = cfg.search
    assert (s.population, s.children, s.generations, s.levels) == (50, 30, 30, 11)
    assert (s.mutation_start, s.mutation_end, s.repair_low, s.repair_high) == (0.1, 0.01, 0.9, 1.1)
    # a speedup target's band ends at its time (the speedup is a floor); a band given is kept
    assert config.from_dict(tiny_raw(target={"speedup": 2.0})).search.repair_high == 1.0
    assert config.from_dict(tiny_raw(target={"speedup": 2.0}, search={"repair_high": 1.1})).search.repair_high == 1.1
    assert config.from_dict(tiny_raw(target={"budget": 0.4})).search.repair_high == 1.1
    assert cfg.output_dir == Path("runs/run")


def test_coercions():
    cfg = config.from_dict(tiny_raw(sampling={"guidance": 3, "seeds": 7}, target={"budget": 1}))
    assert cfg.sampling.guidance == 3.0 and isinstance(cfg.sampling.guidance, float)
    assert cfg.sampling.seeds == (7,)
    assert cfg.target.budget == 1.0


def _set(raw, dotted, value):
    *parents, leaf = dotted.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
    if value is _DELETE:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return raw


class _Delete:
    def __repr__(self) -> str:  # a stable test id (pytest -n: every worker collects the same ids)
        return "<deleted>"


_DELETE = _Delete()

BAD = [
    # (key, value, reported path, words in the message)
    ("modle", {}, "modle", "did you mean 'model'"),
    ("model.familly", "wan", "model.familly", "did you mean 'family'"),
    ("model.family", "wann", "model.family", "did you mean 'wan'"),
    ("model.family", "mochi", "model.family", "valid: cogvideox, hunyuan_video, opensora, wan"),
    ("model.family", "sora", "model.family", "did you mean 'opensora'"),
    ("model.preset", "tiniy", "model.preset", "did you mean 'tiny'"),
    ("model.preset", _DELETE, "model", "exactly one of preset"),
    ("model.checkpoint", "ckpt", "model", "exactly one of preset"),
    ("model.dtype", "float8", "model.dtype", "not one of bf16, fp16, fp32"),
    ("model.device", "tpu", "model.device", "auto, cpu, cuda, cuda:N, meta"),
    ("model.weights_seed", -1, "model.weights_seed", "below the minimum 0"),
    ("model.weights_seed", True, "model.weights_seed", "expected int, got bool"),
    ("model", [1, 2], "model", "expected a mapping"),
    ("video", _DELETE, "video", "section is required"),
    ("video.frames", _DELETE, "video.frames", "is required"),
    ("video.frames", "17", "video.frames", "expected int, got str"),
    ("video.frames", 10, "video.frames", "4k+1"),
    ("video.height", 40, "video.height", "not divisible by 16"),
    ("video.width", 4, "video.width", "below the minimum 8"),
    ("sampling.steps", 0, "sampling.steps", "below the minimum 1"),
    ("sampling.guidance", 0.5, "sampling.guidance", "below the minimum 1.0"),
    ("sampling.guidance", [1], "sampling.guidance", "expected float, got list"),
    ("sampling.scheduler", "ddim", "sampling.scheduler", "default, flow_match_euler, unipc"),
    ("sampling.embedded_guidance", 6.0, "sampling.embedded_guidance", "only hunyuan_video"),
    ("sampling.seeds", [1, 1], "sampling.seeds", "distinct"),
    ("sampling.seeds", [], "sampling.seeds", "distinct"),
    ("sampling.seeds", ["a"], "sampling.seeds[0]", "expected int"),
    ("sampling.prompts", [], "sampling.prompts", "at least one prompt"),
    ("sampling.prompt_file", "nope.txt", "sampling", "not both"),
    ("sampling.text_length", 0, "sampling.text_length", "below the minimum 1"),
    ("target.budget", 1.5, "target.budget", "above the maximum 1.0"),
    ("target.budget", 0.0, "target.budget", "above 0"),
    ("target.speedup", 0.5, "target.speedup", "below the minimum 1.0"),
    ("search.populaton", 10, "search.populaton", "did you mean 'population'"),
    ("search.mutation_end", 0.5, "search.mutation_end", "must not exceed"),
    ("search.children", 60, "search.children", "must not exceed search.population"),
    ("search.proxy_video", [5, 16], "search.proxy_video", "give [frames, height, width]"),
    ("search.proxy_video", [6, 16, 16], "search.proxy_video", "frames = 4k+1"),
    ("search.proxy_video", [5, 20, 16], "search.proxy_video", "not divisible by 16 (VAE stride 8 x patch 2) (as the proxy's video.height)"),
    ("search.proxy_video", [5, 4, 16], "search.proxy_video.height", "below the minimum 8"),
    ("search.rescore", 0, "search.rescore", "below the minimum 1"),
    ("search.refine_generations", 2, "search.refine_generations", "set search.proxy_video"),
    ("build.backend", "onnx", "build.backend", "eager, inductor, aoti, tensorrt"),
    ("selection.cache", "fp8", "selection.cache", "model, float8"),
    ("build.precision", "int8", "build.precision", "model, fp8"),
    ("bench.repeats", 0, "bench.repeats", "below the minimum 1"),
    ("bench.cuda_graphs", True, "bench.cuda_graphs", "needs a CUDA device (model.device is cpu)"),
]


@pytest.mark.parametrize("key,value,path,words", BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_bad_value_names_key_path(key, value, path, words):
    raw = _set(tiny_raw(), key, value)
    if key == "sampling.prompt_file":
        raw["sampling"]["prompts"] = ["x"]
    if key == "target.speedup":
        raw["target"] = {"speedup": value}
    with pytest.raises(ConfigError) as e:
        config.from_dict(raw)
    assert e.value.path == path
    assert words in str(e.value)
    assert "\n" not in str(e.value)


def test_target_needs_one_of_two():
    with pytest.raises(ConfigError, match="budget or speedup, not both"):
        config.from_dict(tiny_raw(target={"budget": 0.5, "speedup": 2.0}))


@pytest.mark.parametrize(
    "family,preset,key,value,words",
    [
        ("cogvideox", "tiny", "sampling.text_length", 32, "built for 16 text tokens"),
        ("cogvideox", "tiny", "sampling.shift", 3.0, "no flow shift"),
        ("cogvideox", "tiny", "sampling.scheduler", "unipc", "cogvideox_ddim, cogvideox_dpm"),
        ("hunyuan_video", "tiny", "sampling.text_length", 300, "at most 256"),
        ("hunyuan_video", "tiny", "sampling.scheduler", "unipc", "flow_match_euler"),
        ("hunyuan_video", "tiny", "video.frames", 8, "try 5 or 9"),
        ("wan", "wan2.1-t2v-1.3b", "video.width", 840, "not divisible by 16"),
    ],
)
def test_family_rules(family, preset, key, value, words):
    raw = _set(tiny_raw(family, preset), key, value)
    with pytest.raises(ConfigError) as e:
        config.from_dict(raw)
    assert e.value.path == key and words in str(e.value)


def test_family_accepts_its_own_options():
    cfg = config.from_dict(tiny_raw("hunyuan_video", sampling={"embedded_guidance": 6.0, "scheduler": "flow_match_euler"}))
    assert cfg.sampling.embedded_guidance == 6.0
    cfg = config.from_dict(tiny_raw("cogvideox", sampling={"scheduler": "cogvideox_dpm", "text_length": 16}))
    assert cfg.sampling.scheduler == "cogvideox_dpm"


def test_prompt_file_is_relative_to_the_config(tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle\n\n  a blue square  \n")
    raw = tiny_raw()
    raw["sampling"].pop("prompts")
    raw["sampling"]["prompt_file"] = "prompts.txt"
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(raw))
    cfg = config.load(tmp_path / "model.yaml")
    assert cfg.sampling.prompts == ("a red circle", "a blue square")
    raw["sampling"]["prompt_file"] = "missing.txt"
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="sampling.prompt_file: .*missing.txt does not exist"):
        config.load(tmp_path / "model.yaml")


def test_checkpoint_must_be_a_diffusers_folder(tmp_path):
    raw = tiny_raw()
    raw["model"].pop("preset")
    raw["model"]["checkpoint"] = str(tmp_path)
    with pytest.raises(ConfigError, match=r"model.checkpoint: .* \(no transformer/config.json\)"):
        config.from_dict(raw)


def test_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {family: wan\nvideo: [")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+, column \d+"):
        config.load(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        config.load(bad)
