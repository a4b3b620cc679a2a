"""Entry points: `astraea-build` and `astraea-bench` (thin: parse, run the stages, map errors).

What a person reads: one line per stage with its result and time, progress bars (which
vanish when done) for the long stages, and nothing else unless --verbose, which adds the
passes' statistics and the stages' details. Everything, at debug level, also goes to the
run folder's log (`<run>/build.log`, `<run>/bench.log`). Bad input is one line and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from .errors import AstraeaError
from .schema import ParallelSpec

log = logging.getLogger("astraea")

BUILD_STAGES = """\
stages (each writes into the run folder atomically; finished stages are keyed by hashes
of their inputs and reused):
  1. validate   model.yaml -> RunConfig; a bad key exits 2 with its key path
  2. preflight  latent size, token count and estimated peak memory against the device's
                free memory, before any weights are built; a config that cannot fit exits 2
  3. load       the family adapter builds random weights at a preset's size or loads a
                local diffusers checkpoint, on model.device in model.dtype
  4. reference  dense sampling of every prompt x seed with the family's scheduler and CFG:
                <run>/reference/<key>/latents.safetensors (+ reference.json, previews)
     quantize   build.precision fp8: the Linear layers in e4m3, calibrated with
                nvidia-modelopt on the dense sampling, groups kept in the model's dtype by
                measurement (build.fp8_keep, fp8_min_psnr): <run>/quantize/<key>/
  5. rewrite    with a target: torch.export once + the fx pass pipeline at every budget
                level the search can pick: <run>/graphs/k<k>.json (pass counts) and .txt;
                --dump-graphs: every pass's before/after
  6. search     the evolutionary budget search (docs/search.md): the cost model, then
                <run>/search/<key>/schedule.json, search.png, schedule.png and state.json
                (checkpoint after every generation; --resume continues it)
  7. engines    one engine per distinct budget of the schedule (build.backend: eager,
                inductor, aoti, or tensorrt where TensorRT is installed; docs/engines.md)
                + <run>/engines/manifest.json; engines whose key exists are not rebuilt
  8. check      astraea.runtime loads the folder (verifying it) and samples the first
                prompt and seed: seconds against the eager dense sample and PSNR against
                dense, <run>/engines-check.json
"""

BENCH_HELP = """CONFIG is a model.yaml; ENGINE_FOLDER is <run>/engines of astraea-build (the run's
config.json describes the model, and the engines' own schedule is what astraea-compiled runs).
Rows of an earlier <out>/bench/bench.json with the same model, video, sampling and device
are kept unless measured again, so a benchmark can be split over several invocations.
Details: docs/bench.md.
"""


class _Console(logging.Filter):
    """What the terminal shows: stage lines and warnings; details only with --verbose."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or self.verbose:
            return True
        return getattr(record, "stage", False)


def _logging(prog: str, verbose: bool, debug: bool) -> None:
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    console.addFilter(_Console(verbose or debug))
    console.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.basicConfig(level=logging.DEBUG, handlers=[console], force=True)
    for noisy in ("matplotlib", "PIL", "torch", "filelock", "urllib3", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # their debug output is not ours


def _log_file(path: Path) -> None:
    """Everything of ours at debug level into the run folder's log (appended: one run a block);
    the log of an earlier invocation in this process is closed."""
    for old in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
        log.removeHandler(old)
        old.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler.setLevel(logging.DEBUG)
    log.addHandler(handler)
    log.debug("---- %s", " ".join(sys.argv))


@contextmanager
def stage(name: str):
    """One line when the stage ends: its result (set `line[0]`) and its time."""
    line = [""]
    t0 = time.perf_counter()
    yield line
    log.info("%-10s %s (%.1f s)", name, line[0], time.perf_counter() - t0, extra={"stage": True})


def _quiet_libraries() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _run(prog: str, argv: list[str] | None, parser: argparse.ArgumentParser, body: Callable) -> int:
    args = parser.parse_args(argv)
    from .parallel import init_from_env

    rank = init_from_env()
    if rank > 0:  # one console: rank 0's stage lines; the others' warnings and errors only
        prog, args.quiet, args.verbose = f"{prog} [rank {rank}]", True, False
    _logging(prog, args.verbose, args.debug)
    if rank > 0:
        logging.getLogger().handlers[0].addFilter(lambda record: record.levelno >= logging.WARNING)
    if not args.debug:
        # torch >= 2.12 warns when a graph module's tree spec is copied (torch's own pickling,
        # not ours): noise between the stage lines
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    try:
        if args.quiet:
            _quiet_libraries()
        body(args)
        return 0
    except AstraeaError as e:
        if args.debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; finished stages are kept in the run folder (a budget search continues with --resume)",
              file=sys.stderr)
        return 130
    except MemoryError as e:  # torch.OutOfMemoryError too: a size the device cannot hold, not a bug
        if args.debug:
            raise
        print(f"{prog}: error: out of memory ({str(e).splitlines()[0] if str(e) else type(e).__name__}): lower "
              "video.frames, height or width, or sampling.prompts x seeds, or use a device with more memory",
              file=sys.stderr)
        return 2
    except Exception as e:  # a bug, not bad input: one line unless --debug
        if args.debug:
            raise
        if _out_of_memory(e):
            print(f"{prog}: error: out of memory on the device: lower video.frames, height or width", file=sys.stderr)
            return 2
        print(f"{prog}: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _out_of_memory(e: Exception) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="model.yaml (docs/config.md)")
    parser.add_argument("--out", type=Path, help="run folder (default: build.output, else runs/<config name>)")
    parser.add_argument("--verbose", "-v", action="store_true", help="the passes' statistics and each stage's details")
    parser.add_argument("--debug", action="store_true", help="tracebacks and debug logging")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _preflight(cfg) -> None:
    from . import preflight
    from .loader import resolve_device

    with stage("preflight") as line:
        line[0] = preflight.check(cfg, resolve_device(cfg.model.device)).line()


def _build(args) -> None:
    from . import config, engines, loader, reference
    from .io import write_json

    with stage("validate") as line:
        cfg = config.load(args.config)
        why = engines.refusal(cfg)
        if why is not None:
            raise AstraeaError(why)
        t = cfg.target
        goal = f"target budget {t.budget}" if t.budget is not None else (
            f"target {t.speedup}x" if t.speedup is not None else "no target (dense reference only)")
        v = cfg.video
        line[0] = (f"{args.config}: {cfg.model.family} {cfg.model.preset or cfg.model.checkpoint}, "
                   f"{v.frames}x{v.height}x{v.width}, {cfg.sampling.steps} steps, {goal}")
    out = args.out or cfg.output_dir
    _preflight(cfg)  # a config refused here leaves no run folder behind
    _log_file(out / "build.log")
    with stage("load") as line:
        model = loader.load_model(cfg)
        layout = model.layout(cfg.video)
        line[0] = (f"{model.identity['source']} on {model.device}/{cfg.model.dtype}: {layout.video_tokens:,} video + "
                   f"{layout.text_tokens} text tokens")
    write_json(out / "config.json", config.to_dict(cfg))
    from .parallel import main_rank_first

    with stage("reference") as line, main_rank_first():
        ref = reference.run(cfg, model, out, progress=not args.quiet)
        line[0] = (f"{len(ref.latents)} sample(s) x {cfg.sampling.steps} steps "
                   f"{'reused' if ref.reused else 'written'}: {ref.folder}")
    if cfg.target.budget is None and cfg.target.speedup is None or args.until == "reference":
        return
    dense = model
    if cfg.build.precision == "fp8":
        with stage("quantize") as line:
            model, line[0] = _quantize(cfg, model, ref, out, not args.quiet)
    # under sequence parallelism the search runs one-process programs that select per shard as the
    # ranks do (selection.shards = parallel.ulysses), its candidates spread over the ranks; the
    # engines are each rank's own program
    one = dataclasses.replace(cfg, parallel=ParallelSpec()) if cfg.parallel.ulysses > 1 else cfg
    joint = cfg.search.precision == "joint"  # the model-dtype programs beside the FP8 ones, a precision a step
    with stage("rewrite") as line:
        programs, line[0] = _rewrite(one, dense if joint else model, layout, out, args.dump_graphs, not args.quiet)
        from .tokenwise import build_programs

        fp8 = (model, build_programs(model, one, sorted(programs), not args.quiet)) if joint else None
        line[0] += f"; and the FP8 model's {len(fp8[1])}" if joint else ""
    from . import search

    if args.until == "rewrite":
        return
    with stage("search") as line:
        schedule = search.plan(one, dense if joint else model, ref, out, resume=args.resume, progress=not args.quiet,
                               programs=programs, fp8=fp8)
        line[0] = _search_line(schedule, out)
    if args.until == "search":
        return
    with stage("engines") as line:
        # joint: the model dtype's engines, and the FP8 model's for the steps the search put in FP8
        manifest = engines.build(cfg, dense if joint else model, programs if one is cfg else {}, schedule, out,
                                 progress=not args.quiet,
                                 fp8=(model, fp8[1] if one is cfg else {}) if schedule.mixed else None)
        folder = out / "engines"
        par = manifest.build.get("parallel")
        size = sum((folder / (f"rank{par['rank']}" if par else "") / f).stat().st_size for f in manifest.files)
        ranks = f" on each of {par['world_size']} ranks (Ulysses)" if par else ""
        line[0] = (f"{len(manifest.engines)} {manifest.backend} engine(s) + weights{ranks}, {size / 2**20:.1f} MiB "
                   f"({len(manifest.build['rebuilt'])} built): {folder}")
    from .parallel import barrier

    barrier()  # every rank's engines are in place before any rank loads the folder
    if args.until == "engines":
        return
    with stage("check") as line:
        line[0] = _check(cfg, dense, schedule, ref, out)


def _quantize(cfg, model, ref, out: Path, progress: bool):
    """The FP8 model the rewrite, search and engines work on (the dense reference stays the model's dtype)."""
    from . import quantize

    q = quantize.run(cfg, model, ref, out, progress)
    r = q.record
    kept = f" ({', '.join(r['kept'])} in {cfg.model.dtype})" if r["kept"] else ""
    return q.model, (f"{len(r['quantized'])} of {len(r['groups'])} groups of Linear layers in FP8 e4m3{kept}, "
                     f"{'reused' if q.reused else r['rule']}; dense FP8 {r['psnr']:.2f} dB against dense: "
                     f"{out / 'quantize' / r['key']}")


def _rewrite(cfg, model, layout, out: Path, dump: bool, progress: bool) -> tuple[dict, str]:
    """The rewritten program of every budget level the search can pick, from one capture."""
    from .io import atomic_file, write_json
    from .schedule import level_tokens
    from .tokenwise import build_programs

    tokens = level_tokens(cfg.search.levels, layout.video_tokens)
    programs = build_programs(model, cfg, tokens, progress, dump_root=out / "graphs" if dump else None)
    for k, program in programs.items():
        write_json(out / "graphs" / f"k{k}.json", {"budget_rows": k, "video_tokens": layout.video_tokens,
                                                    "blocks": program.blocks, "passes": program.stats})
        with atomic_file(out / "graphs" / f"k{k}.txt") as fh:
            fh.write(program.graph.code)
    # what a sparse program holds (the dense one keeps every attention as it is)
    sparse = [k for k in programs if k < layout.video_tokens]
    some = programs[min(sparse)] if sparse else programs[max(programs)]
    attention = some.stats["replace_attention"]
    grouped = "query-only factored" if sparse else "factored on every row"
    kinds = f"{attention['sparse_attention']} query-only attentions" + (
        f", {attention['factored_attention']} {grouped}" if attention.get("factored_attention") else "")
    return programs, (f"{len(programs)} programs (k = {min(programs)} .. {max(programs)} of {layout.video_tokens} rows), "
                      f"{some.blocks} blocks, {kinds} each: {out / 'graphs'}")


def _search_line(schedule, out: Path) -> str:
    """The search's result on one line; its details (schedule, cost, proxy) at info level."""
    r = schedule.search
    log.info("schedule (budget per step): %s", " ".join(f"{b:.1f}" for b in schedule.budgets))
    speed = "" if r is None or r.predicted_speedup is None else (
        f", predicted {r.predicted_speedup:.2f}x ({'eager here' if r.cost_source == 'eager' else Path(r.cost_source).name})")
    if speed and r.constraint.get("kind") == "latency" and r.constraint["value"] > r.constraint["target"] * (1 + 1e-9):
        speed += f", under the {r.dense_ms / r.constraint['target']:.2f}x asked (search.repair_high above 1)"
    if r is not None:
        c = r.cost
        log.info("search: %d candidates (%d stopped early), %d of a naive %d denoising steps, %.0f s",
                 c["candidates_evaluated"], c["stopped_early"], c["steps_executed"], c["naive_steps"], c["wall_seconds"])
        if r.proxy:
            p = r.proxy
            log.info("proxy %s: %d candidates re-scored at the full video in %.0f s, Spearman %.2f%s; the chosen one "
                     "was the proxy's #%d", "x".join(map(str, p["video"])), p["rescored"], p["rescore_seconds"],
                     p["spearman"], "" if p["valid"] else " (a hand-made seed won: not validated)" if p.get("seed_chosen")
                     else f" (below {p['min_spearman']}: not validated)", p["chosen_proxy_rank"] + 1)
            if p.get("refine"):
                f = p["refine"]
                log.info("refined at the full video: %d generations, %d candidates in %.0f s, %.2f -> %.2f dB",
                         f["generations"], f["candidates"], f["seconds"], f["start_psnr"], f["psnr"])
    psnr = schedule.quality.psnr if schedule.quality else float("nan")
    fp8 = f", {schedule.fp8_steps} in FP8" if schedule.mixed else ""  # which: schedule.json's precision_per_step
    return (f"mean budget {schedule.mean_budget:.3f}, {schedule.skipped} skipped step(s){fp8}, PSNR {psnr:.2f} dB "
            f"against dense{speed}: {out / 'search' / schedule.key / 'schedule.json'}")


def _check(cfg, model, schedule, ref, out: Path) -> str:
    """The runtime loads the engines (verifying the manifest) and samples the first prompt
    and seed (compiled engines twice: the first compiles and warms up), timed against the
    diffusers transformer's eager sample, with PSNR against the dense reference."""
    import torch

    from . import runtime
    from .io import write_json
    from .metrics import psnr
    from .reference import sample_name
    from .sampling import denoise, prompt_inputs
    from .timing import synchronize

    folder = out / "engines"
    t0 = time.perf_counter()
    transformer = runtime.load(folder, device=model.device)
    load_s = time.perf_counter() - t0
    s = cfg.sampling
    inputs = prompt_inputs(model, cfg.video, s, s.prompts[0], s.seeds[0], out / "embeddings")

    def timed(fn) -> tuple[torch.Tensor, float]:
        synchronize(model.device)
        t = time.perf_counter()
        value = fn().cpu()  # .cpu() waits for the device
        return value, time.perf_counter() - t

    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    latents, first_s = timed(lambda: denoise(model, cfg.video, s, inputs, transformer))  # compiles / warms up
    sample_s = first_s
    if cfg.build.backend != "eager":  # compiled engines: time a warm sample
        if model.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(model.device)
        latents, sample_s = timed(lambda: denoise(model, cfg.video, s, inputs, transformer))
    peak = torch.cuda.max_memory_allocated(model.device) if model.device.type == "cuda" else None
    # the diffusers transformer, eager: the dense reference's fastest sample if this run computed it, else timed now
    dense_s = min(ref.seconds.values()) if ref.seconds else timed(lambda: denoise(model, cfg.video, s, inputs))[1]
    name = sample_name(0, s.seeds[0])
    dense = ref.latents[name]
    mse = float(((latents - dense) ** 2).mean())
    manifest = transformer.manifest
    folder = transformer.folder  # this rank's, under sequence parallelism
    check = {"load_s": load_s, "first_sample_s": first_s, "sample_s": sample_s, "dense_sample_s": dense_s,
             "speedup": dense_s / sample_s, "peak_bytes": peak, "mse": mse,
             "psnr": psnr(mse, float(dense.max() - dense.min())),
             "engine_bytes": sum((folder / f).stat().st_size for f in manifest.files),
             "weights_bytes": (folder / manifest.weights_file).stat().st_size,
             "backend": cfg.build.backend, "device": str(model.device),
             "parallel": manifest.build.get("parallel")}
    if manifest.build.get("parallel", {}).get("rank", 0) == 0:
        write_json(out / "engines-check.json", check)
    searched = schedule.quality.per_sample.get(name, {}).get("psnr", float("nan")) if schedule.quality else float("nan")
    return (f"runtime sample {sample_s:.1f} s (first {first_s:.1f} s) against dense eager {dense_s:.1f} s: "
            f"{check['speedup']:.2f}x; PSNR {check['psnr']:.2f} dB against dense (the search measured {searched:.2f})")


def build_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="astraea-build", description="Build per-timestep token-wise engines for a video DiT.",
        epilog=BUILD_STAGES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(parser)
    parser.add_argument("--dump-graphs", action="store_true", help="write the graph before and after every pass")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted budget search from its checkpoint")
    parser.add_argument("--until", choices=("reference", "rewrite", "search", "engines"),
                        help="stop after this stage (e.g. search: a schedule.json to build engines from elsewhere)")
    return _run("astraea-build", argv, parser, _build)


def _bench_config(args):
    """(config, output folder, engine folder or None) from a model.yaml or an engine folder,
    with the command line's settings validated as config keys."""
    import json

    from . import config
    from .io import read_json

    target = Path(args.config)
    engine_folder = None
    if target.is_dir() and args.build_only:
        raise AstraeaError("--build-only builds from a model.yaml; an engine folder is already built")
    if target.is_dir():  # an engine folder: its run folder's config.json describes the model
        if not (target / "manifest.json").is_file():
            raise AstraeaError(f"{target} is a folder without manifest.json: give a model.yaml or an engine folder")
        engine_folder, run_folder = target, target.parent
        if not (run_folder / "config.json").is_file():
            raise AstraeaError(f"{run_folder / 'config.json'} is missing: the engine folder must sit in its run folder")
        if args.steps is not None:
            raise AstraeaError("--steps cannot change an engine folder's schedule: rebuild the engines for another count")
        raw = read_json(run_folder / "config.json", "copy the run folder's config.json beside the engine folder")
        name, source, out = run_folder.name, str(run_folder / "config.json"), args.out or run_folder
    else:
        cfg = config.load(target)
        raw = json.loads(json.dumps(config.to_dict(cfg)))  # plain lists, paths already resolved
        name, source, out = cfg.name, cfg.source, args.out or cfg.output_dir
    raw = {k: v for k, v in raw.items() if k not in ("name", "source")}
    raw["bench"] = dict(raw.get("bench") or {}, **{k: v for k, v in (
        ("methods", args.methods), ("budgets", args.budgets), ("peers", args.peers), ("repeats", args.repeats),
        ("warmup", args.warmup), ("cuda_graphs", args.cuda_graphs or None)) if v is not None})
    if args.steps is not None:
        raw["sampling"] = dict(raw["sampling"], steps=args.steps)
    return config.from_dict(raw, name=name, source=source), out, engine_folder


def _bench(args) -> None:
    from . import bench, loader, report
    from .preflight import layout
    from .schedule import read_schedules

    with stage("validate") as line:
        cfg, out, engine_folder = _bench_config(args)
        extra = {}
        for path in args.schedules or ():
            extra |= read_schedules(path, cfg.sampling.steps, layout(cfg).video_tokens)
        line[0] = f"{args.config}: methods {', '.join(cfg.bench.methods)}"
    _preflight(cfg)
    _log_file(out / "bench" / "bench.log")
    with stage("load") as line:
        model = loader.load_model(cfg)
        line[0] = f"{model.identity['source']} on {model.device}/{cfg.model.dtype}"
    if args.build_only:
        if cfg.build.precision == "fp8":  # the engines' model, calibrated on a dense reference of the prompts
            from . import reference

            with stage("reference") as line:
                ref = reference.run(cfg, model, out, progress=not args.quiet)
                line[0] = f"{len(ref.latents)} sample(s) {'reused' if ref.reused else 'written'}: {ref.folder}"
            with stage("quantize") as line:
                dense, (model, line[0]) = model, _quantize(cfg, model, ref, out, not args.quiet)
        with stage("engines") as line:
            schedules = bench.plan_schedules(cfg, model, out, extra)
            manifest = bench.build_engines(cfg, model, out, schedules, progress=not args.quiet,
                                           dense=dense if cfg.build.precision == "fp8" else None)
            line[0] = f"{len(manifest.engines)} engine(s), {len(manifest.build['rebuilt'])} built: {out / 'bench' / 'engines'}"
        built = set(manifest.build["rebuilt"])
        for key, e in sorted(manifest.engines.items(), key=lambda item: -item[1].tokens):
            how = f"built in {manifest.build['seconds'][key]:.0f} s" if key in built else "kept"
            fp8 = ", FP8" if manifest.fp8_weights and e.precision == "fp8" else ""  # a folder mixing precisions
            print(f"{out / 'bench' / 'engines' / e.file}: {e.tokens} rows{fp8}, {how}")
        return
    with stage("bench") as line:
        result = bench.run(cfg, model, out, extra_schedules=extra, engine_folder=engine_folder, progress=not args.quiet)
        line[0] = f"{len(result['rows'])} rows: {out / 'bench' / 'bench.md'}"
    print(report.markdown(result))


def bench_main(argv: list[str] | None = None) -> int:
    from .schema import BENCH_METHODS

    parser = argparse.ArgumentParser(
        prog="astraea-bench",
        description="Measure, on one model, prompt set and card: eager dense (diffusers), compiled dense, "
        "Astraea eager and compiled (engines), and the peers (diffusers' caches, ToCa); latency end to end and per call, peak memory, "
        "PSNR/SSIM against dense. Writes <run>/bench/bench.json, bench.md and PNGs.",
        epilog=BENCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(parser)
    parser.add_argument("--methods", nargs="+", choices=BENCH_METHODS, help="what to measure (default bench.methods)")
    parser.add_argument("--budgets", nargs="*", type=float,
                        help="Astraea's uniform budgets (default bench.budgets; none: only --schedules)")
    parser.add_argument("--peers", nargs="+", help="peer settings, e.g. 'pab skip=2 cross=6' (default bench.peers)")
    parser.add_argument("--schedules", nargs="+", type=Path,
                        help="more Astraea schedules: schedule.json files or JSON {name: [budget per step]}")
    parser.add_argument("--steps", type=int, help="denoising steps (default sampling.steps)")
    parser.add_argument("--repeats", type=int, help="timed generations a sample (default bench.repeats)")
    parser.add_argument("--warmup", type=int, help="warm-up calls of each budget (default bench.warmup)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="astraea-compiled: replay the engines as CUDA graphs (default bench.cuda_graphs)")
    parser.add_argument("--build-only", action="store_true",
                        help="build <out>/bench/engines for the astraea-compiled rows and stop (time them later: "
                        "engine files already there are kept, so a benchmark can be split over machines)")
    return _run("astraea-bench", argv, parser, _bench)


if __name__ == "__main__":
    sys.exit(build_main())
