"""Prompt conditioning: the checkpoint's own text encoder (cached on disk) or pseudo-embeddings.

Without a text encoder (presets, transformer-only checkpoints) every prompt maps to a
deterministic pseudo-embedding (families/base.py): same prompt, same tensor; different
prompts differ. With a full checkpoint the family's diffusers pipeline encodes the prompt
and the result is cached under the run folder, keyed by encoder weights, prompt and length.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save

from .families import Conditioning, LoadedModel
from .io import atomic_file, read_tensors, stable_hash


def encode_prompt(model: LoadedModel, prompt: str, cache_dir: Path | None) -> Conditioning:
    """One prompt -> Conditioning with batch 1, on the model's device and dtype."""
    if model.encoder is None:
        cond = model.family.pseudo_condition(prompt, dict(model.transformer.config), model.text_length)
        return cond.to(model.device, model.dtype)
    encoder_id = model.identity.get("text_encoder", model.identity["weights"])
    key = stable_hash([model.family.name, encoder_id, prompt, model.text_length, str(model.dtype)])
    path = cache_dir / f"{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        return Conditioning(**read_tensors(path, "delete it to encode the prompt again")).to(model.device, model.dtype)
    with torch.no_grad():
        cond = model.encoder([prompt])
    if path is not None:
        with atomic_file(path, "wb") as fh:
            fh.write(save({k: v.detach().cpu().contiguous() for k, v in cond.tensors().items()}))
    return cond.to(model.device, model.dtype)
