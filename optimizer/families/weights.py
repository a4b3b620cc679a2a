"""Random weights at a real model's size, identical on every device, created in place.

The module is built with its parameters on the meta device (accelerate's
`init_empty_weights`, buffers such as rotary tables still computed for real), then each
parameter is allocated once, in its final dtype, on the target device and filled from a
counter-based hash of (seed, parameter name, element index). A device RNG would give other
weights on the GPU than on the CPU; this gives the same model everywhere, at elementwise
speed (seconds for 14B parameters on a GPU) and with peak memory = the model's size.

Distribution: PyTorch's defaults. Linear/conv weights and biases U(-1/sqrt(fan_in),
1/sqrt(fan_in)); norm scales 1 and shifts 0; free parameters (modulation tables)
U(-1/sqrt(d), 1/sqrt(d)) over their last dim d.
"""

from __future__ import annotations

import hashlib
import math

import torch
from accelerate import init_empty_weights
from torch import nn

SCHEME = "murmur3-weyl-u32/v1"  # part of a preset's identity: change it when the values change
_CHUNK = 1 << 24


def _s32(c: int) -> int:
    return c - (1 << 32) if c >= (1 << 31) else c


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int32 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (32 - bits)) - 1)


def hashed_uniform(numel: int, key: int, device: torch.device) -> torch.Tensor:
    """`numel` float32 values in [-1, 1), a pure function of (key, index): murmur3's 32-bit
    finaliser over a Weyl sequence, in int32 arithmetic that wraps alike on CPU and GPU."""
    if numel >= 1 << 31:
        raise ValueError(f"a parameter of {numel} elements is beyond the int32 counter")
    out = torch.empty(numel, dtype=torch.float32, device=device)
    offset = _s32(key & 0xFFFFFFFF)
    for start in range(0, numel, _CHUNK):
        x = torch.arange(start, min(start + _CHUNK, numel), dtype=torch.int32, device=device)
        x = x * _s32(0x9E3779B9) + offset
        x = (x ^ _shr(x, 16)) * _s32(0x85EBCA6B)
        x = (x ^ _shr(x, 13)) * _s32(0xC2B2AE35)
        x = x ^ _shr(x, 16)
        out[start : start + x.numel()] = _shr(x, 8).float() * (2.0 / (1 << 24)) - 1.0
    return out


def _key(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def _fill(module: nn.Module, pname: str, shape: torch.Size, full_name: str, seed: int, device) -> torch.Tensor | float:
    """The value of one parameter: a tensor (float32) or a constant."""
    if "Norm" in type(module).__name__ and len(shape) == 1:
        return 1.0 if pname == "weight" else 0.0
    weight = getattr(module, "weight", None)
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and weight is not None:
        fan_in = math.prod(weight.shape[1:])
    else:
        fan_in = shape[-1] if len(shape) else 1
    values = hashed_uniform(math.prod(shape), _key(seed, full_name), device)
    # a float32 tensor factor: CUDA turns division by a Python scalar into a multiplication by
    # its reciprocal, the CPU divides; one float32 product rounds alike on both.
    scale = torch.tensor(1.0 / math.sqrt(max(fan_in, 1)), dtype=torch.float32, device=device)
    return (values * scale).view(shape)


def build_random(model_class, config: dict, device: torch.device, dtype: torch.dtype, seed: int,
                 keep_fp32: tuple[str, ...] = ()) -> nn.Module:
    """Instantiate `model_class(config)` on `device` with hashed random weights in `dtype`
    (parameters under a `keep_fp32` module name stay float32, as from_pretrained keeps them)."""
    with torch.device(device), init_empty_weights(include_buffers=False):
        model = model_class.from_config(config)
    for mname, module in model.named_modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            full = f"{mname}.{pname}" if mname else pname
            target = torch.float32 if any(k in full.split(".") for k in keep_fp32) else dtype
            data = torch.empty(param.shape, dtype=target, device=device)
            if device.type != "meta":
                value = _fill(module, pname, param.shape, full, seed, device)
                if isinstance(value, torch.Tensor):
                    data.copy_(value)
                else:
                    data.fill_(value)
            module._parameters[pname] = nn.Parameter(data, requires_grad=False)
    return model.eval()
