"""Per-step latency of the rewritten graph, eager and under torch.compile, against the dense model.

On a random-weight model at a real size (default: Wan 2.1 1.3B at 832x480x65, CFG batch 2,
bf16) it times one transformer call (CUDA events, warm-up first, median of --repeats) for:
  dense_eager        the diffusers transformer
  dense_compiled     torch.compile(transformer)
  astraea_eager      the rewritten program at each budget (eager fx GraphModule)
  astraea_compiled   torch.compile of the rewritten program at each budget
  astraea_engine     the program as an `inductor` engine runs it: exported with the block state
                     updated in place (tokenwise.TensorStep), then compiled as the runtime compiles it
  astraea_graph      that engine replayed as a CUDA graph (runtime.load(..., cuda_graphs=True))
The rewritten programs run from a state left by one dense (budget N) call, as in sampling.
Each compiled variant reports its compile seconds. --profile also records each variant's
GPU kernels over two calls (torch.profiler): time by kernel and by kind (GEMM, attention,
top-k/sort, gather/scatter, fused Triton, other) into profile.json, to see where a step's
time goes. --batch 1 times one CFG branch a call, as per-branch engines run. The predicted
ratio is the hand-wired block's linear fit (docs/benchmarks.md: a + b k over the dense block). JSON is rewritten
after every variant (a time-out keeps what finished); markdown and PNG at the end.

    python3 tools/bench_step.py --out $OUT/step --budgets 0.1 0.5 --variants dense_eager dense_compiled astraea_compiled
    python3 tools/bench_step.py --out $OUT/eng --batch 1 --budgets 0.4 --variants dense_compiled astraea_engine \
        astraea_graph --profile   (the engines' own kernels; astraea_graph run on the H100: docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from astraea import config, loader, plugins, runtime  # noqa: E402
from astraea.capture import capture  # noqa: E402
from astraea.engines import one_branch  # noqa: E402
from astraea.sampling import first_step_kwargs  # noqa: E402
from astraea.timing import device_name  # noqa: E402
from astraea.tokenwise import TensorStep, TokenwiseTransformer, rewrite, signature, weight_tensors  # noqa: E402

VARIANTS = ("dense_eager", "dense_compiled", "astraea_eager", "astraea_compiled", "astraea_engine", "astraea_graph")
ASTRAEA = VARIANTS[2:]
BLOCK_FIT = {"a_ms": 4.46, "b_ms_per_row": 1.183e-3, "dense_block_ms": 31.15}  # H100, Wan 1.3B block, 26,520 rows


def time_calls(fn, warmup: int, repeats: int) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


KINDS = (("top-k/sort", ("topk", "sort", "radix", "top_k")), ("attention", ("attn", "fmha", "flash", "cudnn", "sdpa")),
         ("gemm", ("gemm", "cutlass", "nvjet", "sm90", "xmma", "cublas")),
         ("gather/scatter", ("gather", "scatter", "index")), ("fused triton", ("triton",)))


def kernel_profile(fn, calls: int = 2) -> dict:
    """GPU time by kernel over `calls` calls: the 25 largest, and totals by kind."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(e.name, [0.0, 0])
            k[0] += e.device_time_total / 1000 / calls
            k[1] += 1
    kinds: dict[str, float] = {}
    for name, (ms, _) in kernels.items():
        low = name.lower()
        kind = next((kind for kind, keys in KINDS if any(key in low for key in keys)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]
    return {"ms_per_call": sum(v[0] for v in kernels.values()), "launches_per_call": sum(v[1] for v in kernels.values()) / calls,
            "by_kind_ms": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top": [{"kernel": name[:160], "ms": ms, "launches": n / calls} for name, (ms, n) in top]}


def engine_step(tp, kwargs: dict, state: list, graph: bool):
    """One call of tp as an `inductor` engine (engines.build and runtime.load_engine): export
    with the state updated in place, torch.compile of the exported module, called on
    detached weights and packed inputs; graph: captured after its first call and replayed."""
    sig = signature(tp, kwargs)
    weights = weight_tensors(tp, sig.weights)
    args = [weights[name].detach() for name in sig.weights] + [runtime.packed(kwargs[s.name]) for s in sig.inputs]
    ep = torch.export.export(TensorStep(tp.graph, sig.layout, in_place=True), tuple(args + state), strict=False)
    compiled = torch.compile(plugins.decompose(ep).module(), dynamic=False)  # as engines.build does
    compiled(*args, *state)  # compiles and autotunes
    if not graph:
        return lambda: compiled(*args, *state)
    cuda_graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(cuda_graph):
        compiled(*args, *state)
    return cuda_graph.replay


def input_amax(transformer, names: dict, kwargs: dict) -> dict:
    """Each named Linear's input amax over one dense call (tensor scaling's calibration)."""
    amax: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_module, inputs):
            a = inputs[0].detach().float().abs().amax()
            amax[f"{name}.input_amax"] = torch.maximum(amax.get(f"{name}.input_amax", a), a)
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in names.items()]
    try:
        with torch.no_grad():
            transformer(**kwargs)
    finally:
        for h in handles:
            h.remove()
    return amax


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--family", default="wan")
    p.add_argument("--preset", default="wan2.1-t2v-1.3b")
    p.add_argument("--frames", type=int, default=65)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--budgets", type=float, nargs="*", default=[0.1, 0.3, 0.5, 0.7, 1.0])
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batch", type=int, choices=(1, 2), default=2, help="2: the CFG batch; 1: one branch a call")
    p.add_argument("--profile", action="store_true", help="also write each variant's kernel profile to profile.json")
    p.add_argument("--precision", choices=("model", "fp8"), default="model",
                   help="fp8: every variant but dense_eager on the FP8 model (the blocks' Linear layers in e4m3, channel "
                        "scales from the weights; the time embedding and the head in bf16); dense_eager stays bf16")
    p.add_argument("--fp8-scaling", choices=("channel", "tensor"), default="channel",
                   help="fp8: channel (a weight scale a channel, each token its own) or tensor (one weight scale "
                        "and one input scale a layer, the input's calibrated on the timed call itself)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = config.from_dict({
        "model": {"family": args.family, "preset": args.preset, "dtype": "bf16", "device": "cuda"},
        "video": {"frames": args.frames, "height": args.height, "width": args.width},
        "sampling": {"steps": 50, "prompts": ["timing"]},
    })
    model = dense = loader.load_model(cfg)
    if args.precision == "fp8":
        import dataclasses

        from astraea import quantize

        names = {n: m for n, m in quantize.candidates(model.transformer).items()
                 if quantize.group_of(n, model.family.block_containers) not in ("condition_embedder", "proj_out")}
        if args.fp8_scaling == "channel":
            amax = {f"{n}.weight_amax": m.weight.detach().float().abs().amax(dim=1) for n, m in names.items()}
        else:
            amax = {f"{n}.weight_amax": m.weight.detach().float().abs().amax() for n, m in names.items()}
            amax.update(input_amax(model.transformer, names, first_step_kwargs(model, cfg.video, cfg.sampling)))
        model = dataclasses.replace(model, transformer=quantize.convert(model.transformer, amax, set(names)))
    n = model.layout(cfg.video).video_tokens
    kwargs = first_step_kwargs(model, cfg.video, cfg.sampling)
    if args.batch == 1:
        kwargs = one_branch(kwargs)
    report = {"device": device_name(model.device), "torch": torch.__version__, "preset": args.preset,
              "precision": args.precision, "fp8_scaling": args.fp8_scaling if args.precision == "fp8" else None,
              "video": f"{args.width}x{args.height}x{args.frames}", "tokens": n, "batch": kwargs["hidden_states"].shape[0],
              "block_fit": BLOCK_FIT, "rows": []}

    profiles: dict[str, dict] = {}

    def record(row: dict, fn=None) -> None:
        if args.profile and fn is not None:
            label = f"{row['variant']} {row['budget']}"
            try:
                profiles[label] = prof = kernel_profile(fn)
                row["profiled_ms"], row["launches"] = prof["ms_per_call"], prof["launches_per_call"]
                print(json.dumps({"profile": label, "by_kind_ms": prof["by_kind_ms"]}))
                for t in prof["top"][:15]:
                    print(f"  {t['ms']:8.2f} ms {t['launches']:6.0f}x  {t['kernel'][:110]}")
            except Exception as e:  # a profiler failure must not lose the timing
                row["profile_error"] = f"{type(e).__name__}: {e}"
            (args.out / "profile.json").write_text(json.dumps(profiles, indent=1))
        report["rows"].append(row)
        (args.out / "bench_step.json").write_text(json.dumps(report, indent=1))
        print(json.dumps(row), flush=True)

    with torch.no_grad():
        if "dense_eager" in args.variants:  # the model's own dtype: the baseline
            ms, peak = time_calls(lambda: dense.transformer(**kwargs), args.warmup, args.repeats)
            record({"variant": "dense_eager", "budget": 1.0, "ms": ms, "peak_gb": peak}, lambda: dense.transformer(**kwargs))
        if "dense_compiled" in args.variants:
            module = model.transformer
            if args.precision == "fp8":  # exported with the FP8 Linear layers in ATen ops, as astraea-bench compiles it
                module = plugins.decompose(torch.export.export(module, (), kwargs, strict=False)).module()
            compiled = torch.compile(module, dynamic=False)
            t0 = time.perf_counter()
            compiled(**kwargs)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            ms, peak = time_calls(lambda: compiled(**kwargs), args.warmup, args.repeats)
            record({"variant": "dense_compiled", "budget": 1.0, "ms": ms, "peak_gb": peak, "compile_s": compile_s},
                   lambda: compiled(**kwargs))
            del compiled
        if not set(ASTRAEA) & set(args.variants):
            return finish(report, args.out)
        t0 = time.perf_counter()
        cap = capture(model, cfg, example=kwargs)
        capture_s = time.perf_counter() - t0
        full = rewrite(model, cfg, n, captured=cap)
        flat = full.flat_inputs(kwargs)
        zeros = TokenwiseTransformer._empty_state(full, flat)
        warm_state = list(full.graph(*flat, *zeros)[1:])  # the state after one dense step
        for frac in args.budgets:
            k = max(1, round(frac * n))
            t0 = time.perf_counter()
            tp = full if k == n else rewrite(model, cfg, k, captured=cap)
            rewrite_s = time.perf_counter() - t0 + capture_s
            for variant in ASTRAEA:
                if variant not in args.variants:
                    continue
                row = {"variant": variant, "budget": frac, "k": k, "rewrite_s": rewrite_s}
                state = [t.clone() for t in warm_state]
                if variant in ("astraea_eager", "astraea_compiled"):
                    graph = tp.graph
                    if variant == "astraea_compiled":
                        graph = torch.compile(tp.graph, dynamic=False)
                        t0 = time.perf_counter()
                        graph(*flat, *warm_state)
                        torch.cuda.synchronize()
                        row["compile_s"] = time.perf_counter() - t0

                    def step(graph=graph, state=state):
                        out = graph(*flat, *state)
                        state[:] = out[1:]

                    del graph
                else:  # the engine: weights, packed inputs, then the state it writes in place
                    t0 = time.perf_counter()
                    step = engine_step(tp, kwargs, state, graph=variant == "astraea_graph")
                    torch.cuda.synchronize()
                    row["compile_s"] = time.perf_counter() - t0

                row["ms"], row["peak_gb"] = time_calls(step, args.warmup, args.repeats)
                fit = BLOCK_FIT
                row["predicted_ratio"] = (fit["a_ms"] + fit["b_ms_per_row"] * k) / fit["dense_block_ms"]
                record(row, step)
                del step, state
            if tp is not full:
                del tp
            torch.cuda.empty_cache()
    finish(report, args.out)


def finish(report: dict, out: Path) -> None:
    rows = report["rows"]
    base = {r["variant"]: r["ms"] for r in rows if r["variant"].startswith("dense")}
    for r in rows:
        if r["variant"] in ("astraea_compiled", "astraea_engine", "astraea_graph") and "dense_compiled" in base:
            r["ratio_vs_dense_compiled"] = r["ms"] / base["dense_compiled"]
        if r["variant"] == "astraea_eager" and "dense_eager" in base:
            r["ratio_vs_dense_eager"] = r["ms"] / base["dense_eager"]
        if "dense_eager" in base:
            r["speedup_vs_dense_eager"] = base["dense_eager"] / r["ms"]
    (out / "bench_step.json").write_text(json.dumps(report, indent=1))
    lines = [f"Card: {report['device']}, torch {report['torch']}; {report['preset']} at {report['video']} "
             f"({report['tokens']} tokens), batch {report['batch']} ({'the CFG batch' if report['batch'] == 2 else 'one CFG branch'}), "
             + ("bf16" if report.get("precision") != "fp8" else
              f"FP8 Linear layers ({report.get('fp8_scaling') or 'channel'} scales; dense_eager bf16)") + "; median step.", "",
             "| variant | budget | step (ms) | peak (GiB) | speedup vs dense eager | ratio vs dense of its kind | predicted ratio (block fit) | compile (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r.get("ratio_vs_dense_compiled", r.get("ratio_vs_dense_eager"))
        cells = [r["variant"], f"{r['budget']:.1f}", f"{r['ms']:.1f}", f"{r['peak_gb']:.2f}",
                 f"{r['speedup_vs_dense_eager']:.2f}x" if "speedup_vs_dense_eager" in r else "-", "-" if ratio is None else f"{ratio:.3f}",
                 f"{r['predicted_ratio']:.3f}" if "predicted_ratio" in r else "-",
                 f"{r['compile_s']:.0f}" if "compile_s" in r else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    (out / "bench_step.md").write_text(md)
    print(md)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
    for variant, style in (("astraea_eager", "-o"), ("astraea_compiled", "-s"), ("astraea_engine", "-^"),
                           ("astraea_graph", "-v")):
        sub = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["budget"])
        if sub:
            ax.plot([r["budget"] for r in sub], [r["ms"] for r in sub], style, ms=4, label=variant)
    for variant, style in (("dense_eager", "--"), ("dense_compiled", ":")):
        if variant in base:
            ax.axhline(base[variant], ls=style, color="grey", label=variant)
    ax.set_xlabel("budget k/N")
    ax.set_ylabel("ms per step (CFG batch)")
    ax.set_title(f"{report['preset']} {report['video']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bench_step.png")
    plt.close(fig)


if __name__ == "__main__":
    main()
