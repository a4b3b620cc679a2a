"""Engines: one compiled program per distinct budget of a schedule, a manifest, one weights file.

Each engine is the rewritten program of one budget (tokenwise.py), exported with
`torch.export` as a function of tensors only: (weights..., the transformer's tensor
inputs..., block state...) -> (output, new block state...). The weights are inputs, so
they are stored once (`weights.safetensors`) and held in memory once by the runtime,
whatever the number of engines; non-tensor arguments (e.g. `return_dict`) are bound at
export. Backends:
  eager     the exported program (`<key>.pt2`), run as its GraphModule (debugging)
  inductor  the same `.pt2`, compiled by the runtime with torch.compile; Inductor's cache
            artifacts from the build (`inductor-cache.bin`) let it start warm
  aoti      an AOTInductor package (`<key>.aoti.pt2`) with the ops' kernels compiled in;
            with build.jobs > 1 the exported programs are compiled that many at once, each
            in a worker process (spawned; zero-filled inputs of the program's shapes stand
            in for the weights and state, which only autotuning reads)
An engine's key hashes its graph, shapes, backend, precision, the pass/ops source and the
toolchain; an engine whose key exists in the folder is not rebuilt. `manifest.json` (read
by astraea.runtime) is written last, atomically, with every file's sha256.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import runtime
from .config import RunConfig
from .io import atomic_file, source_hash, stable_hash, write_json
from .sampling import first_step_kwargs
from .tokenwise import TokenwiseProgram

log = logging.getLogger("astraea")
EXPORTED = torch.export.graph_signature.InputKind


class _Step(torch.nn.Module):
    """The rewritten GraphModule with its non-tensor inputs bound: tensors in, tensors out.

    in_place: the new block state is copied back into the state inputs and only the output
    is returned; Inductor and AOTInductor then write the selected rows straight into the
    caller's buffers (write_cache.py), so a step holds the state once. Otherwise the new
    state is returned after the output (the functional pair, for backends such as TensorRT
    that double-buffer)."""

    def __init__(self, graph: torch.fx.GraphModule, layout: list, in_place: bool = True):
        super().__init__()
        self.graph_module, self.layout, self.in_place = graph, layout, in_place  # layout: ("t", None) or ("c", value)

    def forward(self, *tensors):
        it = iter(tensors)
        args = [next(it) if kind == "t" else value for kind, value in self.layout]
        state = list(it)
        out = self.graph_module(*args, *state)
        if not self.in_place:
            return tuple(out)
        for old, new in zip(state, out[1:], strict=True):
            old.copy_(new)
        return (out[0],)


def signature(tp: TokenwiseProgram, kwargs: dict) -> dict:
    """Weights (state-dict names, in the program's order), tensor inputs, constants, state."""
    ep = tp.program
    flat = tp.flat_inputs(kwargs)
    weights, inputs, constants, layout = [], [], {}, []
    for spec, value in zip(ep.graph_signature.input_specs, flat):
        if spec.kind == EXPORTED.USER_INPUT:
            if isinstance(value, torch.Tensor):
                inputs.append({"name": spec.arg.name, "shape": list(value.shape), "dtype": str(value.dtype).split(".")[1]})
                layout.append(("t", None))
            else:
                constants[spec.arg.name] = value
                layout.append(("c", value))
        else:
            weights.append(spec.target)
            layout.append(("t", None))
    state = [n.meta["val"] for n in tp.graph.graph.nodes if n.op == "placeholder"][len(flat):]
    return {"weights": weights, "inputs": inputs, "constants": constants, "layout": layout,
            "state": [{"shape": list(v.shape), "dtype": str(v.dtype).split(".")[1]} for v in state]}


def one_branch(kwargs: dict) -> dict:
    """The transformer's inputs of one CFG branch (the prompt's, second of the batch of 2)."""
    return {k: v[1:] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == 2 else v for k, v in kwargs.items()}


def fixed_schedule(model, cfg: RunConfig, tokens: list[int], key: str) -> dict:
    """A schedule given as rows per step (not searched), in schedule.json's form: no quality
    stamp (mse/psnr None), the scheduler's timesteps for cfg.sampling.steps."""
    n = model.layout(cfg.video).video_tokens
    timesteps = model.family.set_timesteps(copy.deepcopy(model.scheduler), cfg.sampling.steps, "cpu")
    return {"tokens_per_step": list(tokens), "budget_per_step": [k / n for k in tokens],
            "timesteps": [float(t) for t in timesteps], "mse": None, "psnr": None,
            "mean_budget": sum(tokens) / n / len(tokens), "per_sample": {}, "key": key}


def weight_tensors(tp: TokenwiseProgram, names: list[str]) -> dict[str, torch.Tensor]:
    ep = tp.program
    return {n: (ep.state_dict[n] if n in ep.state_dict else ep.constants[n]) for n in names}


def _cxx_patch(device: torch.device) -> dict:
    """AOTInductor's wrapper must be built with g++ 12 on the GPU image (../shared/GPU.md)."""
    if device.type == "cuda" and shutil.which("g++-12"):
        return {"cpp.cxx": (None, "g++-12")}
    return {}


def _aoti_worker(export_path: str, package_path: str, device: str, patch: dict) -> float:
    """In a spawned worker: AOTInductor on an exported program saved without example
    inputs; zero tensors of its placeholders' shapes, strides and dtypes stand in for them."""
    t0 = time.perf_counter()
    import astraea.plugins  # noqa: F401  (the astraea:: ops the program calls)

    ep = torch.export.load(export_path)
    user = set(ep.graph_signature.user_inputs)
    vals = [n.meta["val"] for n in ep.graph.nodes if n.op == "placeholder" and n.name in user]
    ep.example_inputs = (tuple(torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=device).zero_()
                               for v in vals), {})
    _aoti_compile(ep, package_path, patch)
    return time.perf_counter() - t0


def _aoti_compile(ep: torch.export.ExportedProgram, package_path: str, patch: dict) -> None:
    from torch._inductor import aoti_compile_and_package

    with torch._inductor.config.patch(patch):
        aoti_compile_and_package(ep, package_path=package_path)


def _compile_aoti_in_workers(pool: list, engines: dict, folder: Path, jobs: int, device: torch.device,
                             progress: bool) -> list[tuple[str, float]]:
    """AOTInductor on the exported programs, `jobs` worker processes at once: each program
    is saved beside its package's temp path, compiled in a worker, then moved in place (a
    single program compiles in this process). Returns (key, compile seconds) in the order
    they finished."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    if len(pool) == 1:  # one program: no worker to start
        (key, ep, tmp), = pool
        t0 = time.perf_counter()
        _aoti_compile(ep, str(tmp), _cxx_patch(device))
        os.replace(tmp, folder / engines[key]["file"])
        return [(key, time.perf_counter() - t0)]
    jobs = min(jobs, len(pool))
    done = []
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as workers:
        futures = {}
        for key, ep, tmp in pool:
            exported = tmp.with_name(f"{key}.export.pt2")
            ep.example_inputs = None  # the weights and the state: the worker makes zeros of their shapes
            torch.export.save(ep, str(exported))
            futures[workers.submit(_aoti_worker, str(exported), str(tmp), str(device), _cxx_patch(device))] = (key, tmp)
        bar = tqdm(as_completed(futures), total=len(futures), desc=f"engines (aoti, {jobs} at once)", unit="engine",
                   disable=not progress)
        for future in bar:
            key, tmp = futures[future]
            try:
                seconds = future.result()
            except Exception as e:  # noqa: BLE001  (the worker's error, on one line, with the engine it was for)
                last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
                raise runtime.EngineError(f"AOTInductor failed for the {engines[key]['tokens']}-row engine in a build "
                                          f"worker: {last} (build.jobs: 1 builds in this process)") from e
            os.replace(tmp, folder / engines[key]["file"])
            done.append((key, seconds))
    return done


def build(cfg: RunConfig, model, programs: dict[int, TokenwiseProgram], schedule: dict, out: Path,
          backend: str | None = None, progress: bool = True, prune: bool = True) -> dict:
    """Engines for every distinct non-zero budget of `schedule` (schedule.json's content)
    under <out>/engines, then the manifest. Returns the manifest. prune=False keeps the
    engine files of earlier builds that this schedule does not use (a benchmark's folder,
    built a schedule at a time: a later schedule finds them by key instead of rebuilding)."""
    backend = backend or cfg.build.backend
    if backend not in runtime.BACKENDS:
        raise runtime.EngineError(f"build.backend: {backend!r} engines are not built by this release "
                                  f"(it builds {', '.join(runtime.BACKENDS)})")
    if backend == "tensorrt" and cfg.selection.cache != "model":
        raise runtime.EngineError("selection.cache float8 is not built for the tensorrt backend (its ONNX state is "
                                  "the model's dtype); use cache: model, or an inductor or aoti backend")
    if backend == "tensorrt" and not runtime.tensorrt_available():
        raise runtime.EngineError(f"build.backend tensorrt needs {runtime.TENSORRT_MISSING}; "
                                  "here, build eager, inductor or aoti engines")
    folder = out / "engines"
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = first_step_kwargs(model, cfg.video, cfg.sampling)
    tokens = schedule["tokens_per_step"]
    per_branch = cfg.sampling.guidance > 1 and (
        cfg.build.cfg == "per_branch" or (cfg.build.cfg == "auto" and model.family.pipeline_cfg_per_branch))
    wanted = sorted({k for k in tokens if k > 0})
    if per_branch:  # the same programs at batch 1: one CFG branch a call (each branch selects its own rows)
        from .search import build_programs

        kwargs = one_branch(kwargs)
        programs = build_programs(model, cfg, wanted, progress, example=kwargs)
    elif not set(wanted) <= set(programs):  # the schedule's budgets that the caller did not rewrite
        from .search import build_programs

        programs = {**programs, **build_programs(model, cfg, [k for k in wanted if k not in programs], progress)}
    any_tp = programs[max(programs)]
    sig = signature(any_tp, kwargs)
    tc = runtime.toolchain(model.device)
    weights = weight_tensors(any_tp, sig["weights"])
    weights_key = stable_hash({n: [list(t.shape), str(t.dtype)] for n, t in weights.items()} | {"id": model.identity})
    weights_file = f"weights-{weights_key}.safetensors"
    if not (folder / weights_file).is_file():
        from safetensors.torch import save_file

        tmp = folder / f".{weights_file}.tmp"
        save_file({n: t.detach().contiguous().cpu() for n, t in weights.items()}, str(tmp))
        os.replace(tmp, folder / weights_file)

    flat_weights = [weights[n] for n in sig["weights"]]
    tensor_inputs = [kwargs[s["name"]] for s in sig["inputs"]]
    engines, built, timings = {}, [], {}
    pool = []  # aoti with build.jobs > 1: (key, exported program, package tmp), compiled together below
    for k in tqdm(wanted, desc=f"engines ({backend})", unit="engine", disable=not progress):
        tp = programs[k]
        key = stable_hash({"graph": tp.graph.code, "inputs": sig["inputs"], "state": sig["state"], "backend": backend,
                           "precision": cfg.build.precision, "selection": dataclasses.asdict(cfg.selection),
                           "source": source_hash(), "toolchain": tc})
        name = {"aoti": f"{key}.aoti.pt2", "tensorrt": f"{key}.plan"}.get(backend, f"{key}.pt2")
        engines[key] = {"backend": backend, "file": name, "tokens": k}
        if backend == "tensorrt":
            from . import onnx_export

            engines[key]["io"] = {"inputs": onnx_export.input_names(sig), "outputs": onnx_export.output_names(sig)}
        if (folder / name).is_file():
            continue
        t0 = time.perf_counter()
        (folder / ".partial").mkdir(exist_ok=True)
        tmp = folder / ".partial" / name  # same file name: it names the archive's inner folder
        if backend == "tensorrt":  # ONNX with the astraea nodes, then a plan with their plugins
            from . import trt_build

            onnx_export.export(tp, sig, flat_weights, tensor_inputs, folder / f"{key}.onnx", model.device)
            trt_build.build_plan(folder / f"{key}.onnx", tmp, folder / "timing.cache")
        else:
            state = runtime.empty_state(sig["state"], model.device)
            step = _Step(tp.graph, sig["layout"], in_place=True)
            ep = torch.export.export(step, tuple(flat_weights + tensor_inputs + state), strict=False)
            if backend == "aoti" and cfg.build.jobs > 1:
                pool.append((key, ep, tmp))
                timings[key] = time.perf_counter() - t0  # its export; the worker's compile is added below
                continue
            if backend == "aoti":
                _aoti_compile(ep, str(tmp), _cxx_patch(model.device))
            else:
                ep.example_inputs = None  # they hold the weights and the state: not stored in engines
                torch.export.save(ep, str(tmp))
                if backend == "inductor":  # compile what the runtime compiles, as it calls it: its cache keys
                    compiled = runtime.load_engine(backend, tmp, model.device)
                    with torch.no_grad():
                        compiled(*[w.detach() for w in flat_weights], *map(runtime.packed, tensor_inputs), *state)
        os.replace(tmp, folder / name)
        timings[key] = time.perf_counter() - t0
        built.append(key)
    if pool:
        for key, seconds in _compile_aoti_in_workers(pool, engines, folder, cfg.build.jobs, model.device, progress):
            timings[key] += seconds
            built.append(key)
    shutil.rmtree(folder / ".partial", ignore_errors=True)
    if backend == "inductor" and built:
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is not None:
            with atomic_file(folder / "inductor-cache.bin", "wb") as fh:
                fh.write(artifacts[0])
    for f in folder.iterdir() if prune else ():  # engines of earlier builds that this schedule no longer uses
        if f.name.endswith((".pt2", ".plan")) and f.name not in {e["file"] for e in engines.values()}:
            f.unlink()
    by_tokens = {e["tokens"]: key for key, e in engines.items()}
    files = [weights_file] + [e["file"] for e in engines.values()]
    if backend == "inductor" and (folder / "inductor-cache.bin").is_file():
        files.append("inductor-cache.bin")
    manifest = {
        "schema": runtime.SCHEMA_VERSION,
        "model": {"family": cfg.model.family, "identity": model.identity, "config_hash": stable_hash(dict(model.transformer.config)),
                  "weights_sha256": runtime.sha256(folder / weights_file)},
        "video": {"frames": cfg.video.frames, "height": cfg.video.height, "width": cfg.video.width},
        "inputs": sig["inputs"], "constants": sig["constants"], "state": sig["state"], "state_update": "functional" if backend == "tensorrt" else "in_place",
        "per_branch": per_branch,
        "weights": {"file": weights_file, "order": sig["weights"]},
        "timesteps": schedule["timesteps"],
        "steps": [{"budget": b, "tokens": k, "engine": by_tokens.get(k) if k else None}
                  for b, k in zip(schedule["budget_per_step"], tokens)],
        "engines": engines, "files": {f: runtime.sha256(folder / f) for f in files},
        "toolchain": tc | {"source": source_hash()},
        "quality": {"mse": schedule["mse"], "psnr": schedule["psnr"], "mean_budget": schedule["mean_budget"],
                    "per_sample": schedule["per_sample"], "search": schedule["key"]},
        "build": {"backend": backend, "precision": cfg.build.precision, "dtype": cfg.model.dtype, "cfg": cfg.build.cfg,
                  "seconds": timings, "rebuilt": built},
        "transformer_config": {k: v for k, v in dict(model.transformer.config).items() if not k.startswith("_")},
    }
    write_json(folder / "manifest.json", manifest)
    return manifest
