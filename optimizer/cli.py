"""Entry points: `astraea-build` and `astraea-bench` (thin: parse, run the stages, map errors)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .errors import AstraeaError

BUILD_STAGES = """\
stages (each writes into the run folder atomically; the reference is stored under a key
hashing its inputs and reused when that key exists):
  1. validate   model.yaml -> RunConfig; a bad key exits 2 with its key path
  2. load       the family adapter builds random weights at a preset's size or loads a
                local diffusers checkpoint, on model.device in model.dtype
  3. reference  dense sampling of every prompt x seed with the family's scheduler and CFG:
                <run>/reference/<key>/latents.safetensors (+ reference.json, previews)
  4. rewrite    with a target: torch.export once + the fx pass pipeline at every budget
                level the search can pick (counts per pass): <run>/graphs/k<k>.json (+ .txt);
                --dump-graphs: every pass's before/after
  5. search     the evolutionary budget search (README: budget search): the cost model
                <run>/costmodel/<key>.json, then <run>/search/<key>/schedule.json,
                search.png, schedule.png and state.json (checkpoint after every
                generation; --resume continues it; a finished search is reused)
  6. engines    one engine per distinct budget of the schedule (build.backend: eager,
                inductor, aoti, or tensorrt where TensorRT is installed; README: engines)
                + <run>/engines/manifest.json; engines whose key exists are not rebuilt
  7. check      astraea.runtime loads the folder (verifying it) and samples the first
                prompt and seed twice: seconds against the eager dense sample and PSNR
                against dense, <run>/engines-check.json
"""


def _quiet_libraries() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _run(prog: str, argv: list[str] | None, parser: argparse.ArgumentParser, body: Callable) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format=f"{prog}: %(message)s", force=True)
    for noisy in ("matplotlib", "PIL"):  # their debug output is not ours
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.quiet:
        _quiet_libraries()
    try:
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
    except Exception as e:  # a bug, not bad input: one line unless --debug
        if args.debug:
            raise
        print(f"{prog}: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="model.yaml (see README: model.yaml reference)")
    parser.add_argument("--out", type=Path, help="run folder (default: build.output, else runs/<config name>)")
    parser.add_argument("--debug", action="store_true", help="tracebacks and debug logging")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _build(args) -> None:
    from . import config, loader, reference
    from .io import write_json

    cfg = config.load(args.config)
    out = args.out or cfg.output_dir
    log = logging.getLogger("astraea")
    from .runtime import BACKENDS, TENSORRT_MISSING, tensorrt_available

    if cfg.build.backend not in BACKENDS:
        raise config.ConfigError("build.backend", f"{cfg.build.backend} engines are not built by this release "
                                 f"(it builds {', '.join(BACKENDS)})")
    if cfg.build.backend == "tensorrt" and not tensorrt_available():
        raise config.ConfigError("build.backend", f"tensorrt needs {TENSORRT_MISSING}; use eager, inductor or aoti")
    model = loader.load_model(cfg)
    layout = model.layout(cfg.video)
    log.info("%s %s on %s/%s: latents %s, tokens %s = %d video + %d text",
             cfg.model.family, model.identity["source"], model.device, cfg.model.dtype,
             layout.latent_shape, layout.grid, layout.video_tokens, layout.text_tokens)
    write_json(out / "config.json", config.to_dict(cfg))
    ref = reference.run(cfg, model, out, progress=not args.quiet)
    log.info("dense reference %s: %s", "reused" if ref.reused else "written", ref.folder)
    if cfg.target.budget is None and cfg.target.speedup is None:
        log.info("no target (target.budget or target.speedup): stopping after the dense reference")
        return
    programs = _rewrite_stage(cfg, model, layout, out, args.dump_graphs, not args.quiet, log)
    from . import search

    result = search.plan(cfg, model, ref, out, resume=args.resume, progress=not args.quiet, programs=programs)
    _summary(result, log)
    _engine_stage(cfg, model, programs, result, ref, out, not args.quiet, log)


def _engine_stage(cfg, model, programs, result, ref, out: Path, progress: bool, log) -> None:
    """Engines + manifest, then a short benchmark: the runtime loads them (verifying the
    manifest) and samples the first prompt and seed twice (the first warms up), timed
    against the diffusers transformer's eager sample, with PSNR against the dense reference."""
    import torch

    from . import engines, runtime
    from .io import write_json
    from .reference import sample_name
    from .sampling import denoise, prompt_inputs
    from .search import psnr

    start = time.perf_counter()
    manifest = engines.build(cfg, model, programs, result, out, progress=progress)
    folder = out / "engines"
    size = sum((folder / f).stat().st_size for f in manifest["files"])
    weights = (folder / manifest["weights"]["file"]).stat().st_size
    log.info("engines: %d %s engines + weights in %s: %.1f MiB (weights %.1f MiB, stored once); %d rebuilt in %.0f s",
             len(manifest["engines"]), cfg.build.backend, folder, size / 2**20, weights / 2**20,
             len(manifest["build"]["rebuilt"]), time.perf_counter() - start)
    t0 = time.perf_counter()
    transformer = runtime.load(folder, device=model.device)
    load_s = time.perf_counter() - t0
    s = cfg.sampling
    inputs = prompt_inputs(model, cfg.video, s, s.prompts[0], s.seeds[0], out / "embeddings")

    def timed(fn) -> tuple[torch.Tensor, float]:
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        t = time.perf_counter()
        value = fn().cpu()  # .cpu() waits for the device
        return value, time.perf_counter() - t

    _, first_s = timed(lambda: denoise(model, cfg.video, s, inputs, transformer))  # compiles / warms up
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    latents, sample_s = timed(lambda: denoise(model, cfg.video, s, inputs, transformer))
    peak = torch.cuda.max_memory_allocated(model.device) if model.device.type == "cuda" else None
    _, dense_s = timed(lambda: denoise(model, cfg.video, s, inputs))  # the diffusers transformer, eager
    dense = ref.latents[sample_name(0, s.seeds[0])]
    mse = float(((latents - dense) ** 2).mean())
    check = {"load_s": load_s, "first_sample_s": first_s, "sample_s": sample_s, "dense_sample_s": dense_s,
             "speedup": dense_s / sample_s, "peak_bytes": peak, "mse": mse,
             "psnr": psnr(mse, float(dense.max() - dense.min())), "engine_bytes": size, "weights_bytes": weights,
             "backend": cfg.build.backend, "device": str(model.device)}
    write_json(out / "engines-check.json", check)
    log.info("runtime check (%s): loaded in %.1f s; a sample in %.1f s (first %.1f s), dense eager %.1f s: %.2fx; "
             "PSNR %.2f dB against dense (the search measured %.2f)", cfg.build.backend, load_s, sample_s, first_s,
             dense_s, check["speedup"], check["psnr"],
             result["per_sample"].get(sample_name(0, s.seeds[0]), {}).get("psnr", float("nan")))


def _rewrite_stage(cfg, model, layout, out: Path, dump: bool, progress: bool, log) -> dict:
    """The rewritten program of every budget level the search can pick, from one capture."""
    from .io import atomic_file, write_json
    from .search import build_programs, level_tokens

    tokens = level_tokens(cfg.search.levels, layout.video_tokens)
    programs = build_programs(model, cfg, tokens, progress, dump_root=out / "graphs" if dump else None)
    for k, program in programs.items():
        write_json(out / "graphs" / f"k{k}.json", {"budget_rows": k, "video_tokens": layout.video_tokens,
                                                    "blocks": program.blocks, "passes": program.stats})
        with atomic_file(out / "graphs" / f"k{k}.txt") as fh:
            fh.write(program.graph.code)
    some = programs[max(programs)]
    log.info("rewrite: %d programs (k = %s of %d rows), %d blocks, %d query-only attentions each: %s",
             len(programs), ", ".join(map(str, programs)), layout.video_tokens, some.blocks,
             some.stats["replace_attention"]["sparse_attention"], out / "graphs")
    return programs


def _summary(result: dict, log) -> None:
    budgets = " ".join(f"{b:.1f}" for b in result["budget_per_step"])
    cost = result["cost"]
    speedup = result["dense_ms"] / result["predicted_ms"] if result["predicted_ms"] else float("nan")
    log.info("schedule (budget per step): %s", budgets)
    source = result.get("cost_source", "eager")
    where = (f"eager on {result.get('device', 'this device')}" if source == "eager"
             else f"the engines of {Path(source).name}, {result.get('device')}")
    log.info("mean budget %.3f, PSNR %.2f dB against dense (MSE %.3g), predicted %.0f ms against dense %.0f ms "
             "(%.2fx, %s)", result["mean_budget"], result["psnr"], result["mse"], result["predicted_ms"],
             result["dense_ms"], speedup, where)
    log.info("search: %d candidates (%d stopped early), %d of a naive %d denoising steps, %.0f s",
             cost["candidates_evaluated"], cost["stopped_early"], cost["steps_executed"], cost["naive_steps"],
             cost["wall_seconds"])
    proxy = result.get("proxy")
    if proxy:
        log.info("proxy %s: %d candidates re-scored at the full video in %.0f s, Spearman %.2f%s; the chosen one was "
                 "the proxy's #%d", "x".join(map(str, proxy["video"])), proxy["rescored"], proxy["rescore_seconds"],
                 proxy["spearman"], "" if proxy["valid"] else f" (below {proxy['min_spearman']}: not validated)",
                 proxy["chosen_proxy_rank"] + 1)


def build_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="astraea-build", description="Build per-timestep token-wise engines for a video DiT.",
        epilog=BUILD_STAGES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(parser)
    parser.add_argument("--dump-graphs", action="store_true", help="write the graph before and after every pass")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted budget search from its checkpoint")
    return _run("astraea-build", argv, parser, _build)


def _bench(args) -> None:
    import json

    from . import bench, config, loader
    from .errors import AstraeaError

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
        raw = json.loads((run_folder / "config.json").read_text())
        name, source, out = run_folder.name, str(run_folder / "config.json"), args.out or run_folder
    else:
        cfg = config.load(target)
        raw = json.loads(json.dumps(config.to_dict(cfg)))  # plain lists, paths already resolved
        name, source, out = cfg.name, cfg.source, args.out or cfg.output_dir
    # the command line's settings, validated with the rest as config keys
    raw = {k: v for k, v in raw.items() if k not in ("name", "source")}
    raw["bench"] = dict(raw.get("bench") or {}, **{k: v for k, v in (
        ("methods", args.methods), ("budgets", args.budgets), ("peers", args.peers), ("repeats", args.repeats),
        ("warmup", args.warmup), ("cuda_graphs", args.cuda_graphs or None)) if v is not None})
    if args.steps is not None:
        raw["sampling"] = dict(raw["sampling"], steps=args.steps)
    cfg = config.from_dict(raw, name=name, source=source)
    model = loader.load_model(cfg)
    extra = {}
    for path in args.schedules or ():
        extra |= bench.read_schedules(path, cfg.sampling.steps, model.layout(cfg.video).video_tokens)
    if args.build_only:
        manifest = bench.run(cfg, model, out, extra_schedules=extra, progress=not args.quiet, build_only=True)
        built = set(manifest["build"]["rebuilt"])
        for key, e in sorted(manifest["engines"].items(), key=lambda item: -item[1]["tokens"]):
            print(f"{out / 'bench' / 'engines' / e['file']}: {e['tokens']} rows, {'built' if key in built else 'kept'}")
        return
    report = bench.run(cfg, model, out, extra_schedules=extra, engine_folder=engine_folder, progress=not args.quiet)
    print(bench.markdown(report))


def bench_main(argv: list[str] | None = None) -> int:
    from .config import BENCH_METHODS

    parser = argparse.ArgumentParser(
        prog="astraea-bench",
        description="Measure, on one model, prompt set and card: eager dense (diffusers), compiled dense, "
        "Astraea eager and compiled (engines), and diffusers' peers; latency end to end and per call, peak memory, "
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


BENCH_HELP = """CONFIG is a model.yaml; ENGINE_FOLDER is <run>/engines of astraea-build (the run's
config.json describes the model, and the engines' own schedule is what astraea-compiled runs).
Rows of an earlier <out>/bench/bench.json with the same model, video, sampling and device
are kept unless measured again, so a benchmark can be split over several invocations.
"""


if __name__ == "__main__":
    sys.exit(build_main())
