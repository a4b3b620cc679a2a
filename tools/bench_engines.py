"""Engines on the GPU: build them, then load them in a fresh process as the transformer of a
diffusers WanPipeline, and measure start-up, memory and per-step latency against the dense
diffusers transformer in the same pipeline.

Two phases, each its own command (a device call is at most 10 minutes):
  build   a random-weight model at a real size (default Wan 2.1 1.3B, 832x480x65, 50 steps,
          CFG 5, bf16), a schedule (dense first step, then the --budgets in turn), and
          `astraea.engines.build` with --backend into <folder>; writes build.json
  run     fresh processes with an empty Inductor cache:
            engines  `astraea.runtime.load(folder)` as `pipe.transformer` (start-up: load
                     seconds and each engine's first call, for inductor warm from the
                     build's cache artifacts; engines_cold: without them), then timed
                     generations: per-call latency
                     (CUDA events) by budget, end-to-end, peak memory
            dense    the diffusers transformer (same weights seed) in the same pipeline
          writes run.json and engines.md (a markdown table)
The pipeline gets prompt embeddings and latents directly (random, seeded): no text encoder
or VAE, output_type="latent". Checked on the CPU with a tiny preset (wall-clock timing there).

    python3 tools/bench_engines.py build --folder runs/gpu-aoti --backend aoti --budgets 0.5
    python3 tools/bench_engines.py run --folder runs/gpu-aoti --out $OUT/aoti
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from astraea.manifest import Manifest  # noqa: E402
from astraea.schedule import Schedule  # noqa: E402
from astraea.timing import Clock, device_name  # noqa: E402


def config_dict(args) -> dict:
    return {"model": {"family": "wan", "preset": args.preset, "dtype": args.dtype, "device": args.device},
            "video": {"frames": args.frames, "height": args.height, "width": args.width},
            "sampling": {"steps": args.steps, "guidance": 5.0, "prompts": ["a cat walks on the grass"]},
            "selection": {"delta": args.delta, "sketch_dim": args.sketch_dim},
            "build": {"backend": args.backend, "cfg": "auto"}}


def build(args) -> None:
    from astraea import config, engines, loader
    from astraea.sampling import timesteps

    cfg = config.from_dict(config_dict(args))
    t0 = time.perf_counter()
    model = loader.load_model(cfg)
    n = model.layout(cfg.video).video_tokens
    ks = [max(1, round(b * n)) for b in args.budgets]
    tokens = [n] + [ks[i % len(ks)] for i in range(cfg.sampling.steps - 1)]
    schedule = Schedule.from_tokens(tokens, n, timesteps=tuple(timesteps(model, cfg.sampling.steps)), key="bench_engines")
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.scheduler.save_config(str(folder))  # the run phase builds the pipeline's scheduler from it
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    manifest = engines.build(cfg, model, {}, schedule, folder, backend=args.backend).to_json()
    out = {"config": config_dict(args), "device": device_name(model.device), "model_load_s": load_s,
           "build_s": time.perf_counter() - t0, "engine_s": manifest["build"]["seconds"], "tokens": n, "levels": ks,
           "attention": os.environ.get("ASTRAEA_ATTENTION", "auto"),
           "files_mib": {f: (folder / "engines" / f).stat().st_size / 2**20 for f in manifest["files"]}}
    (folder / "build.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


def _pipeline(transformer, folder: Path):
    import diffusers

    sched = json.loads((folder / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, sched["_class_name"]).from_config(sched)
    return diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=scheduler)


def _inputs(manifest: dict, device) -> dict:
    shapes = {s["name"]: s["shape"] for s in manifest["inputs"]}
    gen = torch.Generator(device).manual_seed(0)
    text = shapes["encoder_hidden_states"]
    hidden = shapes["hidden_states"]
    return {"prompt_embeds": torch.randn(text, generator=gen, device=device, dtype=torch.bfloat16),
            "negative_prompt_embeds": torch.randn(text, generator=gen, device=device, dtype=torch.bfloat16),
            "latents": torch.randn(hidden, generator=gen, device=device, dtype=torch.float32)}


_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CUDA events there, wall clock here


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _memory(peak: bool = False) -> float:
    if not torch.cuda.is_available():
        return float("nan")
    return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**30


class _Timed:
    """Wraps a callable; times every call with CUDA events under a label."""

    def __init__(self, fn, label: str, log: list):
        self.fn, self.label, self.log = fn, label, log

    def __call__(self, *a, **kw):
        start, end = Clock(_DEVICE), Clock(_DEVICE)
        start.record()
        out = self.fn(*a, **kw)
        end.record()
        self.log.append((self.label, start, end))
        return out


def _generate(pipe, inputs: dict, manifest: dict, steps: int, latents: torch.Tensor):
    video = manifest["video"]
    return pipe(prompt_embeds=inputs["prompt_embeds"], negative_prompt_embeds=inputs["negative_prompt_embeds"],
                height=video["height"], width=video["width"], num_frames=video["frames"], num_inference_steps=steps,
                guidance_scale=5.0, latents=latents.clone(), output_type="latent").frames


def _timed_generations(pipe, inputs: dict, manifest: dict, generations: int, log: list) -> tuple[list, torch.Tensor]:
    """Milliseconds of each generation (peak memory counted from here on; `log` keeps the
    last generation's per-call events) and the last generation's latents."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    ends, results = [], None
    for _ in range(generations):
        log.clear()
        start, end = Clock(_DEVICE), Clock(_DEVICE)
        start.record()
        results = _generate(pipe, inputs, manifest, len(manifest["steps"]), inputs["latents"])
        end.record()
        _sync()
        ends.append(start.until(end))
    return ends, results


def run_engines(folder: Path, generations: int, warm: bool = True) -> dict:
    from astraea import runtime

    manifest = json.loads((folder / "engines" / "manifest.json").read_text())
    device = torch.device(manifest["toolchain"]["device"])
    if device.type == "cuda":
        torch.zeros(1, device=device)  # the CUDA context, not counted as loading
    t0 = time.perf_counter()
    transformer = runtime.load(folder / "engines", device, warm=warm)
    _sync()
    load_s = time.perf_counter() - t0
    loaded_gib = _memory()
    manifest = transformer.manifest.to_json()
    steps = len(manifest["steps"])
    inputs = _inputs(manifest, device)
    pipe = _pipeline(transformer, folder)
    budget_of = {key: e["tokens"] for key, e in manifest["engines"].items()}
    first, log = {}, []
    engines = dict(transformer.engines)

    def first_call(key):  # wall seconds of an engine's first call (compile or load work included)
        def call(*a):
            t = time.perf_counter()
            out = engines[key](*a)
            _sync()
            first[budget_of[key]] = time.perf_counter() - t
            transformer.engines[key] = _Timed(engines[key], budget_of[key], log)
            return out
        return call

    transformer.engines = {key: first_call(key) for key in engines}
    t0 = time.perf_counter()
    _generate(pipe, inputs, manifest, steps, inputs["latents"])
    _sync()
    first_generation_s = time.perf_counter() - t0
    ends, results = _timed_generations(pipe, inputs, manifest, generations, log)
    per_call: dict = {}
    for label, s, e in log:
        per_call.setdefault(label, []).append(s.until(e))
    torch.save(results.cpu(), folder / "engines_latents.pt")
    return {"load_s": load_s, "load_parts_s": transformer.load_seconds, "loaded_gib": loaded_gib, "first_call_s": first, "first_generation_s": first_generation_s,
            "generation_ms": statistics.median(ends), "generations": generations, "steps": steps,
            "peak_gib": _memory(peak=True),
            "call_ms": {k: statistics.median(v) for k, v in per_call.items()},
            "calls": {k: len(v) for k, v in per_call.items()},
            "state_gib": Manifest.from_json(manifest).state_bytes() / 2**30}


def run_dense(folder: Path, generations: int) -> dict:
    from astraea import config, loader

    build_info = json.loads((folder / "build.json").read_text())
    manifest = json.loads((folder / "engines" / "manifest.json").read_text())
    cfg = config.from_dict(build_info["config"])
    model = loader.load_model(cfg)
    transformer = model.transformer
    device = model.device
    _sync()
    loaded_gib = _memory()
    steps = len(manifest["steps"])
    inputs = _inputs(manifest, device)
    pipe = _pipeline(transformer, folder)
    log = []
    transformer.forward = _Timed(transformer.forward, "dense", log)
    _generate(pipe, inputs, manifest, 2, inputs["latents"])  # warm-up
    _sync()
    ends, results = _timed_generations(pipe, inputs, manifest, generations, log)
    theirs = torch.load(folder / "engines_latents.pt") if (folder / "engines_latents.pt").is_file() else None
    quality = None
    if theirs is not None and theirs.shape == results.shape:
        mse = torch.mean((theirs.float() - results.float().cpu()) ** 2).item()
        quality = {"mse": mse, "rel_l2": (torch.linalg.vector_norm(theirs.float() - results.float().cpu())
                                          / torch.linalg.vector_norm(results.float().cpu())).item()}
    return {"loaded_gib": loaded_gib, "generation_ms": statistics.median(ends), "generations": generations, "steps": steps,
            "peak_gib": _memory(peak=True),
            "call_ms": {"dense": statistics.median(s.until(e) for _, s, e in log)},
            "engines_vs_dense": quality}


def run(args) -> None:
    folder = Path(args.folder)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")), "torch": torch.__version__,
              "build": json.loads((folder / "build.json").read_text())}
    for part in args.parts:
        with tempfile.TemporaryDirectory() as cache:  # a fresh process with an empty Inductor cache
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
            cmd = [sys.executable, __file__, "_part", part, "--folder", str(folder), "--generations", str(args.generations)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                result[part] = {"error": proc.stderr[-3000:]}
            else:
                result[part] = json.loads(proc.stdout.strip().splitlines()[-1])
                result[part]["process_s"] = time.perf_counter() - t0
        (out / "run.json").write_text(json.dumps(result, indent=1))
        print(part, json.dumps(result[part], indent=1), flush=True)
    write_table(result, out)


def write_table(result: dict, out: Path) -> None:
    b = result["build"]
    n = b["tokens"]
    lines = [f"{result['device']}, torch {result['torch']}; backend {b['config']['build']['backend']}, "
             f"attention {b['attention']}, delta {b['config']['selection']['delta']}; build {b['build_s']:.0f} s "
             f"({', '.join(f'{s:.0f}' for s in b['engine_s'].values())} s an engine)", "",
             "| | load s | first call s (by budget) | generation s | peak GiB | loaded GiB | per call ms (by budget) |",
             "|---|---|---|---|---|---|---|"]
    for part in ("engines", "engines_cold", "dense"):
        r = result.get(part)
        if not r or "error" in r:
            continue
        first = ", ".join(f"{int(k) / n:.0%}: {v:.1f}" for k, v in sorted(r.get("first_call_s", {}).items(), key=lambda x: -int(x[0])))
        calls = ", ".join(f"{(int(k) / n if k != 'dense' else 1):.0%}: {v:.0f}" for k, v in r["call_ms"].items())
        lines.append(f"| {part} | {r.get('load_s', 0):.1f} | {first or '-'} | {r['generation_ms'] / 1000:.1f} | "
                     f"{r['peak_gib']:.1f} | {r['loaded_gib']:.1f} | {calls} |")
    md = "\n".join(lines) + "\n"
    (out / "engines.md").write_text(md)
    print(md)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="phase", required=True)
    pb = sub.add_parser("build")
    pb.add_argument("--folder", required=True)
    pb.add_argument("--backend", default="aoti", choices=["eager", "inductor", "aoti"])
    pb.add_argument("--budgets", type=float, nargs="+", default=[0.5])
    pb.add_argument("--preset", default="wan2.1-t2v-1.3b")
    pb.add_argument("--frames", type=int, default=65)
    pb.add_argument("--height", type=int, default=480)
    pb.add_argument("--width", type=int, default=832)
    pb.add_argument("--steps", type=int, default=50)
    pb.add_argument("--dtype", default="bf16")
    pb.add_argument("--device", default="cuda")
    pb.add_argument("--delta", default="full", choices=["full", "sketch"])
    pb.add_argument("--sketch-dim", type=int, default=64)
    pr = sub.add_parser("run")
    pr.add_argument("--folder", required=True)
    pr.add_argument("--out", required=True)
    pr.add_argument("--parts", nargs="+", default=["engines", "dense"], choices=["engines", "engines_cold", "dense"])
    pr.add_argument("--generations", type=int, default=2)
    pp = sub.add_parser("_part")
    pp.add_argument("part", choices=["engines", "engines_cold", "dense"])
    pp.add_argument("--folder", required=True)
    pp.add_argument("--generations", type=int, default=2)
    args = p.parse_args()
    if args.phase == "build":
        build(args)
    elif args.phase == "run":
        run(args)
    else:
        if args.part == "dense":
            print(json.dumps(run_dense(Path(args.folder), args.generations)))
        else:
            print(json.dumps(run_engines(Path(args.folder), args.generations, warm=args.part == "engines")))


if __name__ == "__main__":
    main()
