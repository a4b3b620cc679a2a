"""Engines: one compiled program per distinct budget of a schedule, a manifest, one weights file.

Each engine is the rewritten program of one budget (tokenwise.py), exported with
`torch.export` as a function of tensors only: (weights..., the transformer's tensor
inputs..., block state...) -> (output, new block state...). The weights are inputs, so
they are stored once (`weights.safetensors`) and held in memory once by the runtime,
whatever the number of engines; non-tensor arguments (e.g. `return_dict`) are bound at
export. The backends are a table (`BUILDERS`), one builder each:
  eager     the exported program (`<key>.pt2`), run as its GraphModule (debugging)
  inductor  the same `.pt2`, compiled by the runtime with torch.compile; Inductor's cache
            artifacts from the build (`inductor-cache.bin`) let it start warm
  aoti      an AOTInductor package (`<key>.aoti.pt2`) with the ops' kernels compiled in;
            with build.jobs > 1 the exported programs are compiled that many at once, each
            in a worker process (spawned; zero-filled inputs of the program's shapes stand
            in for the weights and state, which only autotuning reads)
  tensorrt  ONNX with the astraea nodes (onnx_export.py), then a plan with their plugins
            (trt_build.py): functional state (double-buffered), where TensorRT is installed
An engine's key hashes its graph, shapes, backend, precision, the pass/ops source and the
toolchain; an engine whose key exists in the folder is not rebuilt. `manifest.json`
(astraea.manifest, read by astraea.runtime) is written last, atomically, with every
file's sha256.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import astraea.plugins as plugins

from . import runtime
from .errors import EngineError
from .io import atomic_file, source_hash, stable_hash
from .manifest import SCHEMA_VERSION, Engine, Manifest, Step, input_value, sha256, toolchain
from .sampling import first_step_kwargs
from .schedule import Schedule
from .schema import RunConfig
from .tokenwise import (
    Signature,
    TensorStep,
    TokenwiseProgram,
    build_programs,
    copy_graph_module,
    signature,
    weight_tensors,
)

log = logging.getLogger("astraea")


def one_branch(kwargs: dict) -> dict:
    """The transformer's inputs of one CFG branch (the prompt's, second of the batch of 2)."""
    return {k: v[1:] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == 2 else v for k, v in kwargs.items()}


@dataclass
class Job:
    """One engine to build: its program and the tensors it is exported at."""

    key: str
    tokens: int
    program: TokenwiseProgram
    sig: Signature
    weights: list[torch.Tensor]
    inputs: list[torch.Tensor]
    tmp: Path  # write the engine here; build() moves it into the folder
    folder: Path
    device: torch.device

    def exported(self, decompose: bool = False) -> torch.export.ExportedProgram:
        """The in-place step as an ExportedProgram (example inputs: the weights, inputs and zero
        state); decompose: FP8 Linear layers written out in ATen ops, for a compiler to fuse, and
        factored attention as its grouping around astraea::sparse_attention (no Python op left
        in an AOTI package)."""
        state = runtime.empty_state(self.sig.state, self.device)
        graph = inlined(self.program.graph) if decompose else self.program.graph
        step = TensorStep(graph, self.sig.layout, in_place=True)
        ep = torch.export.export(step, tuple(self.weights + self.inputs + state), strict=False)
        return plugins.decompose(ep) if decompose else ep  # decompose: only what the inlined functions emit


def inlined(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of gm calling the Python implementation of every op plugins.decompose writes out
    (plugins.decompositions), so that exporting it traces them in the same pass: one trace of
    the graph instead of an export and then ExportedProgram.run_decompositions over it (half
    the time an STDiT3-XL/2 engine spends before its compiler: docs/benchmarks.md). gm itself
    if it has none."""
    table = plugins.decompositions()
    if not any(n.op == "call_function" and n.target in table for n in gm.graph.nodes):
        return gm
    gm = copy_graph_module(gm)
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in table:
            n.target = table[n.target]
    gm.recompile()
    return gm


class Builder:
    """One backend: a file suffix, a state convention, and how to write an engine."""

    suffix = ".pt2"
    state_update = "in_place"  # or "functional": (output, new state...) returned

    def __init__(self, cfg: RunConfig, progress: bool):
        self.cfg, self.progress = cfg, progress

    @staticmethod
    def refuse(cfg: RunConfig) -> str | None:
        """Why this backend cannot build cfg here (None: it can)."""
        return None

    def build(self, job: Job) -> bool:
        """Write job.tmp; False defers it to finish()."""
        raise NotImplementedError

    def finish(self) -> Iterable[tuple[Job, float]]:
        """Complete deferred jobs: (job, seconds) with job.tmp written, each as it finishes
        (build moves it into place before the next: a build stopped midway keeps it)."""
        return []

    def files(self, folder: Path, built: list[str]) -> list[str]:
        """Extra files of the folder the runtime needs (after the build)."""
        return []


class EagerBuilder(Builder):
    def build(self, job: Job) -> bool:
        ep = job.exported()
        ep.example_inputs = None  # they hold the weights and the state: not stored in engines
        torch.export.save(ep, str(job.tmp))
        return True


class InductorBuilder(Builder):
    def build(self, job: Job) -> bool:
        ep = job.exported(decompose=True)
        ep.example_inputs = None  # they hold the weights and the state: not stored in engines
        torch.export.save(ep, str(job.tmp))
        # compile what the runtime compiles, as it calls it: its cache keys
        compiled = runtime.load_engine("inductor", job.tmp, job.device)
        state = runtime.empty_state(job.sig.state, job.device)
        with torch.no_grad():
            compiled(*[w.detach() for w in job.weights], *map(runtime.packed, job.inputs), *state)
        return True

    def files(self, folder: Path, built: list[str]) -> list[str]:
        if built:
            artifacts = torch.compiler.save_cache_artifacts()
            if artifacts is not None:
                with atomic_file(folder / "inductor-cache.bin", "wb") as fh:
                    fh.write(artifacts[0])
        return ["inductor-cache.bin"] if (folder / "inductor-cache.bin").is_file() else []


class AotiBuilder(Builder):
    suffix = ".aoti.pt2"

    def __init__(self, cfg: RunConfig, progress: bool):
        super().__init__(cfg, progress)
        self.pool: list[Job] = []  # with build.jobs > 1: exported and compiled in finish()

    @staticmethod
    def _compile_here(job: Job) -> float:
        """AOTInductor on job's program in this process; its seconds."""
        t0 = time.perf_counter()
        _aoti_compile(job.exported(decompose=True), str(job.tmp), _cxx_patch(job.device))
        return time.perf_counter() - t0

    def build(self, job: Job) -> bool:
        if self.cfg.build.jobs > 1:
            self.pool.append(job)
            return False
        self._compile_here(job)
        return True

    def finish(self) -> Iterable[tuple[Job, float]]:
        if len(self.pool) == 1:  # one program: no worker to start
            job, = self.pool
            return [(job, self._compile_here(job))]
        return _compile_aoti_in_workers(self.pool, self.cfg.build.jobs, self.progress) if self.pool else []


class TensorRTBuilder(Builder):
    suffix = ".plan"
    state_update = "functional"

    @staticmethod
    def refuse(cfg: RunConfig) -> str | None:
        if cfg.selection.cache != "model":
            return ("selection.cache: float8 is not built for the tensorrt backend (its ONNX state is the model's "
                    "dtype); use cache: model, or an inductor or aoti backend")
        if not runtime.tensorrt_available():
            return f"build.backend: tensorrt needs {runtime.TENSORRT_MISSING}; here, build eager, inductor or aoti engines"
        return None

    def build(self, job: Job) -> bool:
        from . import onnx_export, trt_build

        onnx_path = job.folder / f"{job.key}.onnx"
        onnx_export.export(job.program, job.sig, job.weights, job.inputs, onnx_path, job.device)
        trt_build.build_plan(onnx_path, job.tmp, job.folder / "timing.cache")
        return True


BUILDERS: dict[str, type[Builder]] = {"eager": EagerBuilder, "inductor": InductorBuilder, "aoti": AotiBuilder,
                                      "tensorrt": TensorRTBuilder}


def refusal(cfg: RunConfig, backend: str | None = None) -> str | None:
    """Why the engines of cfg cannot be built here, before any work (None: they can)."""
    backend = backend or cfg.build.backend
    if backend not in BUILDERS:
        return f"build.backend: {backend!r} engines are not built by this release (it builds {', '.join(BUILDERS)})"
    return BUILDERS[backend].refuse(cfg)


def _cxx_patch(device: torch.device) -> dict:
    """AOTInductor's wrapper must be built with g++ 12 on the GPU image (../shared/GPU.md)."""
    if device.type == "cuda" and shutil.which("g++-12"):
        return {"cpp.cxx": (None, "g++-12")}
    return {}


def _aoti_compile(ep: torch.export.ExportedProgram, package_path: str, patch: dict) -> None:
    from torch._inductor import aoti_compile_and_package

    with torch._inductor.config.patch(patch):
        aoti_compile_and_package(ep, package_path=package_path)


def _aoti_worker(export_path: str, package_path: str, device: str, patch: dict) -> float:
    """AOTInductor on an exported program saved without example inputs (in a spawned worker,
    or in the build's process for a single package); zero tensors of its placeholders' shapes,
    strides and dtypes stand in for them."""
    t0 = time.perf_counter()
    import astraea.plugins  # noqa: F401  (the astraea:: ops the program calls)

    ep = torch.export.load(export_path)
    user = set(ep.graph_signature.user_inputs)
    vals = [n.meta["val"] for n in ep.graph.nodes if n.op == "placeholder" and n.name in user]
    ep.example_inputs = (tuple(torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=device).zero_()
                               for v in vals), {})
    _aoti_compile(ep, package_path, patch)
    return time.perf_counter() - t0


def _save_for_worker(job: Job) -> Path:
    """job's program exported and saved beside its package's temp path without its example
    inputs (the weights and the block state: 12 GB a program for STDiT3-XL/2 at 23,850 tokens;
    held by every program of a build, they filled the H100 before its workers started)."""
    ep = job.exported(decompose=True)
    exported = job.tmp.with_name(f"{job.key}.export.pt2")
    ep.example_inputs = None
    torch.export.save(ep, str(exported))
    return exported


def _compile_aoti_in_workers(pool: list[Job], jobs: int, progress: bool) -> Iterator[tuple[Job, float]]:
    """AOTInductor on the jobs' programs, `jobs` worker processes at once: this process exports
    each program and hands it to a worker straight away, so the next export overlaps the
    compiles (an STDiT3-XL/2 export takes 17 s on the H100's host, a compile 2-4 min). Yields
    (job, export and compile seconds) as each package is done, also between exports, so
    that the build keeps the packages done before a stop (a device call's time limit) and the
    next build skips them."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    jobs = min(jobs, len(pool))
    bar = tqdm(total=len(pool), desc=f"engines (aoti, {jobs} at once)", unit="engine", disable=not progress,
               leave=False)
    with bar, ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as workers:
        futures, exported_s = {}, {}

        def done(future) -> tuple[Job, float]:
            job = futures.pop(future)
            try:
                seconds = future.result()
            except Exception as e:  # noqa: BLE001  (the worker's error, on one line, with the engine it was for)
                last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
                raise EngineError(f"AOTInductor failed for the {job.tokens}-row engine in a build worker: {last} "
                                  "(build.jobs: 1 builds in this process)") from e
            bar.update()
            return job, exported_s[job.key] + seconds

        try:
            for job in pool:
                t0 = time.perf_counter()
                path = _save_for_worker(job)
                exported_s[job.key] = time.perf_counter() - t0
                log.debug("engine %s (%d rows): exported in %.1f s", job.key, job.tokens, exported_s[job.key])
                futures[workers.submit(_aoti_worker, str(path), str(job.tmp), str(job.device),
                                       _cxx_patch(job.device))] = job
                for future in [f for f in futures if f.done()]:
                    yield done(future)
            if pool[0].device.type == "cuda":
                torch.cuda.empty_cache()  # the last export's example tensors: the workers need the memory
            while futures:
                for future in wait(futures, return_when=FIRST_COMPLETED).done:
                    yield done(future)
        except BaseException:
            workers.shutdown(wait=True, cancel_futures=True)  # the running compiles end; none starts
            raise


def _programs(cfg: RunConfig, model, programs: dict[int, TokenwiseProgram], wanted: list[int], per_branch: bool,
              kwargs: dict, progress: bool) -> dict[int, TokenwiseProgram]:
    if per_branch:  # the same programs at batch 1: one CFG branch a call (each branch selects its own rows)
        return build_programs(model, cfg, wanted, progress, example=kwargs)
    missing = [k for k in wanted if k not in programs]  # the schedule's budgets that the caller did not rewrite
    return {**programs, **build_programs(model, cfg, missing, progress)} if missing else programs


def _weights_file(folder: Path, weights: dict[str, torch.Tensor], identity: dict) -> str:
    """The weights, stored once under a name keyed by their names, shapes and the model."""
    key = stable_hash({n: [list(t.shape), str(t.dtype)] for n, t in weights.items()} | {"id": identity})
    name = f"weights-{key}.safetensors"
    if not (folder / name).is_file():
        from safetensors.torch import save_file

        tmp = folder / f".{name}.tmp"
        save_file({n: t.detach().contiguous().cpu() for n, t in weights.items()}, str(tmp))
        os.replace(tmp, folder / name)
    return name


def build(cfg: RunConfig, model, programs: dict[int, TokenwiseProgram], schedule: Schedule, out: Path,
          backend: str | None = None, progress: bool = True, prune: bool = True, fp8=None) -> Manifest:
    """Engines for every distinct non-zero budget of `schedule` under <out>/engines, then the
    manifest (under parallel: this rank's, in <out>/engines/rank<r>, the manifest's
    build.parallel recording the world size and mesh; the programs are the rank's).
    prune=False keeps the engine files of earlier builds that this schedule does not use (a
    benchmark's folder, built a schedule at a time: a later schedule finds them by key instead
    of rebuilding). A schedule that mixes precisions (search.precision joint) needs `fp8`, the
    FP8 model and its programs ({} to rewrite them): its FP8 steps get the FP8 model's
    engines, on a weights file of their own (fp8_weights in the manifest)."""
    backend = backend or cfg.build.backend
    why = refusal(cfg, backend)
    if why is not None:
        raise EngineError(why)
    builder = BUILDERS[backend](cfg, progress)
    folder = out / "engines"
    parallel = {}
    pa = cfg.parallel
    if pa.ulysses > 1 or pa.cfg:  # this rank's engines (its programs: capture.sharded) in engines/rank<r>
        from .parallel import world

        rank, size = world()
        parallel = {"ulysses": pa.ulysses, "cfg": pa.cfg, "rank": rank, "world_size": size,
                    "mesh": {**({"cfg": 2} if pa.cfg else {}), "ring": pa.ring, "ulysses": pa.ulysses}}
        folder = folder / f"rank{rank}"
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = first_step_kwargs(model, cfg.video, cfg.sampling)
    per_branch = cfg.sampling.guidance > 1 and (cfg.build.cfg == "per_branch" or cfg.parallel.cfg or (
        cfg.build.cfg == "auto" and model.family.pipeline_cfg_per_branch))  # CFG parallelism: a branch a rank group
    if per_branch:
        kwargs = one_branch(kwargs)
    mixed = schedule.mixed
    if mixed and fp8 is None:
        raise EngineError("this schedule runs some steps in FP8 (precision_per_step): its engines need the FP8 model")
    marks = schedule.precisions or ("model",) * schedule.steps
    wanted = {p: sorted({k for k, m in zip(schedule.tokens, marks) if k and m == p}) for p in ("model", "fp8")}
    programs = _programs(cfg, model, programs, wanted["model"], per_branch, kwargs, progress)
    any_tp = programs[max(programs)]
    sig = signature(any_tp, kwargs)
    tc = toolchain(model.device)
    weights = weight_tensors(any_tp, sig.weights)
    weights_file = _weights_file(folder, weights, model.identity)
    flat_weights = [weights[n] for n in sig.weights]
    tensor_inputs = [input_value(kwargs, s.name) for s in sig.inputs]
    # each call: (rows, precision, its program, its weights in order); the model's own precision:
    # fp8 for the FP8 model (astraea.quantize marks its identity), else the model dtype
    own = "fp8" if model.identity.get("precision") == "fp8" else "model"
    if mixed and own == "fp8":
        raise EngineError("a schedule that mixes precisions takes the model-dtype model, its FP8 one as fp8")
    calls = [(k, own, programs[k], sig, flat_weights) for k in wanted["model"]]
    fp8_weights = None
    if mixed:
        fp8_model, fp8_programs = fp8
        fp8_programs = _programs(cfg, fp8_model, fp8_programs, wanted["fp8"], per_branch, kwargs, progress)
        fp8_sig = signature(fp8_programs[wanted["fp8"][0]], kwargs)
        if (fp8_sig.inputs, fp8_sig.state, fp8_sig.constants) != (sig.inputs, sig.state, sig.constants):
            raise EngineError("the FP8 model's programs take other inputs or block state than the model's: "
                              "one schedule cannot run both")
        named = weight_tensors(fp8_programs[wanted["fp8"][0]], fp8_sig.weights)
        fp8_weights = {"file": _weights_file(folder, named, fp8_model.identity), "order": fp8_sig.weights}
        calls += [(k, "fp8", fp8_programs[k], fp8_sig, [named[n] for n in fp8_sig.weights]) for k in wanted["fp8"]]

    engines, built, timings = {}, [], {}
    by_call = {}
    (folder / ".partial").mkdir(exist_ok=True)
    for k, precision, tp, call_sig, call_weights in tqdm(calls, desc=f"engines ({backend})", unit="engine",
                                                         disable=not progress, leave=False):
        key = stable_hash({"graph": tp.graph.code, "inputs": [s.to_json() for s in sig.inputs],
                           "state": [s.to_json() for s in sig.state], "backend": backend,
                           "precision": precision, "selection": dataclasses.asdict(cfg.selection),
                           "source": source_hash(), "toolchain": tc})
        by_call[(k, precision)] = key
        name = f"{key}{builder.suffix}"
        io = None
        if backend == "tensorrt":
            from . import onnx_export

            io = {"inputs": onnx_export.input_names(call_sig), "outputs": onnx_export.output_names(call_sig)}
        engines[key] = Engine(backend, name, k, io, precision)
        if (folder / name).is_file():
            continue
        t0 = time.perf_counter()
        job = Job(key, k, tp, call_sig, call_weights, tensor_inputs, folder / ".partial" / name, folder, model.device)
        done = builder.build(job)  # the tmp file keeps the engine's name: it names the archive's inner folder
        timings[key] = time.perf_counter() - t0  # deferred: the time finish() reports is added below
        if done:
            log.debug("engine %s (%d rows): built in %.1f s", key, k, timings[key])
            os.replace(job.tmp, folder / name)
            built.append(key)
    for job, seconds in builder.finish():
        os.replace(job.tmp, folder / engines[job.key].file)
        timings[job.key] += seconds
        built.append(job.key)
        log.debug("engine %s (%d rows): built in %.1f s", job.key, job.tokens, timings[job.key])
    shutil.rmtree(folder / ".partial", ignore_errors=True)
    extra = builder.files(folder, built)
    if prune:  # engines of earlier builds that this schedule no longer uses
        for f in folder.iterdir():
            if f.name.endswith((".pt2", ".plan")) and f.name not in {e.file for e in engines.values()}:
                f.unlink()
    files = [weights_file] + ([fp8_weights["file"]] if fp8_weights else []) + [e.file for e in engines.values()] + extra
    quality = schedule.quality
    manifest = Manifest(
        model={"family": cfg.model.family, "identity": model.identity,
               "config_hash": stable_hash(dict(model.transformer.config)), "weights_sha256": sha256(folder / weights_file)},
        video={"frames": cfg.video.frames, "height": cfg.video.height, "width": cfg.video.width},
        inputs=sig.inputs, state=sig.state, weights_file=weights_file, weights_order=sig.weights,
        timesteps=schedule.timesteps,
        steps=tuple(Step(b, k, by_call[(k, own if m == "model" else "fp8")] if k else None)
                    for b, k, m in zip(schedule.budgets, schedule.tokens, marks)),
        engines=engines, files={f: sha256(folder / f) for f in files}, toolchain=tc | {"source": source_hash()},
        build={"backend": backend, "precision": "fp8" if own == "fp8" or mixed else "model", "dtype": cfg.model.dtype,
               "cfg": cfg.build.cfg,
               "seconds": timings, "rebuilt": built} | ({"parallel": parallel} if parallel else {}),
        constants=sig.constants, state_update=builder.state_update, per_branch=per_branch,
        quality={"mse": None if quality is None else quality.mse, "psnr": None if quality is None else quality.psnr,
                 "mean_budget": schedule.mean_budget, "per_sample": {} if quality is None else quality.per_sample,
                 "search": schedule.key},
        transformer_config={k: v for k, v in dict(model.transformer.config).items() if not k.startswith("_")},
        schema=SCHEMA_VERSION, fp8_weights=fp8_weights,
    )
    manifest = Manifest.from_json(json.loads(json.dumps(manifest.to_json(), default=str)))  # as it reads back
    manifest.write(folder)
    return manifest
