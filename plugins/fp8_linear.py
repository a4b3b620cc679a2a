"""astraea::fp8_linear: a Linear layer in FP8 (e4m3).

    y = fp8_linear(x, weight, w_scale, x_scale, bias)
    x (..., in) in bf16/fp16/fp32, weight (out, in) float8_e4m3fn, bias (out,) or None
    -> y (..., out) in x's dtype

Scales are what multiplies an FP8 value back (amax / 448), float32, in one of two schemes:
  tensor   w_scale () and x_scale (): one scale a tensor, the input's calibrated on the
           dense sampling (a static scale, never the batch's own amax)
  channel  w_scale (out,): a scale an output channel; x_scale None: each row of x scaled
           by its own amax (per token, computed on the fly)
Both keep the op row-local (a row's output depends on that row alone), so the token-wise
rewrite keeps it on the selected rows only (classify_rows: a `keep` rule). The scales come
from nvidia-modelopt's calibration (astraea.quantize).

The definition (every device without FP8 tensor cores, the CPU, and the tests): the
quantize-dequantize of modelopt's simulated FP8 (its `fp8_eager`) in float32, then the
matmul in float32: (q(x) * x_scale) @ (weight * w_scale)^T + bias. On CUDA cards with FP8
tensor cores (compute capability 8.9 and up: Ada, Hopper) `torch._scaled_mm` runs it: FP8
inputs, float32 accumulation, the scales (tensor-wise, or row-wise for `channel`) and the
bias applied in its epilogue.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
FP8 = torch.float8_e4m3fn


def quantize(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """t / scale, clamped to e4m3's range, rounded to e4m3 (modelopt's fp8_eager)."""
    return (t.to(torch.float32) / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)


def row_scale(x: torch.Tensor) -> torch.Tensor:
    """Each row's own scale (per token): its amax / 448, (..., 1) float32."""
    return (x.detach().abs().amax(dim=-1, keepdim=True).to(torch.float32) / E4M3_MAX).clamp_min(1e-12)


def reference(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, x_scale: torch.Tensor | None,
              bias: torch.Tensor | None) -> torch.Tensor:
    x_scale = row_scale(x) if x_scale is None else x_scale
    xq = quantize(x, x_scale).to(torch.float32) * x_scale
    w = weight.to(torch.float32) * (w_scale[:, None] if w_scale.dim() else w_scale)
    y = xq @ w.t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def fp8_tensor_cores(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _scaled_mm(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, x_scale: torch.Tensor | None,
               bias: torch.Tensor | None) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if x_scale is None:  # row-wise: each token's own scale, each output channel's weight scale
        x_scale, w_scale = row_scale(x2), w_scale.reshape(1, -1)
    out = torch._scaled_mm(quantize(x2, x_scale), weight.t(), scale_a=x_scale, scale_b=w_scale,
                           bias=None if bias is None else bias.to(x.dtype), out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("astraea::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, x_scale: torch.Tensor | None,
               bias: torch.Tensor | None) -> torch.Tensor:
    if weight.dtype != FP8 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_linear: x {tuple(x.shape)}, weight {tuple(weight.shape)} {weight.dtype} do not agree")
    if (x_scale is None) != (w_scale.dim() == 1):
        raise ValueError("fp8_linear: per-tensor scales for both, or a weight scale a channel and rows scaled on the fly")
    # _scaled_mm wants 16-aligned inner and output sizes and a 16-bit output (row-wise: bf16)
    if fp8_tensor_cores(x.device) and weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0 and (
            x.dtype == torch.bfloat16 or (x.dtype == torch.float16 and x_scale is not None)):
        return _scaled_mm(x, weight, w_scale, x_scale, bias)
    return reference(x, weight, w_scale, x_scale, bias)


@fp8_linear.register_fake
def _(x, weight, w_scale, x_scale, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class Fp8Linear(torch.nn.Module):
    """An nn.Linear whose weight is stored in e4m3 and whose input is quantized on the way in:
    the module astraea.quantize swaps in. `tensor` scheme: per-tensor scales (x_scale a
    calibrated buffer); `channel`: a weight scale an output channel, rows scaled on the fly."""

    def __init__(self, weight: torch.Tensor, w_scale: torch.Tensor, x_scale: torch.Tensor | None,
                 bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)
        self.register_buffer("w_scale", w_scale.to(torch.float32))
        self.register_buffer("x_scale", None if x_scale is None else x_scale.reshape(()).to(torch.float32))
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, w_amax: torch.Tensor, x_amax: torch.Tensor | None) -> Fp8Linear:
        """w_amax: () per tensor, or (out,) a channel (then x_amax None: rows scaled on the fly)."""
        w_scale = (w_amax.detach().to(torch.float32).reshape(-1 if w_amax.numel() > 1 else ()) / E4M3_MAX).clamp_min(1e-12)
        x_scale = None if x_amax is None else (x_amax.detach().to(torch.float32) / E4M3_MAX).clamp_min(1e-12)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        w = linear.weight.detach()
        return cls(quantize(w, w_scale[:, None] if w_scale.dim() else w_scale), w_scale, x_scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.astraea.fp8_linear(x, self.weight, self.w_scale, self.x_scale, self.bias)

    def extra_repr(self) -> str:
        scheme = "tensor" if self.x_scale is not None else "channel"
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 ({scheme} scales)"


def _math(x, weight, w_scale, x_scale, bias):
    """The op as ATen operations, for Inductor and AOTInductor to compile (and fuse the
    input's quantization into the ops before it): the same branch the op takes at run time."""
    if fp8_tensor_cores(x.device) and weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0 and (
            x.dtype == torch.bfloat16 or (x.dtype == torch.float16 and x_scale is not None)):
        return _scaled_mm(x, weight, w_scale, x_scale, bias)
    return reference(x, weight, w_scale, x_scale, bias)

