"""astraea-bench: eager and compiled, dense and Astraea, and the peers (diffusers' caches, ToCa), measured side
by side on one model, prompt set, seed set and card.

Methods (`bench.methods`; every one samples the config's prompts x seeds through the same
denoising loop, `sampling.denoise`):
  dense             the diffusers transformer, eager: the baseline of speed and quality
  dense-compiled    the same under torch.compile (Inductor, the engines' compiler)
  dense-cp          dense on diffusers' context parallelism (Ulysses over every rank, torchrun), eager
                    and compiled; under parallel: only dense, dense-cp and astraea-compiled
                    (each rank its engines) run, every rank in step, rank 0 writing the report
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

`run` goes through `METHODS`, a table of one function a method yielding its rows'
`Method`s. Writes <out>/bench/bench.json, bench.md, latency-vs-budget.png,
quality-vs-speedup.png and step-latency.png (report.py, plots.py). Rows of an earlier
bench.json of the same setup (model, video, sampling, device) are kept unless measured
again, so a long benchmark can be split over several invocations (--methods).
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import report
from .benchplan import (  # noqa: F401  build_engines, plan_schedules: astraea-bench --build-only's
    Plan,
    build_engines,
    invocation_plan,
    plan_schedules,
    share_weights,
)
from .families import LoadedModel
from .fitness import is_main
from .io import stable_hash
from .metrics import compare, frames
from .schedule import Schedule, call_label
from .schema import NOT_DIFFUSERS, RunConfig, peer_refusal
from .timing import Clock, device_name, synchronize

log = logging.getLogger("astraea")


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
        self._work: LoadedModel | None = None

    @property
    def fp8(self) -> bool:
        return self.cfg.build.precision == "fp8"

    def tag(self, setting: str) -> str:
        """A row's setting, marked when its model is the FP8 one (rows of both precisions merge)."""
        return f"{setting}, fp8" if self.fp8 else setting

    @property
    def work(self) -> LoadedModel:
        """The model the compiled and Astraea rows run: the FP8 one with build.precision fp8,
        calibrated on this bench's dense samples; the model itself otherwise."""
        if self._work is None:
            self._work = self.model
            if self.fp8:
                from .quantize import run as quantize
                from .reference import DenseReference, reference_key

                # the dense samples are the dense reference of these prompts: its key, so that
                # astraea-bench --build-only (reference.run) and the timing run share one calibration
                key = reference_key(self.cfg, self.model)
                ref = DenseReference(key, self.out / "reference" / key, self.dense, reused=True)
                q = quantize(self.cfg, self.model, ref, self.out, self.progress)
                log.info("fp8: %d of %d groups quantized (kept %s), dense FP8 %.2f dB against dense",
                         len(q.record["quantized"]), len(q.record["groups"]), q.record["kept"], q.record["psnr"])
                self._work = q.model
        return self._work

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
        synchronize(self.device)
        m.finish(transformer)
        warm_s = time.perf_counter() - t0
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        ends, calls, quality, latents = [], {}, {}, {}
        linear = [0, 0]  # the blocks' Linear calls, and the rows through them (ToCa computes some rows of a call)

        def count(_module, args):
            linear[0] += 1
            linear[1] += args[0].shape[:-1].numel()

        hooks = [mod.register_forward_pre_hook(count)
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
               "linear_calls": linear[0] / len(ends) if m.count_work else None,
               "linear_rows": linear[1] / len(ends) if m.count_work else None}
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
        row["row_work_fraction"] = (row["linear_rows"] / dense["linear_rows"]
                                    if row.get("linear_rows") is not None and dense.get("linear_rows") else None)
        self.rows.append(row)
        q = row["psnr_pixels"] if row["psnr_pixels"] is not None else row["psnr_latent"]
        log.info("%-17s %-22s %8.0f ms a sample  %5.2fx  PSNR %6.2f dB  (warm-up %.0f s)%s", row["method"],
                 row["setting"], row["sample_ms"], row["speedup"], q, row["warmup_s"],
                 "" if row["peak_gib"] is None else f"  peak {row['peak_gib']:.1f} GiB", extra={"stage": True})
        if self.setup is not None and is_main():
            report.write(report.merge(self.out / "bench" / "bench.json", self.setup, self.rows), self.out / "bench",
                         with_plots=False)
        return row


def _mean_quality(per_sample: dict) -> dict:
    keys = ("psnr_latent", "psnr_pixels", "ssim_pixels")
    out = {}
    for k in keys:
        vals = [q[k] for q in per_sample.values() if q[k] is not None]
        out[k] = sum(vals) / len(vals) if vals else None
    return out


# ---- the methods: each yields the Method of every row it measures ------------------------

def _dense_compiled(bench: Bench, plan: Plan) -> Iterator[Method]:
    module = bench.work.transformer
    # exported with the FP8 Linear layers written out in ATen ops, for Inductor to fuse, and
    # STDiT3's factored attention as its grouping around astraea::sparse_attention
    if bench.fp8 or bench.model.family.name in NOT_DIFFUSERS:
        from astraea import plugins

        from .sampling import first_step_kwargs

        kwargs = first_step_kwargs(bench.work, bench.cfg.video, bench.cfg.sampling)
        ep = torch.export.export(module, (), kwargs, strict=False)
        module = plugins.decompose(ep).module()
    compiled = torch.compile(module, dynamic=False)
    yield Method("dense-compiled", bench.tag("torch.compile (Inductor)"), lambda: compiled)
    torch._dynamo.reset()


def _label(bench: Bench, name: str, s: Schedule) -> tuple[str, dict]:
    """A row's setting and extra fields: a schedule mixing precisions is marked by its FP8 steps
    (not ", fp8": the FP8 cost model reads those rows) and records its precision a step."""
    if s.mixed:
        return f"{name}, {s.fp8_steps} FP8 steps", {"precision_per_step": list(s.precisions)}
    return bench.tag(name), {}


def _astraea(bench: Bench, plan: Plan) -> Iterator[Method]:
    from .tokenwise import TokenwiseTransformer, build_programs

    wanted = sorted({k for s in plan.schedules.values() for k in s.row_counts})
    programs = build_programs(bench.work, bench.cfg, wanted, bench.progress)  # the FP8 model's with build.precision fp8
    mixed = sorted({k for s in plan.schedules.values() if s.mixed for k in s.row_counts})
    dense = build_programs(bench.model, bench.cfg, mixed, bench.progress) if mixed else {}  # their model-dtype steps
    for name, s in plan.schedules.items():
        label, info = _label(bench, name, s)
        if s.mixed:
            make = lambda t=list(s.tokens), p=list(s.precisions): TokenwiseTransformer(dense, t, p, programs)  # noqa: E731
        else:
            make = lambda t=list(s.tokens): TokenwiseTransformer(programs, t)  # noqa: E731
        yield Method("astraea", label, make, list(s.tokens), info=info)


def _astraea_compiled(bench: Bench, plan: Plan) -> Iterator[Method]:
    cfg, model = bench.cfg, bench.work
    engines = plan.engines
    if engines is None and cfg.build.backend == "eager":
        log.info("astraea-compiled: build.backend is eager (the astraea rows are those programs); skipped")
        return
    if engines is None:
        from . import runtime

        build_engines(cfg, model, bench.out, plan.schedules, bench.progress, dense=bench.model)
        engines = runtime.load(bench.out / "bench" / "engines", model.device, cuda_graphs=cfg.bench.cuda_graphs)
    mixed_folder = bool(engines.manifest.fp8_weights)  # the model dtype's engines beside the FP8 model's
    shared = share_weights(engines, (bench.model if mixed_folder else model).transformer,
                            model.transformer if mixed_folder else None)
    for name, s in plan.schedules.items():
        # in a folder mixing precisions a schedule of the FP8 bench's own runs every step in FP8
        precisions = list(s.precisions) if s.mixed else ["fp8"] * s.steps if mixed_folder and bench.fp8 else None
        engines.use_schedule(list(s.tokens), precisions)
        label, info = _label(bench, f"{name}, CUDA graphs" if engines.cuda_graphs else name, s)  # beside the plain one
        yield Method("astraea-compiled", label, lambda: engines, list(s.tokens),
                     info={"backend": engines.manifest.backend, "weights_shared": shared,
                           "cuda_graphs": engines.cuda_graphs, "state_gib": engines.manifest.state_bytes() / 2**30} | info)


def _peers(bench: Bench, plan: Plan) -> Iterator[Method]:
    from .peers import calibrate_mag_cache, make, parse_setting
    from .sampling import denoise

    cfg, model = bench.cfg, bench.model
    ratios = None
    for text in cfg.bench.peers:
        name, knobs = parse_setting(text)
        if peer_refusal(name, model.family.name):  # a default setting that does not apply (one given is refused)
            continue
        if name == "mag_cache":
            if ratios is None:
                first = next(iter(bench.samples.values()))
                ratios = calibrate_mag_cache(model.transformer, model.family.block_containers, cfg.sampling.steps,
                                             lambda peer: denoise(model, cfg.video, cfg.sampling, first, peer))
            knobs = knobs | {"steps": cfg.sampling.steps, "ratios": ratios}
        if name == "faster_cache":  # its unconditional-branch cache needs the CFG batch
            knobs = knobs | {"distilled": cfg.sampling.guidance <= 1}
        if name == "toca":  # its step count and its CFG pairing (one choice of tokens for both branches)
            knobs = knobs | {"steps": cfg.sampling.steps, "cfg": cfg.sampling.guidance > 1}
        yield Method(name, text.partition(" ")[2] or "defaults",
                     lambda name=name, knobs=knobs: make(model, name, **knobs),
                     finish=lambda t: t.close(), count_work=True)


def _dense_cp(bench: Bench, plan: Plan) -> Iterator[Method]:
    """Dense on diffusers' own context parallelism (Ulysses over the ranks: `enable_parallelism`),
    eager and under torch.compile: the multi-GPU baseline. A copy of the model carries its hooks."""
    from diffusers import ContextParallelConfig

    from . import loader
    from .errors import AstraeaError
    from .parallel import cp_plan, world

    if torch.accelerator.device_count() == 0:
        raise AstraeaError("dense-cp runs on GPUs: diffusers' enable_parallelism places each rank on an "
                           "accelerator (drop dense-cp from --methods on the CPU)")
    ranks = world()[1]  # every rank (under parallel.cfg too: diffusers has no CFG axis)
    model = loader.load_model(bench.cfg)
    cp_plan(model.transformer)  # a one-line refusal for a model without diffusers' plan
    heads = dict(model.transformer.config).get("num_attention_heads", ranks)
    model.transformer.enable_parallelism(config=ContextParallelConfig(
        ulysses_degree=ranks, ulysses_anything=heads % ranks != 0))  # e.g. 12 heads on 8 ranks
    yield Method("dense-cp", f"diffusers context parallelism, Ulysses {ranks}, eager", lambda: model.transformer)
    compiled = torch.compile(model.transformer, dynamic=False)
    yield Method("dense-cp", f"diffusers context parallelism, Ulysses {ranks}, torch.compile", lambda: compiled)
    torch._dynamo.reset()


METHODS: dict[str, Callable[[Bench, Plan], Iterator[Method]]] = {
    "dense-compiled": _dense_compiled, "astraea": _astraea, "astraea-compiled": _astraea_compiled, "peers": _peers,
    "dense-cp": _dense_cp,
}  # dense is the baseline of every row: measured first, or its stored row reused (run)
# under sequence parallelism (every rank runs each row together): the one-GPU dense baseline, dense on
# diffusers' context parallelism, and the ranks' engines
PARALLEL_METHODS = ("dense", "dense-cp", "astraea-compiled")


def run(cfg: RunConfig, model: LoadedModel, out: Path, methods: tuple[str, ...] | None = None,
        extra_schedules: dict[str, Schedule] | None = None, engine_folder: Path | None = None,
        progress: bool = True) -> dict:
    """Measure `methods` (default bench.methods) and write the report under <out>/bench."""
    methods = tuple(methods or cfg.bench.methods)
    if cfg.parallel.ulysses > 1 or cfg.parallel.cfg:
        skipped = [m for m in methods if m not in PARALLEL_METHODS]
        if skipped:
            log.info("parallel: %s not measured (one-GPU rows: run them without parallel)", ", ".join(skipped))
        methods = tuple(m for m in methods if m in PARALLEL_METHODS)
    bench = Bench(cfg, model, out, progress)
    plan = invocation_plan(cfg, model, out, extra_schedules, engine_folder)
    todo = list(dict.fromkeys(("dense", *methods)))
    bar = tqdm(total=len(todo), desc="astraea-bench", unit="method", disable=not progress, leave=False)
    setup = bench.setup = _setup(cfg, model, bench)
    stored = report.stored_dense(out / "bench", setup["key"])
    if "dense" in methods or stored is None:
        source = "diffusers" if model.family.name not in NOT_DIFFUSERS else type(model.transformer).__name__
        bench.add(Method("dense", f"{source}, eager", lambda: model.transformer, count_work=True))
        if is_main():
            report.store_dense(out / "bench", setup["key"], bench.rows[0], bench.dense)
    else:  # this setup's dense row and samples from an earlier invocation (the same card: see setup)
        log.info("dense: reusing the row and samples of %s (add dense to --methods to measure it again)",
                 out / "bench" / "bench.json")
        bench.rows.append(stored[0])
        bench.dense = stored[1]
    bar.update()
    for name in todo[1:]:
        for m in METHODS[name](bench, plan):
            bench.add(m)
        bar.update()
    bar.close()
    result = report.merge(out / "bench" / "bench.json", setup, bench.rows)
    if is_main():  # under torchrun every rank measured in step; rank 0 writes
        report.write(result, out / "bench")
    return result


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


