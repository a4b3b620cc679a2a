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
  4. rewrite    with target.budget: torch.export + the fx pass pipeline at that budget (a
                check that the model rewrites, with counts per pass; seconds):
                <run>/graphs/k<k>.json (+ .txt); --dump-graphs: every pass's before/after
  5. search     per-step token budgets meeting the target            (budget-search issue)
  6. compile    one engine per distinct budget + manifest.json        (engines issue)
Stages 5-6 are not in this release; the build stops after the rewrite.
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
        print(f"{prog}: interrupted; finished stages are kept in the run folder", file=sys.stderr)
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
    model = loader.load_model(cfg)
    layout = model.layout(cfg.video)
    log.info("%s %s on %s/%s: latents %s, tokens %s = %d video + %d text",
             cfg.model.family, model.identity["source"], model.device, cfg.model.dtype,
             layout.latent_shape, layout.grid, layout.video_tokens, layout.text_tokens)
    write_json(out / "config.json", config.to_dict(cfg))
    ref = reference.run(cfg, model, out, progress=not args.quiet)
    log.info("dense reference %s: %s", "reused" if ref.reused else "written", ref.folder)
    if cfg.target.budget is not None:
        _rewrite_stage(cfg, model, layout, out, args.dump_graphs, log)


def _rewrite_stage(cfg, model, layout, out: Path, dump: bool, log) -> None:
    from . import tokenwise
    from .io import atomic_file, write_json

    k = max(1, round(cfg.target.budget * layout.video_tokens))
    program = tokenwise.rewrite(model, cfg, k, dump_dir=out / "graphs" / f"k{k}-passes" if dump else None)
    write_json(out / "graphs" / f"k{k}.json", {"budget_rows": k, "video_tokens": layout.video_tokens,
                                                "blocks": program.blocks, "passes": program.stats})
    with atomic_file(out / "graphs" / f"k{k}.txt") as fh:
        fh.write(program.graph.code)
    log.info("rewrite at k=%d of %d rows: %d blocks, %d query-only attentions: %s", k, layout.video_tokens,
             program.blocks, program.stats["replace_attention"]["sparse_attention"], out / "graphs" / f"k{k}.json")


def build_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="astraea-build", description="Build per-timestep token-wise engines for a video DiT.",
        epilog=BUILD_STAGES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(parser)
    parser.add_argument("--dump-graphs", action="store_true", help="write the graph before and after every pass")
    return _run("astraea-build", argv, parser, _build)


def _bench(args) -> None:
    from . import bench, config, loader

    cfg = config.load(args.config)
    out = args.out or cfg.output_dir
    start = time.perf_counter()
    model = loader.load_model(cfg)
    load_s = time.perf_counter() - start
    report = bench.dense_step(cfg, model, progress=not args.quiet) | {"load_s": load_s}
    bench.write_report(report, out / "bench")
    print(bench.markdown([report]))


def bench_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="astraea-bench",
        description="Measure a model.yaml's dense (eager) denoising step: CUDA events, warm-up, median of "
        "bench.repeats, peak memory; writes <run>/bench/dense-step.json and .md.",
    )
    _common(parser)
    return _run("astraea-bench", argv, parser, _bench)


if __name__ == "__main__":
    sys.exit(build_main())
