"""FP8 engines' model: the transformer's Linear layers in e4m3, calibrated with nvidia-modelopt
on the dense reference's own activations (`build.precision: fp8`).

1. Candidates: every nn.Linear whose sizes suit FP8 GEMMs (multiples of 16), in groups: a
   block ("blocks.3") or a top-level module outside the blocks ("condition_embedder",
   "proj_out").
2. Calibration with modelopt on a copy of the transformer that shares its weights, its
   forward loop the dense sampling of the config's prompts x seeds (`build.fp8_scaling`):
     channel  modelopt's FP8_PER_CHANNEL_PER_TOKEN: a weight scale an output channel, each
              input row (token) scaled by its own amax on the fly (the default: 2-7 dB
              closer to dense than `tensor` on the bundled model)
     tensor   modelopt's FP8_DEFAULT: one scale a weight, one a layer's input, the largest
              |x| the layer saw over every step of the dense sampling (static)
   Both keep the quantized layer row-local, so the token-wise rewrite applies to it as to
   the model's own Linear.
3. Which groups stay in the model's dtype: `build.fp8_keep`, or by measurement (`auto`):
   each group quantized alone, its PSNR of the final latents against the dense reference;
   then the largest number of the least sensitive groups with which the whole FP8 model
   still reaches `build.fp8_min_psnr` against dense (a bisection over that count).
4. The FP8 model: a copy of the transformer, sharing the kept layers' weights, with every
   quantized Linear replaced by `astraea.plugins.fp8_linear.Fp8Linear`
   (`astraea::fp8_linear`: torch._scaled_mm on FP8 tensor cores, modelopt's simulated FP8
   elsewhere).
Amaxes and the record (groups, sensitivity, what was kept) are stored under
`<run>/quantize/<key>/` and reused; the key hashes the reference, the candidates and the
settings.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from astraea.plugins.fp8_linear import Fp8Linear

from .errors import AstraeaError, ConfigError
from .families import LoadedModel
from .fitness import Sample, calibration_samples, sample_psnrs
from .io import read_json, read_tensors, stable_hash, write_json
from .sampling import denoise, first_step_kwargs
from .schema import RunConfig

log = logging.getLogger("astraea")
MODELOPT_MISSING = "nvidia-modelopt, which is not installed (pip install 'astraea[modelopt]')"


@dataclass
class Quantized:
    model: LoadedModel  # the FP8 model (the transformer replaced), for the rewrite, search and engines
    record: dict  # quantized / kept groups, sensitivity, PSNR of the dense FP8 model, the key
    reused: bool


def candidates(transformer: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers an FP8 GEMM can run (inner and output sizes multiples of 16)."""
    return {name: m for name, m in transformer.named_modules()
            if isinstance(m, nn.Linear) and m.in_features % 16 == 0 and m.out_features % 16 == 0}


def group_of(name: str, containers: tuple[str, ...]) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] in containers else parts[0]


def groups(transformer: nn.Module, containers: tuple[str, ...]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in candidates(transformer):
        out.setdefault(group_of(name, containers), []).append(name)
    return out


def resolve_keep(keep: tuple[str, ...], names: list[str], containers: tuple[str, ...]) -> set[str]:
    """build.fp8_keep's group names, a negative block index counting from the last block."""
    out = set()
    for i, g in enumerate(keep):
        head, _, index = g.partition(".")
        if head in containers and index.lstrip("-").isdigit():
            blocks = sorted({n for n in names if n.startswith(head + ".")}, key=lambda n: int(n.split(".")[1]))
            if not blocks:
                raise ConfigError(f"build.fp8_keep[{i}]", f"{g!r}: the model has no {head}")
            count = int(blocks[-1].split(".")[1]) + 1
            g = f"{head}.{int(index) + count if int(index) < 0 else int(index)}"
        if g not in names:
            raise ConfigError(f"build.fp8_keep[{i}]", f"{g!r} is not a group of this model ({', '.join(names)})")
        out.add(g)
    return out


def shared_copy(module: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer (no weight is copied)."""
    memo = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return copy.deepcopy(module, memo)


def calibrate(model: LoadedModel, cfg: RunConfig, samples: list[Sample], names: list[str],
              progress: bool = True) -> dict[str, torch.Tensor]:
    """modelopt's FP8 calibration of the named Linear layers on the dense sampling of `samples`:
    {"<name>.weight_amax": ..., "<name>.input_amax": ...}."""
    try:
        import modelopt.torch.quantization as mtq
    except ImportError:
        raise AstraeaError(f"build.precision: fp8 needs {MODELOPT_MISSING}") from None
    work = shared_copy(model.transformer)
    channel = cfg.build.fp8_scaling == "channel"
    config = copy.deepcopy(mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG if channel else mtq.FP8_DEFAULT_CFG)
    wanted = set(names)
    config["quant_cfg"] = list(config["quant_cfg"]) + [  # only the candidates: later entries override
        {"quantizer_name": f"{n}.*", "enable": False} for n, m in work.named_modules() if n and isinstance(m, nn.Linear)
        and n not in wanted] + [{"quantizer_name": f"{n}.*_quantizer", "enable": True} for n in names]
    calibrating = dataclasses.replace(model, transformer=work)
    # channel scales read the weights alone (the inputs are scaled on the fly): one call suffices
    todo = samples[:1] if channel else samples
    bar = tqdm(total=len(todo), desc="fp8 calibration", unit="sample", disable=not progress, leave=False)

    def forward_loop(m: nn.Module) -> None:
        for s in todo:
            if channel:
                m(**first_step_kwargs(calibrating, cfg.video, cfg.sampling, s.inputs))
            else:
                denoise(calibrating, cfg.video, cfg.sampling, s.inputs)
            bar.update()

    import contextlib
    import io

    text = io.StringIO()
    with torch.no_grad(), contextlib.redirect_stdout(text):  # modelopt prints what it inserted
        mtq.quantize(work, config, forward_loop)
    bar.close()
    log.debug("modelopt: %s", text.getvalue().strip())
    amax = {}
    modules = dict(work.named_modules())
    for n in names:
        m = modules[n]
        w = m.weight_quantizer.amax
        x = None if channel else m.input_quantizer.amax  # channel: the rows' own scales, on the fly
        if w is None or (x is None and not channel):
            raise AstraeaError(f"modelopt calibrated no FP8 scale for {n} (was it called in sampling?)")
        amax[f"{n}.weight_amax"] = w.detach().float().reshape(-1 if channel else ()).cpu()
        if not channel:
            amax[f"{n}.input_amax"] = x.detach().float().reshape(()).cpu()
    return amax


def convert(transformer: nn.Module, amax: dict[str, torch.Tensor], names: set[str]) -> nn.Module:
    """A copy of the transformer (sharing the weights it keeps) with the named Linear layers
    replaced by Fp8Linear at the calibrated scales."""
    out = shared_copy(transformer)
    modules = dict(out.named_modules())
    for n in sorted(names):
        parent, _, child = n.rpartition(".")
        linear = modules[n]
        device = linear.weight.device
        x_amax = amax.get(f"{n}.input_amax")
        fp8 = Fp8Linear.from_linear(linear, amax[f"{n}.weight_amax"].to(device), None if x_amax is None else x_amax.to(device))
        setattr(modules[parent] if parent else out, child, fp8)
    return out


def sample_psnr(model: LoadedModel, cfg: RunConfig, samples: list[Sample], transformer: nn.Module) -> float:
    """Mean PSNR of the final latents sampled with `transformer` against the dense reference."""
    values = sample_psnrs(model, cfg, samples, lambda: transformer)
    return sum(values) / len(values)


def run(cfg: RunConfig, model: LoadedModel, reference, out_dir: Path, progress: bool = True) -> Quantized:
    """The FP8 model of cfg (build.precision fp8), calibrating and selecting or reusing."""
    b = cfg.build
    containers = model.family.block_containers
    by_group = groups(model.transformer, containers)
    key = stable_hash({"reference": reference.key, "candidates": by_group, "keep": list(b.fp8_keep),
                       "min_psnr": b.fp8_min_psnr, "scaling": b.fp8_scaling, "model": model.identity})
    folder = out_dir / "quantize" / key
    samples = calibration_samples(model, cfg, reference, out_dir / "embeddings")
    if (folder / "record.json").is_file():
        record = read_json(folder / "record.json", f"delete {folder} to calibrate again")
        amax = read_tensors(folder / "amax.safetensors", f"delete {folder} to calibrate again")
        reused = True
    else:
        names = [n for g in by_group.values() for n in g]
        amax = calibrate(model, cfg, samples, names, progress)
        record = _select(cfg, model, samples, by_group, amax, progress)
        record["key"] = key
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / ".amax.tmp"
        save_file(amax, str(tmp))
        tmp.replace(folder / "amax.safetensors")
        write_json(folder / "record.json", record)
        reused = False
    names = {n for g in record["quantized"] for n in by_group[g]}
    transformer = convert(model.transformer, amax, names)
    identity = model.identity | {"precision": "fp8", "fp8": key}
    return Quantized(dataclasses.replace(model, transformer=transformer, identity=identity), record, reused)


def _select(cfg: RunConfig, model: LoadedModel, samples: list[Sample], by_group: dict[str, list[str]],
            amax: dict, progress: bool) -> dict:
    """Which groups are quantized: build.fp8_keep's complement, or by measurement."""
    b = cfg.build
    names = list(by_group)
    if b.fp8_keep != ("auto",):  # as given; its PSNR checked on the first sample
        keep = resolve_keep(b.fp8_keep, names, model.family.block_containers)
        quantized = [g for g in names if g not in keep]
        full = sample_psnr(model, cfg, samples[:1], convert(model.transformer, amax, _members(by_group, quantized)))
        return {"groups": names, "quantized": quantized, "kept": sorted(keep), "sensitivity": None,
                "psnr": full, "psnr_samples": 1, "min_psnr": b.fp8_min_psnr, "rule": "build.fp8_keep"}
    bar = tqdm(total=len(names) + max(1, len(names).bit_length()), desc="fp8 sensitivity", unit="run",
               disable=not progress, leave=False)
    alone = {}
    for g in names:
        alone[g] = sample_psnr(model, cfg, samples, convert(model.transformer, amax, set(by_group[g])))
        bar.update()
    order = sorted(names, key=lambda g: -alone[g])  # least sensitive (highest PSNR alone) first
    trail, measured = [], {}

    def psnr_of(count: int) -> float:  # the `count` least sensitive groups quantized
        if count not in measured:
            measured[count] = sample_psnr(model, cfg, samples, convert(model.transformer, amax,
                                                                         _members(by_group, order[:count])))
            trail.append({"quantized": order[:count], "psnr": measured[count]})
            bar.update()
        return measured[count]

    lo, hi = 0, len(order)  # the largest count reaching min_psnr, by bisection (PSNR falls with the count)
    if psnr_of(hi) < b.fp8_min_psnr:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if psnr_of(mid) >= b.fp8_min_psnr else (lo, mid)
        count = lo
    else:
        count = hi
    bar.close()
    quantized = order[:count]
    if not quantized:
        log.warning("fp8: no group of Linear layers keeps the dense FP8 model at build.fp8_min_psnr %.1f dB (the least "
                    "sensitive alone: %s, %.2f dB); nothing is quantized", b.fp8_min_psnr, order[0], alone[order[0]])
    full = measured.get(count, float("inf")) if count else float("inf")
    return {"groups": names, "quantized": sorted(quantized, key=names.index), "kept": [g for g in names if g not in quantized],
            "sensitivity": alone, "trail": trail, "psnr": full, "min_psnr": b.fp8_min_psnr, "rule": "auto"}


def _members(by_group: dict[str, list[str]], chosen: list[str]) -> set[str]:
    return {n for g in chosen for n in by_group[g]}
