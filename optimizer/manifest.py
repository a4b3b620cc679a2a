"""The engine folder's manifest: what `engines.build` writes last and `astraea.runtime` reads first.

`manifest.json` maps every denoising step to an engine (or to none: a skipped step), and
records the engines' tensor interface (weights by state-dict name, inputs, block state),
every file's sha256, the toolchain the engines were built with, and the schedule's quality
stamp. `Manifest.read(folder)` checks the JSON, the schema and every file's digest and
raises `EngineError` naming what to fix; `check_toolchain` refuses another torch, device
type or GPU generation. Standard library and torch only: the runtime imports this and
nothing of the build.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import EngineError

SCHEMA_VERSION = 1
FILE = "manifest.json"


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str  # a torch dtype's name: "bfloat16", "float8_e4m3fn", ...
    name: str | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def bytes(self) -> int:
        return math.prod(self.shape) * torch.empty(0, dtype=self.torch_dtype).element_size()

    def to_json(self) -> dict:
        raw = {"shape": list(self.shape), "dtype": self.dtype}
        return raw if self.name is None else {"name": self.name, **raw}

    @classmethod
    def from_json(cls, raw: dict) -> TensorSpec:
        return cls(tuple(int(d) for d in raw["shape"]), str(raw["dtype"]), raw.get("name"))


@dataclass(frozen=True)
class Engine:
    backend: str
    file: str
    tokens: int  # the rows it computes
    io: dict | None = None  # tensorrt: the plan's input and output tensor names
    precision: str = "model"  # "fp8": the FP8 model's (its weights: the manifest's fp8_weights where there are any)


@dataclass(frozen=True)
class Step:
    budget: float
    tokens: int
    engine: str | None  # the engine's key; None: the step is skipped (the last output reused)


@dataclass(frozen=True)
class Manifest:
    model: dict  # family, identity, config_hash, weights_sha256
    video: dict  # frames, height, width
    inputs: tuple[TensorSpec, ...]  # the transformer's tensor inputs, in the engines' order
    state: tuple[TensorSpec, ...]  # the block state, after the inputs
    weights_file: str
    weights_order: tuple[str, ...]  # state-dict names, in the engines' order (before the inputs)
    timesteps: tuple[float, ...]
    steps: tuple[Step, ...]
    engines: dict[str, Engine]
    files: dict[str, str]  # file name -> sha256
    toolchain: dict
    build: dict  # backend, precision, dtype, cfg, seconds per engine, rebuilt
    constants: dict = field(default_factory=dict)  # non-tensor inputs bound at export
    state_update: str = "in_place"  # or "functional": (output, new state...) returned
    per_branch: bool = False  # engines at batch 1, one CFG branch a call
    quality: dict = field(default_factory=dict)  # mse, psnr, mean_budget, per_sample, search
    transformer_config: dict = field(default_factory=dict)
    schema: int = SCHEMA_VERSION
    fp8_weights: dict | None = None  # a folder mixing precisions: {"file", "order"} of its FP8 engines' weights

    @property
    def backend(self) -> str:
        return self.build["backend"]

    @property
    def dense_tokens(self) -> int:
        return self.steps[0].tokens

    @property
    def by_tokens(self) -> dict[int, str]:
        """Engine key by the rows it computes (in a folder mixing precisions, the model dtype's)."""
        return {e.tokens: key for key, e in sorted(self.engines.items(), key=lambda item: item[1].precision == "model")}

    def engine_for(self, tokens: int, precision: str | None = None) -> str | None:
        """The key of the engine computing `tokens` rows in `precision` (None: the folder's
        own, the model dtype's where it mixes precisions); None if there is none."""
        if precision is None or not self.fp8_weights:  # one precision in the folder: the rows alone decide
            return self.by_tokens.get(tokens)
        return next((key for key, e in self.engines.items() if e.tokens == tokens and e.precision == precision), None)

    def state_bytes(self) -> int:
        """Bytes of block state the runtime keeps (both CFG branches where per branch)."""
        return sum(s.bytes for s in self.state) * (2 if self.per_branch else 1)

    # ---- JSON ------------------------------------------------------------------------------
    def to_json(self) -> dict:
        raw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        raw["inputs"] = [s.to_json() for s in self.inputs]
        raw["state"] = [s.to_json() for s in self.state]
        raw["weights"] = {"file": raw.pop("weights_file"), "order": list(raw.pop("weights_order"))}
        raw["timesteps"] = list(self.timesteps)
        raw["steps"] = [dataclasses.asdict(s) for s in self.steps]
        raw["engines"] = {k: {n: v for n, v in dataclasses.asdict(e).items() if v is not None or n != "io"}
                          for k, e in self.engines.items()}
        if self.fp8_weights is None:  # newer than the format: written only for a folder mixing precisions
            del raw["fp8_weights"]
        return raw

    @classmethod
    def from_json(cls, raw: dict) -> Manifest:
        return cls(
            model=dict(raw["model"]), video=dict(raw["video"]),
            inputs=tuple(TensorSpec.from_json(s) for s in raw["inputs"]),
            state=tuple(TensorSpec.from_json(s) for s in raw["state"]),
            weights_file=raw["weights"]["file"], weights_order=tuple(raw["weights"]["order"]),
            timesteps=tuple(float(t) for t in raw["timesteps"]),
            steps=tuple(Step(float(s["budget"]), int(s["tokens"]), s["engine"]) for s in raw["steps"]),
            engines={k: Engine(e["backend"], e["file"], int(e["tokens"]), e.get("io"), str(e.get("precision", "model")))
                     for k, e in raw["engines"].items()},
            files=dict(raw["files"]), toolchain=dict(raw["toolchain"]), build=dict(raw["build"]),
            constants=dict(raw.get("constants") or {}), state_update=raw.get("state_update", "functional"),
            per_branch=bool(raw.get("per_branch", False)), quality=dict(raw.get("quality") or {}),
            transformer_config=dict(raw.get("transformer_config") or {}), schema=int(raw["schema"]),
            fp8_weights=None if raw.get("fp8_weights") is None else {"file": raw["fp8_weights"]["file"],
                                                                    "order": tuple(raw["fp8_weights"]["order"])})

    @classmethod
    def read(cls, folder: str | Path, verify: bool = True) -> Manifest:
        """The folder's manifest, its schema checked and (verify) every file's sha256."""
        folder = Path(folder)
        path = folder / FILE
        if not path.is_file():
            raise EngineError(f"{folder} has no {FILE}: not an engine folder (astraea-build writes one)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise EngineError(f"{path} is not valid JSON ({e}): rebuild the engines") from None
        if not isinstance(raw, dict) or raw.get("schema") != SCHEMA_VERSION:
            schema = raw.get("schema") if isinstance(raw, dict) else None
            raise EngineError(f"{path}: schema {schema!r}, this runtime reads {SCHEMA_VERSION}")
        try:
            manifest = cls.from_json(raw)
        except (KeyError, TypeError, ValueError) as e:
            raise EngineError(f"{path} lacks or mangles {e} ({type(e).__name__}): rebuild the engines") from None
        if verify:
            for name, digest in manifest.files.items():
                f = folder / name
                if not f.is_file():
                    raise EngineError(f"{f} is missing: copy the whole engine folder, or rebuild")
                if sha256(f) != digest:
                    raise EngineError(f"{f} does not match its sha256 in the manifest (corrupted or replaced): rebuild")
        return manifest

    def write(self, folder: Path) -> None:
        """Atomically (a temp file renamed over manifest.json)."""
        import os
        import tempfile

        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{FILE}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self.to_json(), fh, indent=2, sort_keys=True, default=str)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, folder / FILE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def input_value(kwargs: dict, name: str):
    """The transformer argument an engine input names: `name` itself, or element i of a tuple
    argument, which torch.export flattens into inputs named `<name>_<i>` (CogVideoX's rotary
    cos/sin); None if there is none."""
    if name in kwargs:
        return kwargs[name]
    base, _, i = name.rpartition("_")
    value = kwargs.get(base)
    return value[int(i)] if i.isdigit() and isinstance(value, (tuple, list)) and int(i) < len(value) else None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def toolchain(device: torch.device) -> dict:
    """What an engine was built with (and must be loaded with)."""
    tc = {"torch": torch.__version__, "device": device.type, "cuda": torch.version.cuda, "compute_capability": None,
          "triton": None, "tensorrt": None}
    try:
        import triton

        tc["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        tc["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return tc


def check_toolchain(built: dict, device: torch.device) -> None:
    here = toolchain(device)
    if built["device"] != here["device"]:
        raise EngineError(f"the engines were built for {built['device']}, not {here['device']}: rebuild on this device")
    if built["torch"].split("+")[0].split(".")[:2] != here["torch"].split("+")[0].split(".")[:2]:
        raise EngineError(f"the engines were built with torch {built['torch']}, this is torch {here['torch']}: "
                          "rebuild them with this toolchain")
    if built.get("compute_capability") != here["compute_capability"]:
        raise EngineError(f"the engines were built for compute capability {built.get('compute_capability')}, this "
                          f"GPU is {here['compute_capability']}: rebuild them on this GPU")
