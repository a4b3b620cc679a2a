"""TensorRT plugins for the ONNX `astraea` nodes (astraea.plugins.onnx_ops), as
`tensorrt.plugin` quick-deployable plugins with ahead-of-time Triton implementations: the
kernels (plugins/kernels/trt_order.py) are compiled to PTX when the engine is built and
embedded in it, so no Python runs inside the engine.

    astraea::SelectScores     lse (B, N) f32, x, x_ref (B, N, D), skips (B, N) i32 -> score (B, N) f32
    astraea::SparseAttention  q (B, H, M, Dh), k, v (B, H, N, Dh) -> out (B, H, M, Dh), lse (B, H, M) f32

NOT RUN: TensorRT cannot be installed in this environment (README). What runs here: the
kernels in this argument order, in the Triton interpreter (tests/plugins/test_trt_order.py);
the ONNX nodes in onnxruntime with reference kernels (tests/test_onnx.py). Importing this
module needs `tensorrt` (>= 10.8) and `triton`; `register()` is idempotent and the builder
(astraea.trt_build) calls it before parsing the ONNX file. Written against the
tensorrt.plugin API (register / aot_impl, KernelLaunchParams, SymIntExprs).
"""

from __future__ import annotations

import numpy as np

_DONE = False
BLOCK_R, BLOCK_D = 32, 128  # the score kernel's tile, as the torch op launches it
BLOCK_M, BLOCK_N, WARPS = 64, 64, 4  # an attention config from kernels/attention.py's autotune list


def _triton_type(dtype) -> str:
    import tensorrt as trt

    return {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16", trt.int32: "i32", trt.bool: "i1"}[dtype]


def _compile(fn, signature: dict, constexprs: dict, num_warps: int):
    import triton

    full = {**signature, **{k: "constexpr" for k in constexprs}}
    try:  # Triton >= 3.3 names them constexprs; earlier releases, constants
        src = triton.compiler.ASTSource(fn=fn, signature=full, constexprs=constexprs)
    except TypeError:
        src = triton.compiler.ASTSource(fn=fn, signature=full, constants=constexprs)
    return triton.compile(src, options={"num_warps": num_warps})


def register() -> None:
    global _DONE
    if _DONE:
        return
    import tensorrt.plugin as trtp

    from .kernels import trt_order

    @trtp.register("astraea::SelectScores")
    def _select_desc(lse: trtp.TensorDesc, x: trtp.TensorDesc, x_ref: trtp.TensorDesc, skips: trtp.TensorDesc,
                     w_beta: float) -> tuple[trtp.TensorDesc]:
        return (lse.like(),)

    @trtp.aot_impl("astraea::SelectScores")
    def _select_aot(lse: trtp.TensorDesc, x: trtp.TensorDesc, x_ref: trtp.TensorDesc, skips: trtp.TensorDesc,
                    w_beta: float, outputs: tuple[trtp.TensorDesc], tactic: int):
        t = _triton_type(x.dtype)
        kernel = _compile(trt_order.trt_select_scores,
                          {"LSE": "*fp32", "X": f"*{t}", "XR": f"*{t}", "SKIPS": "*i32", "R": "i32", "N": "i32", "D": "i32",
                           "OUT": "*fp32"},
                          {"W_BETA": float(w_beta), "BLOCK_R": BLOCK_R, "BLOCK_D": BLOCK_D}, num_warps=4)
        b, n, d = x.shape_expr[0], x.shape_expr[1], x.shape_expr[2]
        rows = b * n
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(rows, BLOCK_R)
        launch.block_x = kernel.metadata.num_warps * 32
        launch.shared_mem = kernel.metadata.shared
        extra = trtp.SymIntExprs(3)
        extra[0], extra[1], extra[2] = trtp.SymInt32(rows), trtp.SymInt32(n), trtp.SymInt32(d)
        return kernel.metadata.name, kernel.asm["ptx"], launch, extra

    @trtp.register("astraea::SparseAttention")
    def _attention_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                        scale: float) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        lse = q.like()
        lse.dtype = np.float32
        lse.shape_expr = [q.shape_expr[0], q.shape_expr[1], q.shape_expr[2]]
        return q.like(), lse

    @trtp.aot_impl("astraea::SparseAttention")
    def _attention_aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, scale: float,
                       outputs: tuple[trtp.TensorDesc], tactic: int):
        t = _triton_type(q.dtype)
        b, h, m = q.shape_expr[0], q.shape_expr[1], q.shape_expr[2]
        head_dim = int(q.shape_expr[3])  # static shapes per engine
        n = k.shape_expr[2]
        kernel = _compile(trt_order.trt_sparse_attention,
                          {"Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "H": "i32", "M": "i32", "N": "i32",
                           "OUT": f"*{t}", "LSE": "*fp32"},
                          {"SCALE": float(scale) if scale else head_dim ** -0.5, "HEAD_DIM": head_dim,
                           "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N}, num_warps=WARPS)
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(m, BLOCK_M)
        launch.grid_y = b * h
        launch.block_x = kernel.metadata.num_warps * 32
        launch.shared_mem = kernel.metadata.shared
        extra = trtp.SymIntExprs(3)
        extra[0], extra[1], extra[2] = trtp.SymInt32(h), trtp.SymInt32(m), trtp.SymInt32(n)
        return kernel.metadata.name, kernel.asm["ptx"], launch, extra

    _DONE = True
