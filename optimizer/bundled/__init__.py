"""The bundled reference model: a small Wan-architecture text-to-video DiT (4M parameters) trained here.

Trained from scratch with flow matching on the procedural data set of `data.py`
(`tools/train_reference.py`, on the GPU); it ships as `astraea-tiny-t2v.safetensors`
(fp16: the transformer under `transformer.`, the text encoder under `text_encoder.`) and
loads through the ordinary `wan` adapter as the preset `bundled`. Video 17 x 64 x 64
through the pixel-patchify codec (`codec.py`): latents 24 x 9 x 32 x 32, 2,304 tokens.
Model card: docs/reference-model.md.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load

from . import codec, data
from .text import TextEncoder

WEIGHTS = Path(__file__).with_name("astraea-tiny-t2v.safetensors")
TEXT_DIM = 64
TEXT_LENGTH = 16
VIDEO = (17, 64, 64)  # frames, height, width
CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=64, in_channels=codec.CHANNELS,
    out_channels=codec.CHANNELS, text_dim=TEXT_DIM, freq_dim=256, ffn_dim=768, num_layers=6,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
    added_kv_proj_dim=None, rope_max_seq_len=1024,
)
SHIFT = 2.0  # flow shift the model is sampled with
# The second bundled model, Open-Sora's architecture (STDiT3: spatial and temporal blocks) at the
# same size, trained on the same data by the same script (`--family opensora`); not shipped yet
STDIT3_CONFIG = dict(depth=3, hidden_size=192, num_heads=3, in_channels=codec.CHANNELS, patch_size=(1, 2, 2),
                     caption_channels=TEXT_DIM, model_max_length=TEXT_LENGTH, pred_sigma=False)
STDIT3_WEIGHTS = Path(__file__).with_name("astraea-tiny-stdit3.safetensors")
TRANSFORM_SCALE_KEY = "transform_scale"  # a trained STDiT3 file's metadata: the scale it was trained at


def transform_scale(path: Path) -> float:
    """The Open-Sora transform scale a trained STDiT3 file was trained at, and so is sampled
    at (its safetensors metadata; 1, Open-Sora's own, for a file that records none). An
    unreadable file gives 1 too: loading its weights then says what is wrong, in one line."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            return float((fh.metadata() or {}).get(TRANSFORM_SCALE_KEY, 1.0))
    except Exception:  # safetensors raises its own error type for a corrupt header
        return 1.0


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    transformer = {k[len("transformer."):]: v for k, v in state.items() if k.startswith("transformer.")}
    text = {k[len("text_encoder."):]: v for k, v in state.items() if k.startswith("text_encoder.")}
    return transformer, text


def load_model(transformer: torch.nn.Module, device: torch.device, dtype: torch.dtype, path: Path | None = None):
    """The shipped weights into `transformer` (a WanTransformer3DModel of CONFIG, built on the
    CPU so buffers such as rotary tables are real) -> (transformer on device, text encoder,
    sha256 of the weights file); errors name the file to fix."""
    from ..errors import AstraeaError

    path = path or WEIGHTS
    if not path.is_file():
        raise AstraeaError(f"model.preset: the bundled weights {path} are missing; reinstall astraea")
    blob = path.read_bytes()
    try:
        state = load(blob)
    except Exception as e:  # safetensors raises its own error type for a corrupt header
        raise AstraeaError(f"model.preset: {path} is not a valid safetensors file ({e}); reinstall astraea") from None
    tstate, xstate = split_state(state)
    # load_state_dict copies into each parameter's own dtype, keeping the fp32 modules fp32
    text = TextEncoder(TEXT_DIM, TEXT_LENGTH)
    try:
        transformer.load_state_dict(tstate, strict=True)
        text.load_state_dict(xstate, strict=True)
    except RuntimeError as e:
        raise AstraeaError(f"model.preset: {path} does not match the bundled config: {str(e).splitlines()[0]}") from None
    text = text.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return transformer.to(device), text, hashlib.sha256(blob).hexdigest()[:16]


__all__ = ["CONFIG", "TEXT_LENGTH", "VIDEO", "WEIGHTS", "codec", "data", "load_model"]
