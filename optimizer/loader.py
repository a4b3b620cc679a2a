"""ModelSpec -> LoadedModel: random weights at a preset's size, or a local diffusers checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import diffusers
import torch

from .errors import AstraeaError, ConfigError
from .families import Conditioning, LoadedModel, get_family
from .families.base import TORCH_DTYPES, config_hash, fingerprint_weights
from .families.weights import SCHEME
from .schema import RunConfig

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("model.device", f"{name} was asked for but no CUDA device is visible; use cpu or auto")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError("model.device", f"{name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device(name)


def _scheduler(cfg: RunConfig, family, config: dict, checkpoint: Path | None, default_shift: float | None = None):
    s = cfg.sampling
    if s.scheduler == "default" and checkpoint is not None and (checkpoint / "scheduler").is_dir():
        sched_cfg = json.loads((checkpoint / "scheduler" / "scheduler_config.json").read_text())
        cls = getattr(diffusers, sched_cfg["_class_name"])  # the class the checkpoint names
        scheduler = cls.from_pretrained(checkpoint, subfolder="scheduler")
        if s.shift is not None:
            key = "shift" if "shift" in scheduler.config else "flow_shift"
            scheduler = cls.from_config(scheduler.config, **{key: s.shift})
        return scheduler
    return family.make_scheduler(s.scheduler, default_shift if s.shift is None else s.shift, config, cfg.video)


def load_model(cfg: RunConfig) -> LoadedModel:
    """Load (or build) the transformer of `cfg.model` on its device and dtype, with its scheduler."""
    family = get_family(cfg.model.family)
    device = resolve_device(cfg.model.device)
    dtype = TORCH_DTYPES[cfg.model.dtype]
    if cfg.model.preset is not None:
        preset = family.preset(cfg.model.preset)
        scheduler = _scheduler(cfg, family, preset.config, None, preset.shift)
        text_length = cfg.sampling.text_length or preset.text_length
        identity = {"family": family.name, "source": f"preset:{preset.name}", "config_hash": config_hash(preset.config)}
        if preset.weights is not None:
            from . import bundled

            shell = family.build_random(preset, torch.device("cpu"), dtype, 0)  # the shipped weights go in next
            transformer, text_encoder, digest = bundled.load_model(shell, device, dtype, Path(preset.weights))
            # a family whose transformer takes a caption mask (Open-Sora) gets the padding mask, its first row kept
            masked = family.pseudo_condition("a", preset.config, text_length).mask is not None

            def encode(prompts):
                embeds = text_encoder(prompts)
                if not masked:
                    return Conditioning(embeds)
                mask = text_encoder.tokenize(prompts).to(embeds.device) != 0
                mask[:, 0] = True
                return Conditioning(embeds, mask)

            return LoadedModel(family, transformer, scheduler, identity | {"weights": digest}, text_length,
                               preset.geometry, encoder=encode, decoder=bundled.codec.decode)
        transformer = family.build_random(preset, device, dtype, cfg.model.weights_seed)
        identity["weights"] = f"random:{SCHEME}:{cfg.model.weights_seed}"
        return LoadedModel(family, transformer, scheduler, identity, text_length, preset.geometry)

    ckpt = Path(cfg.model.checkpoint)
    try:
        transformer = family.model_class.from_pretrained(ckpt, subfolder="transformer", dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise AstraeaError(f"model.checkpoint: cannot load {ckpt / 'transformer'}: {str(e).splitlines()[0]}") from e
    transformer = transformer.to(device).eval().requires_grad_(False)
    config = dict(transformer.config)
    scheduler = _scheduler(cfg, family, config, ckpt)
    text_length = cfg.sampling.text_length or family.default_text_length(config)
    identity = {
        "family": family.name, "source": f"checkpoint:{ckpt}", "weights": fingerprint_weights(ckpt / "transformer"),
        "config_hash": config_hash(config),
    }
    model = LoadedModel(family, transformer, scheduler, identity, text_length, family.geometry(cfg))
    if (ckpt / "model_index.json").is_file() and (ckpt / "text_encoder").is_dir():
        pipe_cls = getattr(diffusers, family.pipeline_class)
        try:
            pipe = pipe_cls.from_pretrained(ckpt, transformer=transformer, scheduler=scheduler, dtype=dtype)
        except (OSError, ValueError, RuntimeError, TypeError) as e:
            raise AstraeaError(f"model.checkpoint: cannot load the {family.pipeline_class} in {ckpt}: {str(e).splitlines()[0]}") from e
        pipe.to(device)
        model.pipeline = pipe
        model.identity["text_encoder"] = fingerprint_weights(ckpt / "text_encoder")
        model.encoder = lambda prompts: family.encode(pipe, prompts, text_length, device)
        vae = getattr(pipe, "vae", None)
        if vae is not None:
            model.decoder = lambda latents: family.vae_decode(vae, latents.to(vae.dtype))
    else:
        log.info("%s has no text encoder: prompts get deterministic pseudo-embeddings", ckpt)
    return model
