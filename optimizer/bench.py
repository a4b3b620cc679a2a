"""astraea-bench: eager and compiled, dense and Astraea, and diffusers' peers, measured side
by side on one model, prompt set, seed set and card.

Methods (`bench.methods`; every one samples the config's prompts x seeds through the same
denoising loop, `sampling.denoise`):
  dense             the diffusers transformer, eager: the baseline of speed and quality
  dense-compiled    the same under torch.compile (Inductor, the engines' compiler)
  astraea           the rewritten programs, eager, at each schedule: uniform `bench.budgets`
                    (a dense first step, then flat), the run folder's searched schedules,
                    and any given with --schedules
  astraea-compiled  the engines (build.backend) of the same schedules: one engine folder
                    holds every budget level they use and the runtime switches schedules
                    (`EngineTransformer.use_schedule`); with an ENGINE_FOLDER, its own
                    schedule. Engines share the model's weights here, so memory compares.
  peers             each `bench.peers` setting ("pab skip=2 cross=6", astraea.peers)
Per method: generation time end to end and each transformer call's time by budget (CUDA
events on a GPU, perf_counter on the CPU; warm-up first: every budget or engine is called
`bench.warmup` times in warm-up generations, the last cut short, which also compiles and
captures CUDA graphs; then `bench.repeats`
generations a sample, the median reported), peak device memory over the timed generations
(and its excess over dense), and quality against the dense eager sample: PSNR of the final
latents and, where the model has a decoder, PSNR and SSIM of the decoded frames
(astraea.metrics; no LPIPS: its backbone cannot be downloaded here).

Writes <out>/bench/bench.json, bench.md, latency-vs-budget.png, quality-vs-speedup.png and
step-latency.png. Rows of an earlier bench.json of the same setup (model, video, sampling,
device) are kept unless measured again, so a long benchmark can be split over several
invocations (--methods); every invocation measures dense again as its own baseline.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import RunConfig
from .families import LoadedModel
from .io import atomic_file, stable_hash, write_json
from .metrics import compare, frames

log = logging.getLogger("astraea")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def time_call(device: torch.device, fn) -> float:
    """Milliseconds of one call of fn: CUDA events on a GPU, perf_counter on the CPU."""
    start, end = Clock(device), Clock(device)
    start.record()
    fn()
    end.record()
    return start.until(end)


class Clock:
    """A CUDA event on a GPU, a perf_counter reading on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.event = torch.cuda.Event(enable_timing=True) if self.cuda else None
        self.t = 0.0

    def record(self) -> None:
        if self.cuda:
            self.event.record()
        else:
            self.t = time.perf_counter()

    def until(self, end: Clock) -> float:
        """Milliseconds from this reading to `end` (synchronises on a GPU)."""
        if self.cuda:
            end.event.synchronize()
            return self.event.elapsed_time(end.event)
        return (end.t - self.t) * 1e3


class _Timed:
    """A transformer-shaped callable that times every call under its step's label."""

    def __init__(self, fn: Callable, labels: list[str], device: torch.device):
        self.fn, self.labels, self.device = fn, labels, device
        self.calls: list[tuple[str, Clock, Clock]] = []

    def __call__(self, **kwargs):
        start, end = Clock(self.device), Clock(self.device)
        start.record()
        out = self.fn(**kwargs)
        end.record()
        self.calls.append((self.labels[len(self.calls)], start, end))
        return out

    def by_label(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for label, start, end in self.calls:
            out.setdefault(label, []).append(start.until(end))
        return out


@dataclass
class Method:
    """One row: how to get a transformer for a new generation, and how to put it away."""

    method: str  # dense | dense-compiled | astraea | astraea-compiled | a peer's name
    setting: str
    make: Callable[[], Callable]
    tokens: list[int] | None = None  # rows per step (Astraea's schedules)
    finish: Callable[[Callable], None] = lambda t: None
    info: dict = field(default_factory=dict)
    count_work: bool = False  # count the blocks' Linear calls (eager diffusers modules: dense and the peers)


def call_label(k: int, n: int) -> str:
    """How a report names a call of k of n rows ("40%", "skip"): the key of step_ms by budget,
    which costmodel.from_bench reads back."""
    return f"{k / n:.0%}" if k else "skip"


def uniform(budget: float, steps: int, levels: int, n: int) -> list[int]:
    """Rows per step of a uniform schedule: the dense first step, then `budget` (at the
    nearest of the search's levels)."""
    return schedule_tokens([1.0] + [budget] * (steps - 1), levels, n)


def schedule_tokens(budgets: list[float], levels: int, n: int) -> list[int]:
    """A schedule given as budgets per step -> rows per step at this model's N."""
    from .search import level_tokens

    table = level_tokens(levels, n)
    return [table[round(b * (levels - 1))] for b in budgets]


def read_schedules(path: Path, steps: int, n: int) -> dict[str, list[int]]:
    """Schedules from a file: a schedule.json (`budget_per_step`) or {name: [budget per step]}.
    Each budget is kept as given (a schedule searched at other levels than the config's keeps
    its own), never snapped to the config's levels."""
    from .errors import AstraeaError
    from .search import budget_rows

    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AstraeaError(f"--schedules {path}: {e}") from None
    named = {f"searched {raw.get('mean_budget', 0):.0%}": raw["budget_per_step"]} if "budget_per_step" in raw else raw
    out = {}
    for name, budgets in named.items():
        if not isinstance(budgets, list) or len(budgets) != steps or not all(
                isinstance(b, (int, float)) and 0 <= b <= 1 for b in budgets):
            raise AstraeaError(f"--schedules {path}: {name!r} must be {steps} budgets in [0, 1] (one a step)")
        if budgets[0] != 1:
            raise AstraeaError(f"--schedules {path}: {name!r} starts at {budgets[0]}: the first step must be dense (1.0)")
        out[name] = [budget_rows(float(b), n) for b in budgets]
    return out


def run_searched(out: Path, timesteps: list[float], n: int) -> dict[str, list[int]]:
    """The run folder's finished searches for these timesteps and this N."""
    found = {}
    for path in sorted((out / "search").glob("*/schedule.json")):
        s = json.loads(path.read_text())
        if s.get("tokens") == n and len(s["timesteps"]) == len(timesteps) and all(
                abs(a - b) < 1e-3 for a, b in zip(s["timesteps"], timesteps)):
            found[f"searched {s['mean_budget']:.0%}"] = s["tokens_per_step"]
    return found


class Bench:
    def __init__(self, cfg: RunConfig, model: LoadedModel, out: Path, progress: bool = True):
        from .reference import sample_name
        from .sampling import prompt_inputs

        self.cfg, self.model, self.out, self.progress = cfg, model, out, progress
        self.device = model.device
        s = cfg.sampling
        self.samples = {sample_name(i, seed): prompt_inputs(model, cfg.video, s, prompt, seed, out / "embeddings")
                        for i, prompt in enumerate(s.prompts) for seed in s.seeds}
        self.layout = model.layout(cfg.video)
        self.n = self.layout.video_tokens
        self.dense: dict[str, torch.Tensor] = {}
        self.dense_frames: dict = {}  # the dense samples decoded once (None without a decoder)
        self.rows: list[dict] = []
        self.setup: dict | None = None  # set by run(): rows are then written as they finish

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _labels(self, m: Method) -> list[str]:
        steps = self.cfg.sampling.steps
        if m.tokens is None:
            return [m.method if m.method.startswith("dense") else "call"] * steps
        return [call_label(k, self.n) for k in m.tokens]

    def _warm_runs(self, labels: list[str]) -> list[int]:
        """Warm-up generations, as steps run in each: the shortest run that calls every label at
        least bench.warmup times (at least once). A label called fewer times in one generation
        (the dense first step) takes more generations, cut at the step that completes the count:
        a CUDA-graph engine is captured at its second call, and that must not fall in a timed run."""
        need = max(1, self.cfg.bench.warmup)
        per_run = {x: labels.count(x) for x in set(labels)}
        runs = max(-(-need // c) for c in per_run.values())
        seen = {x: c * (runs - 1) for x, c in per_run.items()}  # the full generations before the last
        for i, label in enumerate(labels):
            seen[label] += 1
            if all(c >= need for c in seen.values()):
                return [len(labels)] * (runs - 1) + [i + 1]
        return [len(labels)] * runs

    def measure(self, m: Method) -> dict:
        from .sampling import Sampler, denoise

        cfg, model = self.cfg, self.model
        labels = self._labels(m)
        first = next(iter(self.samples.values()))
        t0 = time.perf_counter()
        transformer = m.make()
        sampler = Sampler(model, cfg.video, cfg.sampling, first)
        with torch.no_grad():
            for steps in self._warm_runs(labels):
                traj = sampler.start()
                for _ in range(steps):
                    sampler.advance(traj, transformer)
        self._sync()
        m.finish(transformer)
        warm_s = time.perf_counter() - t0
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        ends, calls, quality, latents = [], {}, {}, {}
        linear_calls = [0]
        hooks = [mod.register_forward_pre_hook(lambda *_: linear_calls.__setitem__(0, linear_calls[0] + 1))
                 for b in model.family.block_containers for mod in getattr(model.transformer, b).modules()
                 if isinstance(mod, torch.nn.Linear)] if m.count_work else []
        for name, inputs in self.samples.items():
            for _ in range(self.cfg.bench.repeats):
                timed = _Timed(m.make(), labels, self.device)
                start, end = Clock(self.device), Clock(self.device)
                start.record()
                result = denoise(model, cfg.video, cfg.sampling, inputs, timed)
                end.record()
                ends.append(start.until(end))
                for label, ms in timed.by_label().items():
                    calls.setdefault(label, []).extend(ms)
                m.finish(timed.fn)
            latents[name] = result.cpu()
        for h in hooks:
            h.remove()
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        if m.method == "dense":
            self.dense, self.dense_frames = latents, {}
        for name, got in latents.items():
            if name not in self.dense_frames:
                self.dense_frames[name] = frames(model, self.dense[name])
            quality[name] = compare(model, got, self.dense[name], self.dense_frames[name])
        row = {"method": m.method, "setting": m.setting, "tokens_per_step": m.tokens,
               "mean_budget": None if m.tokens is None else sum(m.tokens) / self.n / len(m.tokens),
               "sample_ms": statistics.median(ends), "sample_ms_all": ends, "warmup_s": warm_s,
               "step_ms": {k: statistics.median(v) for k, v in calls.items()},
               "step_ms_mean": {k: statistics.fmean(v) for k, v in calls.items()},
               "step_calls": {k: len(v) for k, v in calls.items()}, "peak_gib": peak,
               "quality": quality, **_mean_quality(quality), **m.info,
               "linear_calls": linear_calls[0] / len(ends) if m.count_work else None}
        return row

    def add(self, m: Method) -> dict:
        """Measure m, log its line, and rewrite the report (a long benchmark keeps every
        finished row if it is stopped)."""
        row = self.measure(m)
        dense = next((r for r in self.rows if r["method"] == "dense"), row)
        row["speedup"] = dense["sample_ms"] / row["sample_ms"]
        row["extra_peak_gib"] = None if row["peak_gib"] is None else row["peak_gib"] - dense["peak_gib"]
        # the fraction of the dense blocks' Linear calls a peer made: the work it did not skip
        row["work_fraction"] = (row["linear_calls"] / dense["linear_calls"]
                                if row["linear_calls"] is not None and dense.get("linear_calls") else None)
        self.rows.append(row)
        q = row["psnr_pixels"] if row["psnr_pixels"] is not None else row["psnr_latent"]
        log.info("%-17s %-22s %8.0f ms a sample  %5.2fx  PSNR %6.2f dB  (warm-up %.0f s)%s", row["method"],
                 row["setting"], row["sample_ms"], row["speedup"], q, row["warmup_s"],
                 "" if row["peak_gib"] is None else f"  peak {row['peak_gib']:.1f} GiB")
        if self.setup is not None:
            write(_merge(self.out / "bench" / "bench.json", self.setup, self.rows), self.out / "bench", plots=False)
        return row


def _mean_quality(per_sample: dict) -> dict:
    keys = ("psnr_latent", "psnr_pixels", "ssim_pixels")
    out = {}
    for k in keys:
        vals = [q[k] for q in per_sample.values() if q[k] is not None]
        out[k] = sum(vals) / len(vals) if vals else None
    return out


def _share_weights(transformer, module: torch.nn.Module) -> bool:
    """Point the runtime's weights at the model's own tensors (same names, shapes, dtypes),
    so a benchmark holding both counts the weights once."""
    own = dict(module.state_dict(keep_vars=True))
    names = transformer.manifest["weights"]["order"]
    if not all(n in own and own[n].shape == w.shape and own[n].dtype == w.dtype
               for n, w in zip(names, transformer.weights)):
        return False
    transformer.weights = [own[n].detach() for n in names]
    return True


def run(cfg: RunConfig, model: LoadedModel, out: Path, methods: tuple[str, ...] | None = None,
        extra_schedules: dict[str, list[int]] | None = None, engine_folder: Path | None = None,
        progress: bool = True, build_only: bool = False) -> dict:
    """Measure `methods` (default bench.methods) and write the report under <out>/bench.
    build_only: build <out>/bench/engines for the astraea-compiled rows and return its
    manifest, measuring nothing (a benchmark split over machines: the engine files travel,
    the weights file is written again from the model, and a later invocation times them)."""
    from .peers import PeerTransformer, calibrate_mag_cache, parse_setting
    from .sampling import denoise

    methods = tuple(methods or cfg.bench.methods)
    bench = Bench(cfg, model, out, progress)
    steps, levels, n = cfg.sampling.steps, cfg.search.levels, bench.n
    engines = None
    if engine_folder is not None:  # the folder's own schedule
        from . import runtime

        engines = runtime.load(engine_folder, model.device, cuda_graphs=cfg.bench.cuda_graphs)
        schedules = {"engines": [s["tokens"] for s in engines.manifest["steps"]]}
    else:
        timesteps = [float(t) for t in model.family.set_timesteps(copy.deepcopy(model.scheduler), steps, "cpu")]
        schedules = ({f"uniform {b:.0%}": uniform(b, steps, levels, n) for b in cfg.bench.budgets}
                     | run_searched(out, timesteps, n) | (extra_schedules or {}))
    if build_only:  # (astraea-bench refuses it with an engine folder, before loading the model)
        return _build_bench_engines(cfg, model, out, schedules, progress)
    todo = list(dict.fromkeys(("dense", *methods)))  # dense always: the baseline of every row
    bar = tqdm(total=len(todo), desc="astraea-bench", unit="method", disable=not progress)

    setup = bench.setup = _setup(cfg, model, bench)
    stored = _stored_dense(out / "bench", setup["key"])
    if "dense" in methods or stored is None:
        bench.add(Method("dense", "diffusers, eager", lambda: model.transformer, count_work=True))
        _store_dense(out / "bench", setup["key"], bench)
    else:  # this setup's dense row and samples from an earlier invocation (the same card: see setup)
        log.info("dense: reusing the row and samples of %s (add dense to --methods to measure it again)",
                 out / "bench" / "bench.json")
        bench.rows.append(stored[0])
        bench.dense = stored[1]
    bar.update()
    if "dense-compiled" in todo:
        compiled = torch.compile(model.transformer, dynamic=False)
        bench.add(Method("dense-compiled", "torch.compile (Inductor)", lambda: compiled))
        del compiled
        torch._dynamo.reset()
        bar.update()
    if "astraea" in todo:
        from .search import build_programs

        wanted = sorted({k for t in schedules.values() for k in t if k})
        programs = build_programs(model, cfg, wanted, progress)
        from .tokenwise import TokenwiseTransformer

        for name, tokens in schedules.items():
            bench.add(Method("astraea", name, lambda t=tokens: TokenwiseTransformer(programs, t), tokens))
        del programs
        bar.update()
    if "astraea-compiled" in todo:
        if engines is None and cfg.build.backend == "eager":
            log.info("astraea-compiled: build.backend is eager (the astraea rows are those programs); skipped")
        else:
            if engines is None:
                engines = _bench_engines(cfg, model, out, schedules, progress)
            shared = _share_weights(engines, model.transformer)
            backend = engines.manifest["build"]["backend"]
            for name, tokens in schedules.items():
                engines.use_schedule(tokens)
                label = f"{name}, CUDA graphs" if engines.cuda_graphs else name  # its own row beside the plain one
                bench.add(Method("astraea-compiled", label, lambda: engines, tokens,
                                 info={"backend": backend, "weights_shared": shared, "cuda_graphs": engines.cuda_graphs,
                                       "state_gib": state_gib(engines.manifest)}))
        bar.update()
    if "peers" in todo:
        ratios = None
        for text in cfg.bench.peers:
            name, knobs = parse_setting(text)
            if name == "mag_cache":
                if ratios is None:
                    first = next(iter(bench.samples.values()))
                    ratios = calibrate_mag_cache(model.transformer, model.family.block_containers, steps,
                                                 lambda peer: denoise(model, cfg.video, cfg.sampling, first, peer))
                knobs = knobs | {"steps": steps, "ratios": ratios}
            if name == "faster_cache":  # its unconditional-branch cache needs the CFG batch
                knobs = knobs | {"distilled": cfg.sampling.guidance <= 1}
            bench.add(Method(name, text.partition(" ")[2] or "defaults",
                             lambda name=name, knobs=knobs: PeerTransformer(model.transformer, name,
                                                                             model.family.block_containers, **knobs),
                             finish=lambda t: t.close(), count_work=True))
        bar.update()
    bar.close()
    report = _merge(out / "bench" / "bench.json", setup, bench.rows)
    write(report, out / "bench")
    return report


def _bench_engines(cfg: RunConfig, model: LoadedModel, out: Path, schedules: dict, progress: bool):
    """One engine folder (<out>/bench/engines) with every budget level the schedules use, loaded."""
    from . import runtime

    _build_bench_engines(cfg, model, out, schedules, progress)
    return runtime.load(out / "bench" / "engines", model.device, cuda_graphs=cfg.bench.cuda_graphs)


def _build_bench_engines(cfg: RunConfig, model: LoadedModel, out: Path, schedules: dict, progress: bool) -> dict:
    """Build (or keep, where its file is there) the engine of every budget level the schedules
    use under <out>/bench/engines; returns the manifest. Engines of earlier invocations stay
    in the folder (one invocation a schedule reuses what another built)."""
    from . import engines

    steps, n = cfg.sampling.steps, model.layout(cfg.video).video_tokens
    ks = sorted({k for t in schedules.values() for k in t[1:] if k}, reverse=True) or [n]
    if len(ks) > steps - 1:
        raise ValueError(f"{len(ks)} budget levels do not fit one {steps}-step schedule")
    tokens = [n] + [ks[i % len(ks)] for i in range(steps - 1)]
    schedule = engines.fixed_schedule(model, cfg, tokens, "astraea-bench")
    return engines.build(cfg, model, {}, schedule, out / "bench", progress=progress, prune=False)


def _store_dense(folder: Path, key: str, bench: Bench) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".dense-latents.tmp"
    save_file({name: t.contiguous() for name, t in bench.dense.items()}, str(tmp), metadata={"key": key})
    tmp.replace(folder / "dense-latents.safetensors")
    write_json(folder / "dense-row.json", {"key": key, "row": bench.rows[0]})


def _stored_dense(folder: Path, key: str) -> tuple[dict, dict] | None:
    """The dense row and final latents an earlier invocation stored for this setup."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path, row = folder / "dense-latents.safetensors", folder / "dense-row.json"
    if not (path.is_file() and row.is_file()):
        return None
    with safe_open(str(path), "pt") as fh:
        if (fh.metadata() or {}).get("key") != key:
            return None
    stored = json.loads(row.read_text())
    return (stored["row"], load_file(str(path))) if stored.get("key") == key else None


def state_gib(manifest: dict) -> float:
    """GiB of block state the runtime keeps for a manifest (both CFG branches where per branch)."""
    per = sum(math.prod(s["shape"]) * torch.empty(0, dtype=getattr(torch, s["dtype"])).element_size()
              for s in manifest["state"])
    return per * (2 if manifest.get("per_branch") else 1) / 2**30


def _setup(cfg: RunConfig, model: LoadedModel, bench: Bench) -> dict:
    from dataclasses import asdict

    tc = dict(model.transformer.config)
    hidden = tc.get("num_attention_heads", 0) * tc.get("attention_head_dim", 0)
    batch = 2 if cfg.sampling.guidance > 1 else 1
    blocks = sum(len(getattr(model.transformer, b)) for b in model.family.block_containers)
    element = torch.empty(0, dtype=model.dtype).element_size()
    setup = {"model": asdict(cfg.model), "video": asdict(cfg.video), "sampling": asdict(cfg.sampling),
             "device": device_name(model.device), "torch": torch.__version__}
    return {"key": stable_hash(setup), **setup, "samples": len(bench.samples), "video_tokens": bench.n,
            "warmup": cfg.bench.warmup, "repeats": cfg.bench.repeats, "selection": asdict(cfg.selection),
            "blocks": blocks, "hidden": hidden,
            # the memory goal: at most one extra activation (the CFG batch's tokens x hidden) a block
            "activation_per_block_gib": batch * bench.n * hidden * element / 2**30,
            "decoder": model.decoder is not None, "date": time.strftime("%Y-%m-%d")}


def _merge(path: Path, setup: dict, rows: list[dict]) -> dict:
    """This invocation's rows (dense first) and an earlier report's other rows, if it has
    the same setup."""
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("setup", {}).get("key") == setup["key"]:
            mine = {(r["method"], r["setting"]) for r in rows}
            rows = rows[:1] + [r for r in old["rows"] if (r["method"], r["setting"]) not in mine] + rows[1:]
    return {"setup": setup, "rows": rows}


def quality_of(row: dict) -> float:
    """The row's headline quality: pixel PSNR where frames were decoded, else latent PSNR."""
    return row["psnr_pixels"] if row.get("psnr_pixels") is not None else row["psnr_latent"]


def markdown(report: dict) -> str:
    s = report["setup"]
    v = s["video"]
    pixels = s["decoder"]
    head = (f"{s['model'].get('preset') or s['model'].get('checkpoint')} ({s['model']['family']}, "
            f"{s['model']['dtype']}), {v['width']}x{v['height']}x{v['frames']} ({s['video_tokens']} tokens), "
            f"{s['sampling']['steps']} steps, guidance {s['sampling']['guidance']}; {s['samples']} sample(s), "
            f"{s['repeats']} timed generation(s) each after warm-up; {s['device']}, torch {s['torch']}; {s['date']}. "
            f"Quality against the dense eager sample: {'decoded frames (PSNR, SSIM) and ' if pixels else ''}"
            "final latents (PSNR); no LPIPS (its backbone cannot be downloaded here). Block work: the fraction of "
            "the dense blocks' Linear calls a peer made.\n\n")
    cols = ("| method | setting | mean budget | sample (ms) | speedup | block work | per call ms (by budget) | peak GiB "
            "| extra GiB |")
    cols += " PSNR pixels | SSIM | PSNR latents |\n" if pixels else " PSNR latents |\n"
    sep = "|---" * (cols.count("|") - 1) + "|\n"
    lines = []
    for r in report["rows"]:
        calls = ", ".join(f"{k}: {v:.1f}" for k, v in r["step_ms"].items())
        budget = "-" if r["mean_budget"] is None else f"{r['mean_budget']:.2f}"
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        extra = "-" if r.get("extra_peak_gib") is None else f"{r['extra_peak_gib']:+.2f}"
        q = f" {_db(r['psnr_pixels'])} | {_num(r['ssim_pixels'])} | {_db(r['psnr_latent'])} |" if pixels else \
            f" {_db(r['psnr_latent'])} |"
        work = "-" if r.get("work_fraction") is None else f"{r['work_fraction']:.2f}"
        lines.append(f"| {r['method']} | {r['setting']} | {budget} | {r['sample_ms']:.0f} | {r['speedup']:.2f}x | {work} | "
                     f"{calls} | {peak} | {extra} |{q}")
    return head + cols + sep + "\n".join(lines) + "\n"


def _db(x) -> str:
    return "-" if x is None else ("inf" if math.isinf(x) else f"{x:.2f}")


def _num(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def write(report: dict, folder: Path, plots: bool = True) -> None:
    write_json(folder / "bench.json", report)
    with atomic_file(folder / "bench.md") as fh:
        fh.write(markdown(report))
    if plots:
        plot(report, folder)


def plot(report: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, s = report["rows"], report["setup"]
    title = (f"{s['model'].get('preset') or 'checkpoint'}, {s['video']['width']}x{s['video']['height']}x"
             f"{s['video']['frames']}, {s['sampling']['steps']} steps; {s['device']}")

    def save(fig, ax, name: str, xlabel: str, ylabel: str) -> None:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        with atomic_file(folder / name, "wb") as fh:
            fig.savefig(fh, format="png")
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for method, style in (("astraea", "-o"), ("astraea-compiled", "-s")):
        pts = sorted((r["mean_budget"], r["sample_ms"] / 1e3) for r in rows if r["method"] == method)
        if pts:
            ax.plot(*zip(*pts), style, label=method)
    for r in rows:
        if r["method"] in ("dense", "dense-compiled"):
            ax.axhline(r["sample_ms"] / 1e3, color="k", linestyle="--" if r["method"] == "dense" else ":",
                       label=r["method"])
    save(fig, ax, "latency-vs-budget.png", "mean budget (fraction of tokens computed)",
         "seconds a sample")

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for method in dict.fromkeys(r["method"] for r in rows if not r["method"].startswith("dense")):
        pts = sorted((r["speedup"], quality_of(r)) for r in rows if r["method"] == method
                     and math.isfinite(quality_of(r)))
        if pts:
            ax.plot(*zip(*pts), "-o" if method.startswith("astraea") else "--^", label=method)
    save(fig, ax, "quality-vs-speedup.png", "speedup over the dense eager sample",
         ("pixel" if s["decoder"] else "latent") + " PSNR against dense (dB)")

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for method, style in (("astraea", "o"), ("astraea-compiled", "s")):
        pts = {}
        for r in rows:
            if r["method"] == method:
                for label, ms in r["step_ms"].items():
                    if label.endswith("%"):
                        pts.setdefault(float(label[:-1]) / 100, []).append(ms)
        if pts:
            xs = sorted(pts)
            ax.plot(xs, [statistics.median(pts[x]) for x in xs], "-" + style, label=method)
    for r in rows:
        if r["method"] in ("dense", "dense-compiled"):
            ax.axhline(r["step_ms"][r["method"]], color="k", linestyle="--" if r["method"] == "dense" else ":",
                       label=r["method"])
    save(fig, ax, "step-latency.png", "budget of the step",
         "ms a transformer call")
