"""Engines and the runtime on the CPU: each backend's runtime output against the rewritten
graphs over a full sampling run (AOTInductor compiled in worker processes, and from C++);
tampered, missing and foreign engine folders refused; unchanged engines not rebuilt; the
runtime imports no build code. Each backend's folder is built once a session (module
fixtures): tests that change a folder work on a copy."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from astraea import engines, runtime
from astraea.manifest import Manifest
from astraea.sampling import denoise, first_step_kwargs, prompt_inputs
from astraea.tokenwise import TokenwiseTransformer, build_programs
from conftest import call_in_fresh_process, engine_case, fixed_schedule, tiny_config

STEPS = 4
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup():
    return engine_case("cpu", STEPS)


@pytest.fixture(scope="module")
def float8_setup():
    return engine_case("cpu", STEPS, selection={"cache": "float8"})


def _build(case, out: Path, backend: str, **build) -> tuple[Path, Manifest]:
    cfg, model, programs, schedule, _, _ = case
    cfg = dataclasses.replace(cfg, build=dataclasses.replace(cfg.build, **build))
    return out / "engines", engines.build(cfg, model, programs, schedule, out, backend=backend, progress=False)


BUILD_INDUCTOR = """
import sys
sys.path.insert(0, sys.argv[1])
from conftest import engine_case
from astraea import engines
cfg, model, programs, schedule, _, _ = engine_case("cpu", int(sys.argv[3]), selection={"cache": "float8"})
engines.build(cfg, model, programs, schedule, __import__("pathlib").Path(sys.argv[2]), backend="inductor", progress=False)
"""


@pytest.fixture(scope="module")
def built(setup, float8_setup, tmp_path_factory):
    """One folder a backend, built on first use: eager and aoti (build.jobs 2: both packages
    compiled at once in worker processes) over the model-dtype cache, inductor over the
    float8 cache, in a process of its own as astraea-build is (Inductor's cache keys read
    process-wide settings that earlier tests in this one may have changed)."""
    folders = {}

    def get(backend: str) -> tuple[Path, Manifest]:
        if backend not in folders:
            out = tmp_path_factory.mktemp(backend)
            if backend == "inductor":
                subprocess.run([sys.executable, "-c", BUILD_INDUCTOR, str(ROOT / "tests"), str(out), str(STEPS)],
                               check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
                folders[backend] = out / "engines", Manifest.read(out / "engines")
            else:
                folders[backend] = _build(setup, out, backend, jobs=2)
        return folders[backend]

    return get


def _copy(folder: Path, tmp_path: Path) -> Path:
    shutil.copytree(folder, tmp_path / "engines")
    return tmp_path / "engines"


@pytest.mark.parametrize("backend", ["eager", "inductor", "aoti"])
def test_runtime_samples_like_the_rewritten_graphs(setup, float8_setup, built, tmp_path, backend):
    cfg, model, programs, schedule, inputs, want = float8_setup if backend == "inductor" else setup
    folder, manifest = built(backend)
    assert len(manifest.engines) == 2 and manifest.steps[2].engine is None  # budget 0: no engine
    assert Manifest.read(folder) == manifest  # what was written is what build returned
    transformer = runtime.load(folder)
    buffers = None
    for _ in range(2):  # a second generation resets the caches at the first timestep
        got = denoise(model, cfg.video, cfg.sampling, inputs, transformer)
        # the engines write the new block state into the runtime's buffers: the same
        # storage every step and generation (and still the reference's numbers)
        now = [t.data_ptr() for branch in transformer.branches.values() for t in branch["state"]]
        assert manifest.state_update == "in_place" and (buffers is None or now == buffers)
        buffers = now
        if backend == "eager":
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, atol=1e-4 if backend == "inductor" else 1e-5,
                                       rtol=1e-4 if backend == "inductor" else 1e-5)
    # weights stored once, whatever the number of engines
    assert len([f for f in folder.iterdir() if f.name.startswith("weights-")]) == 1
    if backend != "eager":  # a new process, as pipelines call it; inductor starts warm from the build's cache
        kwargs = first_step_kwargs(model, cfg.video, cfg.sampling)
        got0, counters = call_in_fresh_process(folder, kwargs, tmp_path)
        tol = 1e-4 if backend == "inductor" else 1e-5
        torch.testing.assert_close(got0, TokenwiseTransformer(programs, list(schedule.tokens))(**kwargs)[0],
                                   atol=tol, rtol=tol)
        if backend == "inductor":
            assert counters["aot_autograd"].get("autograd_cache_hit") == 1, counters
            assert not counters["aot_autograd"].get("autograd_cache_miss"), counters
        if backend == "aoti":  # and from C++, with no Python (tools/aoti_cpp)
            got_cpp = _run_from_cpp(folder, manifest, kwargs, tmp_path)
            torch.testing.assert_close(got_cpp, got0, atol=1e-5, rtol=1e-5)


def _run_from_cpp(folder, manifest, kwargs, tmp_path) -> torch.Tensor:
    """The dense engine's first step through tools/aoti_cpp/run_package (C++ package loader)."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler")
    binary = tmp_path / "run_package"
    subprocess.run(["sh", str(ROOT / "tools/aoti_cpp/build.sh"), str(binary)], check=True, capture_output=True,
                   env=dict(os.environ, PYTHON=sys.executable, OPT="-O0"))
    from safetensors.torch import load_file

    weights = load_file(str(folder / manifest.weights_file))
    tensors = [weights[n] for n in manifest.weights_order]
    tensors += [runtime.packed(kwargs[s.name]) for s in manifest.inputs]
    tensors += runtime.empty_state(manifest.state, torch.device("cpu"))
    inputs = tmp_path / "cpp-inputs"
    inputs.mkdir()
    lines = []
    for i, t in enumerate(tensors):
        (inputs / f"{i}.bin").write_bytes(t.contiguous().numpy().tobytes())
        lines.append(f"{i}.bin {str(t.dtype).split('.')[1]} {t.dim()} " + " ".join(map(str, t.shape)))
    (inputs / "inputs.txt").write_text("\n".join(lines) + "\n")
    dense = manifest.engines[manifest.steps[0].engine].file
    subprocess.run([str(binary), str(folder / dense), str(inputs), str(tmp_path / "cpp-out.bin")], check=True,
                   capture_output=True)
    shape = kwargs["hidden_states"].shape
    return torch.frombuffer(bytearray((tmp_path / "cpp-out.bin").read_bytes()), dtype=torch.float32).view(shape)


def test_aoti_engines_compiled_in_worker_processes_are_kept_and_completed(setup, built, tmp_path, monkeypatch):
    """build.jobs 2: both AOTInductor packages were compiled at once in spawned workers (from
    the saved exported programs, zeros standing in for the weights and state; they sample
    like the graphs above) and the build leaves no partial files; a second build keeps both;
    a single missing package is compiled in the build's own process (the compiler stands in
    with the package it made before: the compile itself is the fixture's, above)."""
    cfg, model, programs, schedule, inputs, want = setup
    folder, manifest = built("aoti")
    assert sorted(manifest.build["rebuilt"]) == sorted(manifest.engines) and len(manifest.engines) == 2
    assert not (folder / ".partial").exists() and all((folder / e.file).is_file() for e in manifest.engines.values())
    folder = _copy(folder, tmp_path)
    _, again = _build(setup, tmp_path, "aoti", jobs=2)
    assert again.build["rebuilt"] == []
    key = next(iter(manifest.engines))  # one missing package: compiled in this process, no worker
    package = (folder / manifest.engines[key].file).read_bytes()
    (folder / manifest.engines[key].file).unlink()
    calls = []

    def compile_here(ep, package_path, patch):
        assert isinstance(ep, torch.export.ExportedProgram)
        calls.append(package_path)
        Path(package_path).write_bytes(package)

    monkeypatch.setattr(engines, "_aoti_compile", compile_here)
    monkeypatch.setattr(engines, "_compile_aoti_in_workers", lambda *a: pytest.fail("a worker for one package"))
    _, once = _build(setup, tmp_path, "aoti", jobs=2)
    assert len(calls) == 1 and once.build["rebuilt"] == [key] and (folder / manifest.engines[key].file).is_file()
    torch.testing.assert_close(denoise(model, cfg.video, cfg.sampling, inputs, runtime.load(folder)), want,
                               atol=1e-5, rtol=1e-5)


def test_a_build_stopped_midway_keeps_the_packages_its_workers_finished(setup, built, tmp_path, monkeypatch):
    """build.jobs 2: each package goes into place as its worker finishes, so a build that stops
    before the last one (a failure here; a device call's time limit there) keeps the finished
    ones, writes no manifest, and the next build compiles only the rest."""
    folder, manifest = built("aoti")
    packages = {e.tokens: (folder / e.file).read_bytes() for e in manifest.engines.values()}
    first, second = sorted(packages)

    def stopped(pool, jobs, progress):  # the workers as they would finish: one package, then a stop
        for job in pool:
            if job.tokens == first:
                job.tmp.write_bytes(packages[first])
                yield job, 1.0
        raise engines.EngineError("stopped")

    monkeypatch.setattr(engines, "_compile_aoti_in_workers", stopped)
    with pytest.raises(engines.EngineError, match="stopped"):
        _build(setup, tmp_path, "aoti", jobs=2)
    out = tmp_path / "engines"
    kept = {e.tokens: out / e.file for e in manifest.engines.values()}
    assert kept[first].read_bytes() == packages[first] and not kept[second].exists()
    assert not (out / "manifest.json").exists()
    compiled = []

    def compile_here(ep, package_path, patch):  # the one package left: in this process, as the compiler made it
        compiled.append(package_path)
        Path(package_path).write_bytes(packages[second])

    monkeypatch.setattr(engines, "_aoti_compile", compile_here)
    _, again = _build(setup, tmp_path, "aoti", jobs=2)
    assert len(compiled) == 1 and [again.engines[k].tokens for k in again.build["rebuilt"]] == [second]


def test_float8_cache_engines_keep_their_state_in_float8_near_the_model_dtype_cache(setup, float8_setup, built, tmp_path):
    """selection.cache float8: the Inductor engines above run over a float8 block state (the
    state's dtype in the manifest) and sample near the model-dtype cache's sample; TensorRT
    is refused with one line."""
    cfg, model, programs, schedule, inputs, want = float8_setup
    _, manifest = built("inductor")
    assert {s.dtype for s in manifest.state} == {"float8_e4m3fn", "float32", "int32"}
    full = setup[-1]  # the same run with the cache in the model's dtype (fp32 here)
    rel = float((want - full).norm() / full.norm())
    assert 0 < rel < 0.05, rel
    with pytest.raises(runtime.EngineError, match="selection.cache: float8"):
        engines.build(cfg, model, programs, schedule, tmp_path / "trt", backend="tensorrt", progress=False)


def test_batched_cfg_engines_rewrite_the_budgets_they_are_not_given(tmp_path):
    """engines.build with no programs (as astraea-bench calls it) for a family whose pipeline
    calls the transformer at the CFG batch (CogVideoX): it rewrites the schedule's budgets
    itself (it failed on an empty dict), and the engines sample like those programs."""
    from astraea import loader

    cfg = tiny_config("cogvideox", "tiny", sampling={"steps": STEPS})
    model = loader.load_model(cfg)
    n = model.layout(cfg.video).video_tokens
    tokens = [n] + [n // 2] * (STEPS - 1)
    schedule = fixed_schedule(model, cfg, tokens)
    manifest = engines.build(cfg, model, {}, schedule, tmp_path, backend="eager", progress=False)
    assert not manifest.per_branch and len(manifest.engines) == 2
    inputs = prompt_inputs(model, cfg.video, cfg.sampling, cfg.sampling.prompts[0], 0)
    want = denoise(model, cfg.video, cfg.sampling, inputs,
                   TokenwiseTransformer(build_programs(model, cfg, tokens, progress=False), tokens))
    assert torch.equal(denoise(model, cfg.video, cfg.sampling, inputs, runtime.load(tmp_path / "engines")), want)


def test_unchanged_engines_are_not_rebuilt(setup, built, tmp_path):
    folder, first = built("eager")
    assert len(first.build["rebuilt"]) == 2
    _copy(folder, tmp_path)
    _, again = _build(setup, tmp_path, "eager")
    assert again.build["rebuilt"] == [] and again.engines == first.engines


def test_tampered_missing_and_foreign_folders_are_refused(built, tmp_path):
    source, manifest = built("eager")
    folder = _copy(source, tmp_path)
    engine = folder / next(iter(manifest.engines.values())).file
    backup = engine.read_bytes()
    engine.write_bytes(backup[:-10] + b"0123456789")
    with pytest.raises(runtime.EngineError, match="does not match its sha256"):
        runtime.load(folder)
    engine.unlink()
    with pytest.raises(runtime.EngineError, match="is missing"):
        runtime.load(folder)
    engine.write_bytes(backup)
    runtime.load(folder)  # restored: fine again

    other = tmp_path / "other"
    shutil.copytree(folder, other)
    m = json.loads((other / "manifest.json").read_text())
    m["toolchain"]["torch"] = "1.13.0"
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(runtime.EngineError, match="rebuild them with this toolchain"):
        runtime.load(other)
    m["toolchain"]["torch"], m["toolchain"]["device"] = torch.__version__, "cuda"
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(runtime.EngineError, match="built for cuda, not cpu"):
        runtime.load(other, device="cpu")
    (other / "manifest.json").write_text("{not json")
    with pytest.raises(runtime.EngineError, match="not valid JSON"):
        runtime.load(other)
    with pytest.raises(runtime.EngineError, match="no manifest.json"):
        runtime.load(tmp_path / "nowhere")
    m = json.loads((source / "manifest.json").read_text())
    del m["steps"]
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(runtime.EngineError, match="lacks or mangles 'steps'"):
        runtime.load(other)


def test_cuda_graphs_are_refused_off_cuda(built):
    folder, _ = built("eager")
    with pytest.raises(runtime.EngineError, match="cuda_graphs needs a CUDA device"):
        runtime.load(folder, cuda_graphs=True)


def test_wrong_inputs_are_named(setup, built):
    cfg, model, programs, schedule, inputs, _ = setup
    folder, _ = built("eager")
    transformer = runtime.load(folder)
    kwargs = first_step_kwargs(model, cfg.video, cfg.sampling)
    with pytest.raises(runtime.EngineError, match="has shape .*rebuild for this video size"):
        transformer(**dict(kwargs, hidden_states=kwargs["hidden_states"][..., :-2]))
    with pytest.raises(runtime.EngineError, match="called with batch 1; the engines were built for batch 2"):
        transformer(**dict(kwargs, hidden_states=kwargs["hidden_states"][:1]))
    with pytest.raises(runtime.EngineError, match="not one of the 4 timesteps"):
        transformer(**dict(kwargs, timestep=kwargs["timestep"] * 0 + 12345.0))
    out = transformer(**dict(kwargs, return_dict=True)).sample
    assert out.shape == kwargs["hidden_states"].shape


def test_the_runtime_imports_no_build_code():
    code = ("import sys, astraea.runtime; "
            "print(sorted(m for m in sys.modules if m.startswith(('astraea', 'diffusers'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for build_module in ("astraea.passes", "astraea.capture", "astraea.tokenwise", "astraea.search",
                         "astraea.engines", "astraea.config", "astraea.families", "diffusers"):
        assert f"'{build_module}'" not in loaded, loaded


def test_runtime_is_pipe_transformer_in_a_diffusers_wan_pipeline(setup, tmp_path):
    """Engines built per CFG branch (WanPipeline calls the transformer once per branch at
    batch 1, inside cache_context("cond"/"uncond")): the pipeline with the runtime as its
    transformer samples like the rewritten graphs, and so does our CFG-batched loop (the
    runtime splits the batch of 2 into the two branches)."""
    import copy

    from diffusers import WanPipeline

    cfg, model, programs, schedule, inputs, want = setup
    cfg = dataclasses.replace(cfg, build=dataclasses.replace(cfg.build, cfg="auto"))  # wan: per branch
    manifest = engines.build(cfg, model, programs, schedule, tmp_path, backend="eager", progress=False)
    assert manifest.per_branch and manifest.inputs[0].shape[0] == 1
    transformer = runtime.load(tmp_path / "engines")
    ours = denoise(model, cfg.video, cfg.sampling, inputs, transformer)
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                       scheduler=copy.deepcopy(model.scheduler))
    negative, prompt = inputs.cond.embeds.chunk(2)
    got = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, height=cfg.video.height, width=cfg.video.width,
               num_frames=cfg.video.frames, num_inference_steps=STEPS, guidance_scale=cfg.sampling.guidance,
               latents=inputs.noise.clone(), output_type="latent").frames
    torch.testing.assert_close(got.float(), want, atol=1e-4, rtol=1e-4)
    assert set(transformer.branches) == {("cond", 0), ("uncond", 0), (None, 0), (None, 1)}


@pytest.mark.trt
def test_tensorrt_engines_sample_like_the_rewritten_graphs(tmp_path):
    """Needs TensorRT and a GPU: ONNX -> plans with the AOT Triton plugins -> the runtime's
    functional (double-buffered) state, over a run."""
    cfg, model, programs, schedule, inputs, want = engine_case("cuda")
    manifest = engines.build(cfg, model, programs, schedule, tmp_path, backend="tensorrt", progress=False)
    assert manifest.state_update == "functional"
    got = denoise(model, cfg.video, cfg.sampling, inputs, runtime.load(tmp_path / "engines"))
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
