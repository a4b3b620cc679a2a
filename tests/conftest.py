"""Shared fixtures: tiny configs per family (diffusers' pattern: tiny model x feature tests)."""

from __future__ import annotations

import copy
import os

# Inductor's CPU kernels without SIMD intrinsics: g++ compiles them faster, the compile tests
# a quarter faster (docs/benchmarks.md, "On the CPU"), and the tests compare compiled against
# eager output either way; set before torch reads its config, and inherited by the processes
# the tests start (fresh-process loads, build workers, ranks)
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors in CI

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2 on a 2-core machine: one thread a worker
    torch.set_num_threads(1)

from astraea import config

TINY = {
    "wan": "tiny",
    "cogvideox": "tiny",
    "cogvideox-rotary": "tiny-rotary",
    "hunyuan_video": "tiny",
}


def tiny_raw(family: str = "wan", preset: str = "tiny", **sections) -> dict:
    """A complete, valid model.yaml as a dict for a tiny preset; `sections` override per key."""
    raw = {
        "model": {"family": family, "preset": preset, "dtype": "fp32", "device": "cpu"},
        "video": {"frames": 9, "height": 32, "width": 48},
        "sampling": {"steps": 3, "guidance": 4.0, "seeds": [0], "prompts": ["a red circle moving left"]},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return copy.deepcopy(raw)


def tiny_config(family: str = "wan", preset: str = "tiny", **sections) -> config.RunConfig:
    return config.from_dict(tiny_raw(family, preset, **sections))


_CAPTURES: dict = {}


def captured(family: str, preset: str, video: dict):
    """(model, the capture of its first step) for a tiny config, made once a session: torch.export
    is most of a tiny rewrite's time. Rewrite a copy of the graph (tokenwise.copy_graph_module)."""
    from astraea import loader
    from astraea.capture import capture

    key = (family, preset, tuple(sorted(video.items())))
    if key not in _CAPTURES:
        cfg = tiny_config(family, preset, video=video)
        model = loader.load_model(cfg)
        _CAPTURES[key] = model, capture(model, cfg)
    return _CAPTURES[key]


def interrupt_search_after(monkeypatch, generation: int) -> None:
    """Ctrl-C right after the search has written generation `generation`'s checkpoint
    (monkeypatch.undo() lets the next run go through)."""
    from astraea.search import Search

    real = Search._checkpoint

    def interrupt(self, st):
        real(self, st)
        if st.generation == generation:
            raise KeyboardInterrupt

    monkeypatch.setattr(Search, "_checkpoint", interrupt)


def block_calls(model, example: dict) -> tuple[list[dict], torch.Tensor]:
    """Every transformer block's real arguments in an eager forward, bound by name, and the
    model's output: the inputs the oracle runs a dense block on."""
    import inspect

    blocks = [b for name in model.family.block_containers for b in getattr(model.transformer, name)]
    seen = []

    def hook(m, args, kwargs):
        seen.append(dict(inspect.signature(m.forward).bind(*args, **kwargs).arguments))

    handles = [b.register_forward_pre_hook(hook, with_kwargs=True) for b in blocks]
    with torch.no_grad():
        out = model.transformer(**example)[0]
    for h in handles:
        h.remove()
    return seen, out


@pytest.fixture(params=sorted(TINY))
def family_preset(request) -> tuple[str, str]:
    name = request.param
    return name.split("-")[0], TINY[name]


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run through the device tool)")
    skip_trt = pytest.mark.skip(reason="needs TensorRT, which cannot be installed in this environment")
    try:
        import tensorrt  # noqa: F401

        has_trt = True
    except ImportError:
        has_trt = False
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "trt" in item.keywords and not has_trt:
            item.add_marker(skip_trt)


FRESH_PROCESS_CALL = """
import json, sys, torch
from torch._dynamo.utils import counters
from astraea import runtime
folder, inputs, out = sys.argv[1:4]
kwargs = torch.load(inputs)
kwargs.pop("return_dict", None)
kwargs["timestep"] = kwargs["timestep"][:1].expand(kwargs["timestep"].shape[0])  # as pipelines pass it: stride 0
transformer = runtime.load(folder)
with torch.no_grad():
    torch.save(transformer(**kwargs, return_dict=False)[0].cpu(), out)
print(json.dumps({k: dict(v) for k, v in counters.items() if k in ("aot_autograd", "inductor")}))
"""


def call_in_fresh_process(folder, kwargs: dict, tmp_path):
    """The engine folder's first step run by astraea.runtime in a new Python process with an
    empty Inductor cache: (output, the compile counters: cache hits and misses)."""
    import json
    import subprocess
    import sys
    import tempfile

    torch.save({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}, tmp_path / "inputs.pt")
    with tempfile.TemporaryDirectory() as cache:
        proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS_CALL, str(folder), str(tmp_path / "inputs.pt"),
                               str(tmp_path / "out.pt")], capture_output=True, text=True,
                              # the same thread count: it is part of Inductor's CPU cache keys
                              env=dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, OMP_NUM_THREADS=str(torch.get_num_threads())))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "out.pt"), json.loads(proc.stdout.strip().splitlines()[-1])


def bench_report(path, levels: int, ms: list[float], tag: str = "") -> str:
    """An astraea-bench report of a card's compiled calls (CUDA graphs) at every budget level,
    ms[level] each (level 0: the skipped step's call), beside a dense eager step of 1000 ms;
    its rows' settings end in `tag` (", fp8": FP8 engines). Returns the file's name."""
    import json

    big, rows = 1000, [{"method": "dense", "step_ms": {"dense": 1000.0}}]  # the bench's model: any size
    for lv in range(1, levels):
        k = lv * big // (levels - 1)
        rows.append({"method": "astraea-compiled", "setting": f"searched{tag}", "cuda_graphs": True,
                     "tokens_per_step": [big, k, 0], "step_ms": {"100%": ms[-1], f"{k / big:.0%}": ms[lv], "skip": ms[0]}})
    path.write_text(json.dumps({"setup": {"video_tokens": big, "device": "H100"}, "rows": rows}))
    return path.name


def fixed_schedule(model, cfg, tokens: list[int], key: str = "test"):
    """A Schedule of rows per step (not searched) with the scheduler's timesteps."""
    from astraea.sampling import timesteps
    from astraea.schedule import Schedule

    n = model.layout(cfg.video).video_tokens
    return Schedule.from_tokens(tokens, n, timesteps=tuple(timesteps(model, cfg.sampling.steps)), key=key)


def engine_case(device: str, steps: int = 4, family: str = "wan", rows: int = 3, **sections):
    """A tiny run of family (Wan unless named) for the engine tests: (cfg, model, programs,
    schedule, inputs, want), the schedule dense, `rows` rows twice (one engine), a skipped
    step; `want` sampled with the rewritten graphs."""
    from astraea import loader
    from astraea.sampling import denoise, prompt_inputs
    from astraea.tokenwise import TokenwiseTransformer, build_programs

    model_section = {"device": device, **sections.pop("model", {})}
    cfg = tiny_config(family, "tiny", model=model_section, sampling={"steps": steps}, build={"cfg": "batched"},
                      **sections)
    model = loader.load_model(cfg)
    n = model.layout(cfg.video).video_tokens
    programs = build_programs(model, cfg, [n, rows], progress=False)
    tokens = [n, rows, 0, rows] + [rows] * (steps - 4)
    schedule = fixed_schedule(model, cfg, tokens)
    inputs = prompt_inputs(model, cfg.video, cfg.sampling, cfg.sampling.prompts[0], 0)
    want = denoise(model, cfg.video, cfg.sampling, inputs, TokenwiseTransformer(programs, tokens))
    return cfg, model, programs, schedule, inputs, want
