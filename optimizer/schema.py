"""The model.yaml schema: RunConfig and its sections as frozen dataclasses, checked key by key.

A field's type, default and `spec(...)` metadata (range, choices, doc) are the whole rule
set, checked generically by `_build`; `parse` adds the rules across keys. Rules that need
the model family (frame counts, strides, schedulers) are the adapter's `validate`, run by
`astraea.config.load` / `from_dict` after this. docs/config.md documents the same fields
key by key. Every stage imports its types from here; nothing here imports a stage.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, nearest

DTYPES = ("bf16", "fp16", "fp32")
BACKENDS = ("eager", "inductor", "aoti", "tensorrt")


def spec(default: Any = dataclasses.MISSING, *, lo=None, hi=None, choices=None, doc: str = "", **kw):
    """A dataclass field carrying its validation rule (lo/hi inclusive bounds, choices)."""
    meta = {"lo": lo, "hi": hi, "choices": choices, "doc": doc}
    if isinstance(default, (list, tuple, dict)):
        return field(default_factory=lambda: default, metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass(frozen=True)
class ModelSpec:
    family: str = spec(doc="model family: wan | hunyuan_video | cogvideox")
    preset: str | None = spec(None, doc="a preset name: random weights at that model's real size, or a tiny one")
    checkpoint: str | None = spec(None, doc="a local diffusers checkpoint folder (with transformer/)")
    dtype: str = spec("bf16", choices=DTYPES, doc="weights and activations dtype")
    device: str = spec("auto", doc="auto | cpu | cuda | cuda:N | meta")
    weights_seed: int = spec(0, lo=0, doc="seed of the random weights of a preset")


@dataclass(frozen=True)
class VideoSpec:
    frames: int = spec(lo=1, doc="frames of the decoded video")
    height: int = spec(lo=8, doc="pixels")
    width: int = spec(lo=8, doc="pixels")


@dataclass(frozen=True)
class SamplingSpec:
    steps: int = spec(50, lo=1, hi=1000, doc="denoising steps")
    guidance: float = spec(5.0, lo=1.0, hi=50.0, doc="classifier-free guidance scale; 1 = no CFG batch")
    embedded_guidance: float | None = spec(None, lo=0.0, hi=50.0, doc="HunyuanVideo's distilled guidance")
    scheduler: str = spec("default", doc="default | flow_match_euler | unipc | cogvideox_ddim | cogvideox_dpm")
    shift: float | None = spec(None, lo=0.0, hi=100.0, doc="flow shift of flow-matching schedulers")
    seeds: tuple[int, ...] = spec((0,), doc="one sample per prompt and seed")
    prompts: tuple[str, ...] = spec((), doc="prompts (or prompt_file)")
    prompt_file: str | None = spec(None, doc="text file, one prompt a line, relative to model.yaml")
    negative_prompt: str = spec("", doc="negative prompt of the CFG branch")
    text_length: int | None = spec(None, lo=1, hi=4096, doc="text tokens (default: the family's)")


@dataclass(frozen=True)
class TargetSpec:
    budget: float | None = spec(None, lo=0.0, hi=1.0, doc="mean token budget over the steps")
    speedup: float | None = spec(None, lo=1.0, hi=100.0, doc="target speedup over the dense model")


@dataclass(frozen=True)
class SearchSpec:
    population: int = spec(50, lo=2, hi=10000)
    children: int = spec(30, lo=1, hi=10000, doc="children a generation")
    generations: int = spec(30, lo=0, hi=10000)
    levels: int = spec(11, lo=2, hi=101, doc="budget levels 0, 1/(levels-1), ..., 1")
    gene_steps: int = spec(1, lo=1, hi=10000, doc="consecutive steps that share one budget level (a gene; the dense "
                           "first step stays alone): 1 = a level a step, the paper's; 5 = 10 genes for 50 steps, "
                           "fewer degrees of freedom to fit the search's own samples with")
    mutation_start: float = spec(0.1, lo=0.0, hi=1.0)
    mutation_end: float = spec(0.01, lo=0.0, hi=1.0)
    repair_low: float = spec(0.9, lo=0.0, hi=1.0, doc="repair into [low, high] x target")
    repair_high: float | None = spec(None, lo=1.0, hi=10.0, doc="default: 1.1 with target.budget (the paper's band), "
                                     "1.0 with target.speedup (at least the speedup asked)")
    seed: int = spec(0, lo=0)
    early_stop: bool = spec(True, doc="stop a child once its partial fitness cannot survive (exact)")
    share_prefixes: bool = spec(True, doc="children with a common schedule prefix share its sampling state (exact)")
    prefix_cache_gb: float = spec(4.0, lo=0.0, hi=4096.0, doc="memory for the shared prefixes' sampling states")
    proxy_video: tuple[int, ...] = spec((), lo=1, doc="[frames, height, width] of a smaller video the search evaluates "
                                        "candidates at (the same steps and prompts); [] = the full video")
    batch_samples: bool = spec(True, doc="a candidate's calibration samples evaluated as one batch: at the proxy video, "
                               "and at the full video on an accelerator (not with a stochastic scheduler such as "
                               "cogvideox_dpm)")
    compile: bool = spec(False, doc="the fitness programs compiled with torch.compile (Inductor) at their first call: "
                         "fewer, fused kernels a step (on the CPU 1.2-1.3x a bundled-model step after about 30 s a "
                         "budget); fitness then differs from the eager programs' by float rounding")
    cuda_graphs: bool = spec(False, doc="the fitness programs replayed as CUDA graphs (a CUDA device): one launch a "
                             "step instead of one a kernel, for small models whose steps are launch-bound; holds "
                             "a copy of the step's inputs and one of each program's outputs on the device")
    rescore: int = spec(6, lo=1, hi=10000, doc="with proxy_video: the proxy's best candidates re-evaluated at the full "
                                              "video; the schedule chosen is the best of them there")
    validate: int = spec(6, lo=0, hi=10000, doc="with proxy_video: more candidates, spread over the proxy's ranking, "
                                               "re-evaluated at the full video to measure how well the proxy ranks")
    refine_generations: int = spec(0, lo=0, hi=10000, doc="with proxy_video: generations of evolution at the full "
                                   "video after the re-scoring, its parents the re-scored candidates (multi-fidelity: "
                                   "the proxy finds the region, the full video ranks within it)")
    refine_children: int = spec(0, lo=0, hi=10000, doc="children a refine generation (0: search.children)")
    proxy_min_spearman: float = spec(0.6, lo=-1.0, hi=1.0, doc="with proxy_video: below this rank correlation between "
                                     "proxy and full fitness the build warns that the proxy is not validated")
    holdout_prompts: tuple[str, ...] = spec((), doc="prompts the search never sees: the chosen schedule is sampled on "
                                            "them (with every seed) afterwards and its PSNR there reported")
    holdout_seeds: tuple[int, ...] = spec((), lo=0, doc="seeds the search never sees (with every prompt), likewise")
    cost_from: str | None = spec(None, doc="an astraea-bench bench.json measured on the deployment card, relative to "
                                 "model.yaml: the schedule's time is predicted from its compiled calls by budget and "
                                 "its dense eager step (a speedup target is then that card's), not measured here")
    precision: str = spec("model", choices=("model", "joint"),
                          doc="joint (with build.precision fp8 and a speedup target): each step's precision searched "
                              "with its budget, a gene either a budget level in model.dtype or one in FP8 (a level "
                              "skipped needs none), timed by the cost model of each; model: every step in the "
                              "engines' one precision")
    fp8_cost_from: str | None = spec(None, doc="with precision joint and cost_from: the bench.json of FP8 engines "
                                     "(build.precision fp8) on the same card, whose compiled rows time the FP8 levels")


@dataclass(frozen=True)
class SelectionSpec:
    w_beta: float = spec(0.5, lo=0.0, hi=100.0, doc="staleness weight of the selection score (ASTRAEA.md section 2)")
    delta: str = spec("full", choices=("full", "sketch"),
                      doc="Delta from the block input at the row's last compute (full: D values a row in the state) "
                          "or from a random sketch of it (sketch_dim float32 values a row)")
    sketch_dim: int = spec(64, lo=4, hi=4096, doc="dimensions of the sketch when delta is sketch")
    cache: str = spec("model", choices=("model", "float8"),
                      doc="the cached block outputs in the model's dtype, or float8 (e4m3) with a float32 scale a "
                          "row: half the state's largest part in bf16, at a quality cost (docs/benchmarks.md)")
    shards: int = spec(1, lo=1, hi=64, doc="the video rows in this many contiguous shards, each choosing its share of "
                       "a step's rows by its own top-k: what sequence parallelism over as many ranks selects")


@dataclass(frozen=True)
class BuildSpec:
    backend: str = spec("inductor", choices=BACKENDS)
    precision: str = spec("model", choices=("model", "fp8"),
                          doc="engine precision: model = model.dtype; fp8 = the Linear layers in e4m3, calibrated with "
                              "nvidia-modelopt (astraea.quantize); attention and the rest stay in model.dtype")
    fp8_scaling: str = spec("channel", choices=("channel", "tensor"),
                            doc="fp8: channel = a weight scale an output channel and each input row scaled by its own "
                                "amax; tensor = one scale a weight and one a layer's input, calibrated")
    fp8_keep: tuple[str, ...] = spec(("auto",), doc="fp8: the groups left in model.dtype (a block 'blocks.0', "
                                     "'blocks.-1' for the last, or a module outside the blocks 'proj_out'); auto = "
                                     "by measurement, most sensitive first until fp8_min_psnr")
    fp8_min_psnr: float = spec(40.0, lo=0.0, hi=200.0, doc="fp8 with fp8_keep auto: the PSNR of the dense FP8 model "
                               "against dense (final latents, the config's prompts x seeds) the selection reaches")
    output: str | None = spec(None, doc="run folder (default runs/<config name>), relative to the cwd")
    cfg: str = spec("auto", choices=("auto", "per_branch", "batched"),
                    doc="engines at batch 1 per CFG branch or at the CFG batch of 2; auto = what the family's diffusers pipeline calls")
    jobs: int = spec(1, lo=1, hi=64, doc="aoti: engines compiled at once, each in its own worker process (the "
                     "programs are exported first, one at a time); other backends build one at a time")


# the peers' settings in bench.peers ("pab skip=2 cross=6"): each peer's knobs and their types
KNOBS = {"pab": {"skip": int, "cross": int, "lo": float, "hi": float}, "first_block_cache": {"threshold": float},
         "taylorseer": {"interval": int, "order": int, "warmup": int},
         "faster_cache": {"skip": int, "lo": float, "hi": float},
         "mag_cache": {"threshold": float, "max_skip": int, "retention": float},
         "toca": {"ratio": float, "interval": int, "cross": int, "first": int}}  # the knobs a setting may give
PEERS = tuple(KNOBS)
TOCA_FAMILIES = ("wan", "opensora", "cogvideox", "hunyuan_video")  # astraea.toca.ROLES: which submodule is which
NOT_DIFFUSERS = ("opensora",)  # transformers written here: diffusers' cache hooks do not apply


def peer_refusal(name: str, family: str) -> str | None:
    """Why peer `name` does not apply to `family` (None: it does): ToCa needs its roles for the
    family's blocks (astraea.toca.ROLES); diffusers' cache hooks need a diffusers model."""
    if name == "toca" and family not in TOCA_FAMILIES:
        return f"toca is defined for {', '.join(TOCA_FAMILIES)} blocks, not {family}'s: drop it"
    if name != "toca" and family in NOT_DIFFUSERS:
        return f"{name} is one of diffusers' cache hooks, which need a diffusers model; {family}'s transformer is " \
               "written here: use toca"
    return None


def parse_setting(text: str) -> tuple[str, dict]:
    """'pab skip=2 cross=6' -> ("pab", {"skip": 2, "cross": 6}); ValueError naming what is wrong."""
    name, *pairs = text.split()
    if name not in KNOBS:
        raise ValueError(f"unknown peer {name!r} (known: {', '.join(PEERS)})")
    knobs = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or key not in KNOBS[name]:
            raise ValueError(f"{name} takes {', '.join(f'{k}=' for k in KNOBS[name])}, not {pair!r}")
        try:
            knobs[key] = KNOBS[name][key](value)
        except ValueError:
            raise ValueError(f"{name} {key}={value!r} is not a {KNOBS[name][key].__name__}") from None
    return name, knobs


BENCH_METHODS = ("dense", "dense-compiled", "astraea", "astraea-compiled", "peers", "dense-cp")
DEFAULT_METHODS = BENCH_METHODS[:5]  # dense-cp: with parallel.ulysses under torchrun
DEFAULT_PEERS = ("pab skip=2", "pab skip=2 cross=6", "pab skip=4 cross=8", "first_block_cache threshold=0.1",
                 "first_block_cache threshold=0.2", "first_block_cache threshold=0.3", "taylorseer interval=2",
                 "taylorseer interval=3", "faster_cache skip=2", "faster_cache skip=3", "mag_cache threshold=0.06",
                 "mag_cache threshold=0.12", "toca", "toca interval=5 cross=10")


@dataclass(frozen=True)
class BenchSpec:
    warmup: int = spec(2, lo=0, hi=1000, doc="warm-up calls of every engine or budget before timing")
    repeats: int = spec(5, lo=1, hi=10000, doc="timed generations (or dense steps) a method; the median is reported")
    methods: tuple[str, ...] = spec(DEFAULT_METHODS, choices=BENCH_METHODS, doc="what astraea-bench measures "
                                    "(dense-cp: dense on diffusers' context parallelism, with parallel.ulysses)")
    budgets: tuple[float, ...] = spec((0.4, 0.5, 0.7), lo=0.0, hi=1.0,
                                      doc="Astraea's uniform schedules: a dense first step, then this budget")
    peers: tuple[str, ...] = spec(DEFAULT_PEERS, doc="peer settings: 'name knob=value ...' (README: astraea-bench)")
    cuda_graphs: bool = spec(False, doc="astraea-compiled: replay the engines as CUDA graphs (runtime.load(cuda_graphs=True))")


@dataclass(frozen=True)
class ParallelSpec:
    ulysses: int = spec(1, lo=1, hi=64, doc="sequence parallelism over this many processes (torchrun): the video rows "
                        "in as many shards, one a rank, split and gathered by diffusers' context parallelism, "
                        "attention by Ulysses' all-to-all around the query-only op")
    ring: int = spec(1, lo=1, hi=64, doc="ring-attention degree; 1 (ring attention around the query-only op is not "
                     "built: use ulysses)")
    cfg: bool = spec(False, doc="CFG parallelism: the two guidance branches on two groups of parallel.ulysses ranks "
                     "(2 x ulysses processes), their outputs exchanged every step")


@dataclass(frozen=True)
class RunConfig:
    model: ModelSpec
    video: VideoSpec
    sampling: SamplingSpec
    target: TargetSpec
    search: SearchSpec
    build: BuildSpec
    bench: BenchSpec
    selection: SelectionSpec = field(default_factory=SelectionSpec)
    parallel: ParallelSpec = field(default_factory=ParallelSpec)
    name: str = "run"  # the config file's stem
    source: str = ""  # the config file's path

    @property
    def output_dir(self) -> Path:
        return Path(self.build.output or f"runs/{self.name}")


SECTIONS: dict[str, type] = {
    "model": ModelSpec,
    "video": VideoSpec,
    "sampling": SamplingSpec,
    "target": TargetSpec,
    "search": SearchSpec,
    "selection": SelectionSpec,
    "parallel": ParallelSpec,
    "build": BuildSpec,
    "bench": BenchSpec,
}


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(path: str, tp: Any, value: Any, meta: dict) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(path, inner, value, meta)
    if origin is tuple:
        (inner, _) = typing.get_args(tp)
        items = value if isinstance(value, list) else [value]
        return tuple(_coerce(f"{path}[{i}]", inner, v, meta) for i, v in enumerate(items))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(path, f"expected {_describe(tp)}, got {type(value).__name__} {value!r}")
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(path, f"{value!r} is not one of {', '.join(meta['choices'])}")
    if meta.get("lo") is not None and value < meta["lo"]:
        raise ConfigError(path, f"{value} is below the minimum {meta['lo']}")
    if meta.get("hi") is not None and value > meta["hi"]:
        raise ConfigError(path, f"{value} is above the maximum {meta['hi']}")
    return value


def _build(cls: type, raw: Any, path: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(path, f"expected a mapping of {', '.join(f.name for f in dataclasses.fields(cls))}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{path}.{key}", f"unknown key{nearest(str(key), fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = _coerce(f"{path}.{name}", hints[name], raw[name], dict(f.metadata))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path}.{name}", "is required")
    return cls(**values)


def default_repair_high(target: TargetSpec) -> float:
    """search.repair_high when model.yaml leaves it out: the paper's 1.1 for a mean budget; 1.0
    for a speedup, which is a floor (the band's slow end would otherwise give up to 10% of it back)."""
    return 1.0 if target.speedup is not None else 1.1


def _check_cross_fields(cfg: RunConfig, base: Path) -> RunConfig:
    m, s, t, se = cfg.model, cfg.sampling, cfg.target, cfg.search
    for i, text in enumerate(cfg.bench.peers):
        try:
            name, _ = parse_setting(text)
        except ValueError as e:
            raise ConfigError(f"bench.peers[{i}]", str(e)) from None
        why = peer_refusal(name, m.family)
        if why and cfg.bench.peers != DEFAULT_PEERS:  # the default list leaves out what does not apply
            raise ConfigError(f"bench.peers[{i}]", why)
    if set(se.holdout_prompts) & set(s.prompts) or set(se.holdout_seeds) & set(s.seeds):
        raise ConfigError("search.holdout_prompts" if set(se.holdout_prompts) & set(s.prompts) else "search.holdout_seeds",
                          "must not repeat sampling's: held-out samples are ones the search never sees")
    if (m.preset is None) == (m.checkpoint is None):
        raise ConfigError("model", "set exactly one of preset (random weights) and checkpoint (a local folder)")
    if m.device not in ("auto", "cpu", "meta", "cuda") and not (
        m.device.startswith("cuda:") and m.device[5:].isdigit()
    ):
        raise ConfigError("model.device", f"{m.device!r} is not one of auto, cpu, cuda, cuda:N, meta")
    if cfg.search.cuda_graphs and not (m.device == "auto" or m.device.startswith("cuda")):
        raise ConfigError("search.cuda_graphs", f"needs a CUDA device (model.device is {m.device})")
    if cfg.bench.cuda_graphs and not (m.device == "auto" or m.device.startswith("cuda")):
        raise ConfigError("bench.cuda_graphs", f"needs a CUDA device (model.device is {m.device})")
    if m.checkpoint is not None:
        ckpt = (base / m.checkpoint).expanduser()
        if not (ckpt / "transformer" / "config.json").is_file():
            raise ConfigError("model.checkpoint", f"{ckpt} is not a diffusers checkpoint folder (no transformer/config.json)")
        m = dataclasses.replace(m, checkpoint=str(ckpt.resolve()))
    if s.prompt_file is not None:
        if s.prompts:
            raise ConfigError("sampling", "set prompts or prompt_file, not both")
        pf = base / s.prompt_file
        if not pf.is_file():
            raise ConfigError("sampling.prompt_file", f"{pf} does not exist")
        prompts = tuple(line.strip() for line in pf.read_text().splitlines() if line.strip())
        s = dataclasses.replace(s, prompts=prompts, prompt_file=str(pf.resolve()))
    if not s.prompts:
        raise ConfigError("sampling.prompts", "give at least one prompt (or a non-empty prompt_file)")
    if not s.seeds or len(set(s.seeds)) != len(s.seeds) or min(s.seeds) < 0:
        raise ConfigError("sampling.seeds", "give one or more distinct seeds >= 0")
    if t.budget is not None and t.speedup is not None:
        raise ConfigError("target", "set budget or speedup, not both")
    if t.budget == 0.0:
        raise ConfigError("target.budget", "must be above 0 (the first step is always dense)")
    if se.repair_high is None:
        se = dataclasses.replace(se, repair_high=default_repair_high(t))
    if t.budget is not None and t.budget * se.repair_high < 1 / s.steps:
        raise ConfigError("target.budget", f"{t.budget} cannot be met with {s.steps} steps: the dense first step "
                          f"alone is a mean budget of {1 / s.steps:.3g}")
    b = cfg.build
    if b.precision == "fp8" and b.backend == "tensorrt" and b.fp8_scaling == "channel":
        raise ConfigError("build.fp8_scaling", "channel scales (each token scaled on the fly) have no TensorRT form: "
                          "use fp8_scaling: tensor with the tensorrt backend")
    if b.fp8_keep != ("auto",) and "auto" in b.fp8_keep:
        raise ConfigError("build.fp8_keep", "give auto alone, or group names")
    if se.mutation_end > se.mutation_start:
        raise ConfigError("search.mutation_end", "must not exceed search.mutation_start")
    if se.children > se.population:
        raise ConfigError("search.children", "must not exceed search.population")
    for name in ("cost_from", "fp8_cost_from"):
        if getattr(se, name) is not None:
            cf = (base / getattr(se, name)).expanduser()
            if not cf.is_file():
                raise ConfigError(f"search.{name}", f"{cf} does not exist (give an astraea-bench bench.json)")
            se = dataclasses.replace(se, **{name: str(cf.resolve())})
    if se.precision == "joint":
        if b.precision != "fp8":
            raise ConfigError("search.precision", "joint searches FP8 steps beside model-dtype ones: set build.precision: "
                              "fp8 (the FP8 model is calibrated from it)")
        if t.speedup is None:
            raise ConfigError("search.precision", "joint needs target.speedup: at a mean budget FP8 saves nothing the "
                              "target counts and only costs quality")
        if (se.cost_from is None) != (se.fp8_cost_from is None):
            raise ConfigError("search.fp8_cost_from", "with precision joint give both cost_from (model dtype) and "
                              "fp8_cost_from (FP8 engines), or neither (both measured here)")
    elif se.fp8_cost_from is not None:
        raise ConfigError("search.fp8_cost_from", "only with search.precision: joint")
    pa, sel = cfg.parallel, cfg.selection
    if pa.ring > 1:
        raise ConfigError("parallel.ring", "ring attention around the query-only op is not built: set 1 and use "
                          "parallel.ulysses")
    if pa.cfg and (s.guidance <= 1 or b.cfg == "batched"):
        raise ConfigError("parallel.cfg", "CFG parallelism runs one guidance branch a group of ranks: it needs "
                          "sampling.guidance > 1 and engines per branch (build.cfg: auto or per_branch)")
    if (pa.cfg or pa.ulysses > 1) and b.backend == "tensorrt":
        raise ConfigError("build.backend", "the TensorRT engines have no collective ops: use aoti, inductor or "
                          "eager with parallel")
    if "dense-cp" in cfg.bench.methods and pa.ulysses == 1 and not pa.cfg:
        raise ConfigError("bench.methods", "dense-cp is dense on diffusers' context parallelism: set parallel "
                          "(ulysses, cfg) and run under torchrun")
    if pa.ulysses > 1:
        if sel.shards not in (1, pa.ulysses):
            raise ConfigError("selection.shards", f"with parallel.ulysses {pa.ulysses} the rows are in "
                              f"{pa.ulysses} shards: leave it 1 or set {pa.ulysses}")
        sel = dataclasses.replace(sel, shards=pa.ulysses)  # the one-process programs (the search's) select as the ranks do
    if se.refine_generations and not se.proxy_video:
        raise ConfigError("search.refine_generations", "refines a proxy-video search at the full video: set "
                          "search.proxy_video, or leave it 0 (a full-video search needs no refinement)")
    if se.proxy_video:
        if len(se.proxy_video) != 3:
            raise ConfigError("search.proxy_video", f"give [frames, height, width] (or []), got {list(se.proxy_video)}")
        _build(VideoSpec, dict(zip(("frames", "height", "width"), se.proxy_video)), "search.proxy_video")
    return dataclasses.replace(cfg, model=m, sampling=s, search=se, selection=sel)


def parse(raw: Any, *, name: str = "run", source: str = "", base: Path | None = None) -> RunConfig:
    """Check a parsed model.yaml against the schema and the rules across keys (not the
    family's: astraea.config.from_dict adds those); raises ConfigError naming the key path."""
    if not isinstance(raw, dict):
        raise ConfigError("", f"model.yaml must be a mapping with sections {', '.join(SECTIONS)}")
    for key in raw:
        if key not in SECTIONS:
            raise ConfigError(str(key), f"unknown section{nearest(str(key), SECTIONS)}")
    for required in ("model", "video"):
        if required not in raw:
            raise ConfigError(required, "section is required")
    sections = {key: _build(cls, raw.get(key), key) for key, cls in SECTIONS.items()}
    cfg = RunConfig(**sections, name=name, source=source)
    return _check_cross_fields(cfg, base or Path.cwd())


def proxy_config(cfg: RunConfig) -> RunConfig:
    """The config the budget search evaluates candidates at: search.proxy_video instead of
    video, everything else the same."""
    if not cfg.search.proxy_video:
        return cfg
    return dataclasses.replace(cfg, video=VideoSpec(*cfg.search.proxy_video))


def to_dict(cfg: RunConfig) -> dict:
    """The validated config as plain data (for hashing and for the run folder's record)."""
    return dataclasses.asdict(cfg)
