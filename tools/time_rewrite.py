"""How long capture + the pass pipeline take on a real-size model (CPU or meta is enough).

    python tools/time_rewrite.py --preset wan2.1-t2v-1.3b --frames 81 --budget 0.5

Prints the seconds of each part (weights, export + functionalisation, passes) and the
graph's node count; JSON with --out. --engine-export also times what every engine of a
build adds before its compiler runs: the rewritten step exported again as a function of
tensors (tokenwise.TensorStep, the state updated in place) and its decomposition for
Inductor / AOTInductor (plugins.decompose), as engines.build did for each budget, and the
one pass engines.build makes now (the ops' implementations traced in: engines.inlined).

    python tools/time_rewrite.py --family opensora --preset stdit3-xl-2 --frames 51 --height 480 --width 848 --engine-export
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from astraea import config, loader  # noqa: E402
from astraea.capture import capture  # noqa: E402
from astraea.passes import pipeline  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="wan")
    p.add_argument("--preset", default="wan2.1-t2v-1.3b")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--engine-export", action="store_true", help="also time the engine's export and decomposition")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    cfg = config.from_dict({
        "model": {"family": args.family, "preset": args.preset, "dtype": "bf16", "device": "cpu"},
        "video": {"frames": args.frames, "height": args.height, "width": args.width},
        "sampling": {"steps": 50, "prompts": ["timing"]},
    })
    t0 = time.perf_counter()
    model = loader.load_model(cfg)
    t1 = time.perf_counter()
    cap = capture(model, cfg)
    t2 = time.perf_counter()
    gm = cap.program.graph_module
    nodes = len(gm.graph.nodes)
    ctx = pipeline.PassContext(model.family, cap.layout, budget=max(1, round(args.budget * cap.layout.video_tokens)))
    pipeline.run(gm, ctx)
    t3 = time.perf_counter()
    result = {"preset": args.preset, "tokens": cap.layout.video_tokens, "budget": ctx.budget, "nodes": nodes,
              "weights_s": t1 - t0, "export_s": t2 - t1, "passes_s": t3 - t2, "stats": ctx.stats}
    if args.engine_export:
        result.update(engine_export(model, cfg, cap, gm, ctx))
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


def engine_export(model, cfg, cap, gm, ctx) -> dict:
    """Seconds of the engine's own export (TensorStep over the rewritten graph) and of its
    decomposition, then of the one export with the ops inlined (and whether it left any op
    for plugins.decompose), with the rewritten graph's node count."""
    from astraea import engines, plugins, runtime
    from astraea.manifest import input_value
    from astraea.sampling import first_step_kwargs
    from astraea.tokenwise import TensorStep, TokenwiseProgram, signature, weight_tensors

    tp = TokenwiseProgram(cap.program, gm, ctx.budget, len(ctx.blocks), ctx.stats)
    kwargs = first_step_kwargs(model, cfg.video, cfg.sampling)
    sig = signature(tp, kwargs)
    weights = weight_tensors(tp, sig.weights)
    args = [weights[n] for n in sig.weights] + [input_value(kwargs, s.name) for s in sig.inputs]
    state = runtime.empty_state(sig.state, model.device)
    t0 = time.perf_counter()
    ep = torch.export.export(TensorStep(gm, sig.layout, in_place=True), tuple(args + state), strict=False)
    t1 = time.perf_counter()
    plugins.decompose(ep)
    t2 = time.perf_counter()
    flat = torch.export.export(TensorStep(engines.inlined(gm), sig.layout, in_place=True), tuple(args + state), strict=False)
    left = plugins.decompose(flat) is not flat
    t3 = time.perf_counter()
    return {"rewritten_nodes": len(gm.graph.nodes), "engine_export_s": t1 - t0, "engine_decompose_s": t2 - t1,
            "engine_export_inlined_s": t3 - t2, "inlined_left_ops": left}


if __name__ == "__main__":
    main()
