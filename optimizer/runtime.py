"""The production runtime: load an engine folder and use it as the diffusers transformer.

    transformer = astraea.runtime.load("runs/tiny/engines")
    pipe.transformer = transformer          # or: sampling.denoise(..., transformer=transformer)

`load` verifies the manifest (schema, every file's sha256, torch version, device) and
returns an `EngineTransformer`: called with the family transformer's keyword arguments, it
finds the denoising step from the timestep (the stored scheduler timesteps; the first
timestep starts a new generation and resets the caches), runs that step's engine (a budget
of 0 reuses the last output; the first step is dense), owns the per-block state and
returns `(output,)` or an object with `.sample`. The weights are loaded once and passed to
every engine as inputs. `load(..., cuda_graphs=True)` replays each engine as a CUDA graph
per CFG branch (captured at its second call, the first having compiled and warmed it up):
one launch a call instead of about 1,300, for engines that update their state in place.
This module imports none of the build code (torch, safetensors and
the standard library only), so a deployment needs the engine folder and `astraea.runtime`.
A sequence-parallel folder (`rank<r>/` subfolders, astraea-build under torchrun) is loaded a
rank a process, through `astraea.parallel` (torch.distributed and diffusers' mesh config).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

import astraea.plugins  # noqa: F401  (the astraea:: ops the engines call: runtime kernels, not build code)
from astraea.plugins.fp8_linear import fp8_tensor_cores

from .errors import EngineError
from .manifest import FILE, Manifest, Step, TensorSpec, check_toolchain, input_value

BACKENDS = ("eager", "inductor", "aoti", "tensorrt")


TENSORRT_MISSING = ("TensorRT, which is not installed here (pip install 'astraea[tensorrt]' where NVIDIA's index "
                    "is reachable)")


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


class _TensorRTEngine:
    """A serialized TensorRT plan run on torch tensors: (weights, inputs, state) in the
    manifest's order -> (output, new state), functional (the state is double-buffered:
    new tensors each call, the old ones freed by the caller)."""

    def __init__(self, path: Path, device: torch.device, names: dict):
        import tensorrt as trt

        from astraea.plugins import trt as plugins  # the plugin creators of the AOT kernels in the plan

        plugins.register()
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT could not deserialize {path} (another TensorRT version or GPU?): rebuild")
        self.context = self.engine.create_execution_context()
        self.inputs, self.outputs, self.device = names["inputs"], names["outputs"], device
        to_torch = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                    trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool}
        self.dtypes = {n: to_torch[self.engine.get_tensor_dtype(n)] for n in self.outputs}

    def __call__(self, *tensors):
        for name, t in zip(self.inputs, tensors, strict=True):
            self.context.set_tensor_address(name, t.data_ptr())
        outs = [torch.empty(tuple(self.engine.get_tensor_shape(n)), dtype=self.dtypes[n], device=self.device)
                for n in self.outputs]
        for name, t in zip(self.outputs, outs):
            self.context.set_tensor_address(name, t.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise EngineError("TensorRT failed to run the engine (see its log)")
        return tuple(outs)


def empty_state(specs: tuple[TensorSpec, ...], device: torch.device) -> list[torch.Tensor]:
    """The block state before the first (dense) step: zeros in the manifest's layout."""
    return [torch.zeros(s.shape, dtype=s.torch_dtype, device=device) for s in specs]


def packed(t: torch.Tensor) -> torch.Tensor:
    """t with plain row-major strides: compiled engines are keyed and specialised on input
    strides, and pipelines pass expanded views (a timestep of stride 0)."""
    want = torch.empty(t.shape, dtype=t.dtype, device="meta").stride()
    return t if t.stride() == want else torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


@dataclass
class _Output:
    sample: torch.Tensor


class _Config(dict):
    """The transformer's config with attribute access, as pipelines read it (config.patch_size)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def load_engine(backend: str, path: Path, device: torch.device, names: dict | None = None,
                single_threaded: bool = False):
    """One engine file as a callable. single_threaded (aoti): run the package without its model
    container's thread synchronisation, which queries CUDA events between runs and so cannot
    be captured in a CUDA graph."""
    if backend in ("eager", "inductor"):
        module = torch.export.load(str(path)).module()
        if backend == "inductor":  # compiled at its first call: warm from the build's cache artifacts
            module = torch.compile(module, dynamic=False)
        return module
    if backend == "aoti":
        from torch._inductor import aoti_load_package

        return aoti_load_package(str(path), run_single_threaded=single_threaded)
    if backend == "tensorrt":
        if not tensorrt_available():
            raise EngineError(f"these engines are TensorRT plans: running them needs {TENSORRT_MISSING}")
        return _TensorRTEngine(path, device, names)
    raise EngineError(f"unknown backend {backend!r} in the manifest (this runtime knows {', '.join(BACKENDS)})")


class EngineTransformer(torch.nn.Module):
    """A drop-in for the family's diffusers transformer, running the compiled schedule."""

    def __init__(self, folder: Path, manifest: Manifest, device: torch.device, warm: bool = True,
                 cuda_graphs: bool = False):
        super().__init__()
        from safetensors.torch import load_file

        self.folder, self.manifest, self.device = folder, manifest, device
        t0 = time.perf_counter()
        self.inputs = manifest.inputs  # the tensor inputs, in the engines' order
        self.timesteps = torch.tensor(manifest.timesteps, dtype=torch.float64)
        self.steps = list(manifest.steps)
        weights = load_file(str(folder / manifest.weights_file), device=str(device))
        self.weights = [weights[name] for name in manifest.weights_order]
        self.fp8_weights = None  # a folder mixing precisions: its FP8 engines' own weights (the same names, e4m3)
        if manifest.fp8_weights:
            weights = load_file(str(folder / manifest.fp8_weights["file"]), device=str(device))
            self.fp8_weights = [weights[name] for name in manifest.fp8_weights["order"]]
        t1 = time.perf_counter()
        cache = folder / "inductor-cache.bin"
        if warm and cache.is_file() and "inductor-cache.bin" in manifest.files:
            torch.compiler.load_cache_artifacts(cache.read_bytes())
        self.engines, per_engine = {}, {}
        for key, e in manifest.engines.items():
            t = time.perf_counter()
            self.engines[key] = load_engine(e.backend, folder / e.file, device, e.io,
                                            single_threaded=cuda_graphs)
            per_engine[key] = time.perf_counter() - t
        self.load_seconds = {"weights": t1 - t0, "engines": time.perf_counter() - t1, "per_engine": per_engine}  # + "verify"
        self.batch = self.inputs[0].shape[0]  # the engines' batch: 1 per CFG branch, or the CFG batch
        self.branches: dict = {}  # per cache context and batch slice: {"step", "state", "last"}
        par = manifest.build.get("parallel") or {}
        self.cfg_parallel = None  # (this rank's CFG branch, the group of the ranks holding the two branches)
        if par.get("cfg"):
            from .parallel import cfg_branch

            self.cfg_parallel = cfg_branch(par["ulysses"])
        self.context = None
        self.config = _Config(manifest.transformer_config)
        self.in_place = manifest.state_update == "in_place"
        if cuda_graphs and (device.type != "cuda" or not self.in_place):
            raise EngineError("cuda_graphs needs a CUDA device and engines that update their state in place "
                              f"(aoti, inductor); these are {device.type} {manifest.state_update} engines")
        self.cuda_graphs = cuda_graphs
        self._graph_pool = torch.cuda.graph_pool_handle() if cuda_graphs else None

    @property
    def dtype(self) -> torch.dtype:
        return self.inputs[0].torch_dtype

    def reset(self) -> None:
        """Drop every branch: its state buffers and CUDA graphs (use_schedule keeps them)."""
        self.branches = {}
        if self.cuda_graphs:  # the allocator forgets a pool once its last graph is gone: capturing
            self._graph_pool = torch.cuda.graph_pool_handle()  # into the old handle again would assert

    def use_schedule(self, tokens: list[int], precisions: list[str] | None = None) -> None:
        """Run another schedule over the same engines (one folder, several speed/quality
        points): rows per step, the first dense, 0 reusing the last output; `precisions` (a
        folder mixing them): "model" or "fp8" a step, else the model dtype's engines. Every
        non-zero (row count, precision) needs an engine in the folder. Starts a new
        generation; in-place engines keep their state buffers and CUDA graphs (an engine's
        graph does not depend on the schedule)."""
        dense = self.manifest.dense_tokens
        if len(tokens) != len(self.timesteps) or (precisions is not None and len(precisions) != len(tokens)):
            raise EngineError(f"a schedule of {len(tokens)} steps; the engines were built for {len(self.timesteps)}")
        if tokens[0] != dense:
            raise EngineError(f"the first step must be dense ({dense} rows): the caches are empty before it")
        marks = precisions or [None] * len(tokens)
        keys = [self.manifest.engine_for(k, p) if k else None for k, p in zip(tokens, marks)]
        missing = sorted({(k, p or "model") for k, p, key in zip(tokens, marks, keys) if k and key is None})
        if missing:
            have = sorted((e.tokens, e.precision) for e in self.manifest.engines.values())
            raise EngineError(f"no engine computes {missing} (rows, precision); this folder has {have}: "
                              "build a schedule that uses them")
        self.steps = [Step(k / dense, k, key) for k, key in zip(tokens, keys)]
        if not self.in_place:
            self.reset()
            return
        for branch in self.branches.values():  # the same engines, buffers and graphs: only rewound
            branch["step"] = None

    @contextmanager
    def cache_context(self, name: str, **_):
        """What diffusers pipelines open around each call ("cond" / "uncond"): each
        branch keeps its own caches, as each row of a CFG batch selects its own tokens."""
        previous, self.context = self.context, name
        try:
            yield
        finally:
            self.context = previous

    def _step_of(self, timestep) -> int:
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        hits = torch.nonzero(torch.isclose(self.timesteps, torch.tensor(t, dtype=torch.float64), rtol=0, atol=1e-3))
        if len(hits) == 0:
            raise EngineError(f"timestep {t} is not one of the {len(self.timesteps)} timesteps the engines were built "
                              "for (the scheduler or its step count differs from the build's)")
        return int(hits[0])

    def _flat(self, kwargs: dict) -> list:
        flat = []
        for spec in self.inputs:
            name = spec.name
            value = input_value(kwargs, name)
            if not isinstance(value, torch.Tensor):
                raise EngineError(f"input {name!r} is missing (the engines take {[s.name for s in self.inputs]})")
            if tuple(value.shape) != spec.shape:
                raise EngineError(f"input {name!r} has shape {list(value.shape)}; the engines were built for "
                                  f"{list(spec.shape)} (rebuild for this video size or batch)")
            flat.append(packed(value.to(self.device, spec.torch_dtype)))
        return flat

    def _branch(self, kwargs: dict, batch: int, j: int) -> dict:
        """The inputs of the j-th engine batch of a CFG batch (tensors batched along dim 0 sliced)."""
        rows = slice(j * self.batch, (j + 1) * self.batch)
        return {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch else v
                for k, v in kwargs.items()}

    @torch.no_grad()
    def forward(self, return_dict: bool = True, **kwargs):
        step = self._step_of(kwargs.get("timestep"))
        hidden = kwargs.get("hidden_states")
        batch = hidden.shape[0] if isinstance(hidden, torch.Tensor) else self.batch
        if batch == self.batch:
            out = self._run((self.context, 0), step, kwargs)
        elif self.cfg_parallel is not None and batch == 2 * self.batch:  # CFG parallelism: this rank's branch
            from torch.distributed import _functional_collectives as funcol

            j, group = self.cfg_parallel
            mine = self._run((self.context, j), step, self._branch(kwargs, batch, j)).contiguous()
            out = funcol.wait_tensor(funcol.all_gather_tensor(mine, 0, group))  # the branches in order
        elif self.manifest.per_branch and batch % self.batch == 0:  # a CFG batch into per-branch engines
            parts = []
            for j in range(batch // self.batch):
                parts.append(self._run((self.context, j), step, self._branch(kwargs, batch, j)))
            out = torch.cat(parts)
        else:
            raise EngineError(f"called with batch {batch}; the engines were built for batch {self.batch} "
                              "(rebuild with the batch this pipeline uses: build.cfg)")
        return _Output(out) if return_dict else (out,)

    def _run(self, key, step: int, kwargs: dict) -> torch.Tensor:
        branch = self.branches.get(key)
        if step == 0 or branch is None or branch["step"] is None:
            if step != 0:
                raise EngineError(f"called at step {step} before step 0 of this generation")
            kept = branch if branch is not None and self.in_place else {}
            state = kept.get("state")
            if state is not None:  # a new generation in the same buffers (and the same CUDA graphs)
                for t in state:
                    t.zero_()
            branch = self.branches[key] = {"step": 0, "state": state, "last": None, "graphs": kept.get("graphs", {})}
        elif step != branch["step"]:
            raise EngineError(f"called at step {step} after step {branch['step'] - 1}: steps must run in order")
        entry = self.steps[step]
        branch["step"] = step + 1
        if entry.engine is None:  # budget 0: the cached final output
            return branch["last"]
        flat = self._flat(kwargs)
        if branch["state"] is None:
            branch["state"] = empty_state(self.manifest.state, self.device)
        result = self._call(entry.engine, branch, flat)
        if not self.in_place:  # the functional pair: (output, new state...)
            branch["state"] = list(result[1:])
        branch["last"] = result[0]  # in place: the engine wrote the new state into branch["state"]
        return result[0]

    def _call(self, key: str, branch: dict, flat: list) -> tuple:
        engine = self.engines[key]
        weights = self.fp8_weights if self.fp8_weights and self.manifest.engines[key].precision == "fp8" else self.weights
        graph = branch["graphs"].get(key) if self.cuda_graphs else None
        if graph is None:  # without graphs; or an engine's first call: it compiles, autotunes, sets up cuBLAS and cuDNN
            if self.cuda_graphs:
                branch["graphs"][key] = "warm"
            return engine(*weights, *flat, *branch["state"])
        if graph == "warm":  # capture (nothing runs), then replay below
            static = [t.clone() for t in flat]
            cuda_graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize(self.device)
            with torch.cuda.graph(cuda_graph, pool=self._graph_pool):
                out = engine(*weights, *static, *branch["state"])
            graph = branch["graphs"][key] = (cuda_graph, static, out[0])
        cuda_graph, static, out = graph
        for dst, src in zip(static, flat):
            dst.copy_(src)
        cuda_graph.replay()
        return (out.clone(),)  # the graph's output buffer is rewritten at its next replay


def check_precision(manifest: Manifest, device: torch.device) -> None:
    """FP8 engines need FP8 tensor cores on a GPU (they run simulated, slowly, on the CPU)."""
    if manifest.build.get("precision") == "fp8" and device.type == "cuda" and not fp8_tensor_cores(device):
        cc = ".".join(map(str, torch.cuda.get_device_capability(device)))
        raise EngineError(f"these engines are FP8 (build.precision fp8) and this GPU (compute capability {cc}) has no "
                          "FP8 tensor cores (8.9 and up: Ada, Hopper): rebuild with build.precision: model")


def rank_folder(folder: Path) -> Path:
    """The folder to load in this process: `folder` itself, or for a sequence-parallel build
    (rank0/, rank1/, ...: astraea-build under torchrun) this rank's; a world size that is not
    the engines' is refused in one line."""
    ranks = sorted(p.name for p in folder.glob("rank*") if (p / FILE).is_file()) if folder.is_dir() else []
    if (folder / FILE).is_file() or not ranks:
        return folder
    from .parallel import world

    rank, size = world()
    if size != len(ranks):
        raise EngineError(f"{folder} holds sequence-parallel engines for {len(ranks)} ranks and this process group has "
                          f"{size}: run under `torchrun --nproc-per-node {len(ranks)}`")
    return folder / f"rank{rank}"


def check_parallel(manifest: Manifest, folder: Path) -> None:
    """A rank's engines run in a process group of their world size, at their rank, over the
    mesh they were built on (set up here: their collectives name its process groups)."""
    par = manifest.build.get("parallel")
    if not par:
        return
    from .parallel import cp_config, world

    rank, size = world()
    if (rank, size) != (par["rank"], par["world_size"]):
        raise EngineError(f"{folder} holds rank {par['rank']} of {par['world_size']}'s engines, not rank {rank} of "
                          f"{size}'s: load the parent folder under `torchrun --nproc-per-node {par['world_size']}`")
    cp_config(par["ulysses"], par.get("cfg", False))


def load(folder: str | Path, device: str | torch.device | None = None, warm: bool = True,
         cuda_graphs: bool = False) -> EngineTransformer:
    """Verify and load an engine folder (see the module docstring). Raises EngineError.
    warm=False ignores the build's Inductor cache artifacts (a cold compile, to compare);
    cuda_graphs=True replays the engines as CUDA graphs (CUDA, in-place engines)."""
    t0 = time.perf_counter()
    folder = rank_folder(Path(folder))
    manifest = Manifest.read(folder)
    check_parallel(manifest, folder)
    device = torch.device(device or manifest.toolchain["device"])
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    check_toolchain(manifest.toolchain, device)
    check_precision(manifest, device)
    verify = time.perf_counter() - t0
    transformer = EngineTransformer(folder, manifest, device, warm, cuda_graphs)
    transformer.load_seconds["verify"] = verify
    return transformer
