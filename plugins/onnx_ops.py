"""The astraea ops as ONNX nodes: the `astraea` domain's schemas, their translation from the
torch ops for `torch.onnx.export`, and reference kernels that run them in onnxruntime.

    astraea.SelectScores(lse, x, x_ref, skips) -> score        attr w_beta (float)
    astraea.SparseAttention(q, k, v[, key_mask]) -> out, lse   attr scale (float, optional)

`astraea::fp8_linear` with per-tensor scales (build.fp8_scaling: tensor) exports as standard
nodes, the pattern TensorRT fuses into an FP8 GEMM: QuantizeLinear / DequantizeLinear of
the input at its calibrated scale (float8e4m3fn, saturating), DequantizeLinear of the e4m3
weight, MatMul, the bias; onnxruntime runs it as is. Channel scales (each token scaled by
its own amax at run time) have no Q/DQ form and are refused.

`astraea::token_select` exports as SelectScores, then the standard TopK (largest k; equal
scores keep the lower row first, as the torch op breaks ties) and a second TopK that puts
the k rows in ascending order: only the scoring pass needs a plugin. Same semantics as the
torch ops (token_select.py, sparse_attention.py); TensorRT plugins of the same names and
domain implement them in an engine with the ops' Triton kernels (astraea.plugins.trt). The
schemas are registered with `onnx.defs`, so `onnx.checker` and shape inference know the
nodes. onnxruntime has no kernels for them: `ort_session` runs a model with the reference
kernels below through onnxruntime-extensions (Python custom ops, which that library serves
under its own domain: the session's copy of the model is renamed to it).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch

from .sparse_attention import reference as attention_reference
from .token_select import scores

DOMAIN, VERSION = "astraea", 1
FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def register_schemas() -> None:
    """The `astraea` domain's schemas in onnx.defs (idempotent)."""
    from onnx.defs import OpSchema

    if onnx.defs.has("SelectScores", DOMAIN):
        return
    param, attr, kind = OpSchema.FormalParameter, OpSchema.Attribute, OpSchema.AttrType
    optional = OpSchema.FormalParameterOption.Optional
    onnx.defs.register_schema(OpSchema(
        "SelectScores", DOMAIN, VERSION,
        doc="Each row's selection score lse * ||x - x_ref||_2 + w_beta * exp(skips) (ASTRAEA.md section 2).",
        inputs=[param("lse", "tensor(float)", "(B, N) attention LSE at each row's last compute"),
                param("x", "T", "(B, N, D) block input now"), param("x_ref", "T", "(B, N, D) at last compute"),
                param("skips", "tensor(int32)", "(B, N) steps skipped")],
        outputs=[param("score", "tensor(float)", "(B, N)")],
        type_constraints=[("T", FLOATS, "activations")],
        attributes=[attr("w_beta", kind.FLOAT, "staleness weight")]))
    onnx.defs.register_schema(OpSchema(
        "SparseAttention", DOMAIN, VERSION,
        doc="softmax(q k^T * scale) v for the query rows given (all key rows), and each query row's LSE.",
        inputs=[param("q", "T", "(B, H, M, Dh)"), param("k", "T", "(B, H, N, Dh)"), param("v", "T", "(B, H, N, Dh)"),
                param("key_mask", "tensor(bool)", "(B, N) keys that count", param_option=optional)],
        outputs=[param("out", "T", "(B, H, M, Dh)"), param("lse", "tensor(float)", "(B, H, M)")],
        type_constraints=[("T", FLOATS, "activations")],
        attributes=[attr("scale", kind.FLOAT, "softmax scale (default 1/sqrt(Dh))", required=False)]))


FP8_CHANNEL_REFUSED = ("astraea::fp8_linear with channel scales (each token scaled on the fly) has no ONNX Q/DQ form "
                       "for TensorRT: set build.fp8_scaling: tensor")


def translation_table() -> dict:
    """torch op -> ONNX builder, for torch.onnx.export(custom_translation_table=...)."""
    from onnx import TensorProto
    from onnx.helper import make_tensor
    from onnxscript import opset19 as op
    from onnxscript.values import Opset

    register_schemas()
    astraea = Opset(DOMAIN, VERSION)

    def token_select(lse, x, x_ref, skips, k: int, w_beta: float, forced=None):
        if forced is not None:
            raise NotImplementedError("astraea::token_select: forced rows are not exported (the rewrite never forces)")
        score = astraea.SelectScores(lse, x, x_ref, skips, w_beta=w_beta)
        kk = op.Constant(value_ints=[k])
        _, rows = op.TopK(score, kk, axis=-1, largest=1, sorted=1)
        ascending, _ = op.TopK(rows, kk, axis=-1, largest=0, sorted=1)
        return ascending

    def sparse_attention(q, k, v, key_mask=None, scale=None):
        inputs = [q, k, v] + ([key_mask] if key_mask is not None else [])
        scale = float(scale) if scale is not None else float(q.shape[-1]) ** -0.5  # always stated: TensorRT's
        return astraea.SparseAttention(*inputs, _outputs=2, scale=scale)  # plugins take every attribute

    def fp8_linear(x, weight, w_scale, x_scale=None, bias=None):
        if x_scale is None:
            raise NotImplementedError(FP8_CHANNEL_REFUSED)
        zero = op.Constant(value=make_tensor("zero", TensorProto.FLOAT8E4M3FN, [], [0]))
        x_q = op.QuantizeLinear(op.Cast(x, to=TensorProto.FLOAT), x_scale, zero, saturate=1)
        w = op.DequantizeLinear(weight, w_scale, zero)
        y = op.MatMul(op.DequantizeLinear(x_q, x_scale, zero), op.Transpose(w, perm=[1, 0]))
        if bias is not None:
            y = op.Add(y, op.Cast(bias, to=TensorProto.FLOAT))
        return op.CastLike(y, x)

    return {torch.ops.astraea.token_select.default: token_select,
            torch.ops.astraea.sparse_attention.default: sparse_attention,
            torch.ops.astraea.fp8_linear.default: fp8_linear}


def ort_inputs(names: list[str], tensors: list[torch.Tensor]) -> dict:
    """onnxruntime OrtValues of CPU tensors by input name (e4m3 weights as float8e4m3fn,
    which numpy has no type for)."""
    from onnx import TensorProto
    from onnxruntime import OrtValue

    feed = {}
    for name, t in zip(names, tensors, strict=True):
        t = t.detach().cpu().contiguous()
        if t.dtype == torch.float8_e4m3fn:
            feed[name] = OrtValue.ortvalue_from_numpy_with_onnx_type(t.view(torch.uint8).numpy(), TensorProto.FLOAT8E4M3FN)
        else:
            feed[name] = OrtValue.ortvalue_from_numpy(t.numpy())
    return feed


# ---- reference kernels (numpy in, numpy out) ---------------------------------------------

def select_scores_np(lse, x, x_ref, skips, w_beta: float) -> np.ndarray:
    s = scores(torch.from_numpy(lse), torch.from_numpy(x), torch.from_numpy(x_ref), torch.from_numpy(skips), w_beta)
    return s.float().numpy()


def sparse_attention_np(q, k, v, key_mask=None, scale=None):
    mask = None if key_mask is None else torch.from_numpy(key_mask)
    out, lse = attention_reference(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), mask,
                                   None if scale is None else float(scale))
    return out.numpy(), lse.float().numpy()


_REGISTERED: set = set()


def _register_ort_kernels(variants: set[str]) -> None:
    """Python kernels for onnxruntime-extensions, one per node variant it sees (its Python
    ops have fixed inputs and attributes: SparseAttention[Masked][Scaled])."""
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    f, i32, b = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int32, PyCustomOpDef.dt_bool
    for name in variants - _REGISTERED:
        if name == "SelectScores":
            onnx_op(op_type=name, inputs=[f, f, f, i32], outputs=[f], attrs={"w_beta": PyCustomOpDef.dt_float})(
                lambda lse, x, x_ref, skips, w_beta: select_scores_np(lse, x, x_ref, skips, w_beta))
        else:
            masked, scaled = "Masked" in name, "Scaled" in name
            onnx_op(op_type=name, inputs=[f, f, f, b] if masked else [f, f, f], outputs=[f, f],
                    attrs={"scale": PyCustomOpDef.dt_float} if scaled else {})(
                lambda *a, scale=None: sparse_attention_np(*a, scale=scale))
        _REGISTERED.add(name)


def ort_session(model: onnx.ModelProto | str):
    """An onnxruntime CPU session over `model` with the reference kernels for the astraea
    nodes (float32 models; the engines' other precisions run where TensorRT does)."""
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    model = onnx.load(model) if isinstance(model, str) else model
    model = onnx.ModelProto.FromString(model.SerializeToString())  # a copy: renamed below
    contrib, variants = "ai.onnx.contrib", set()
    for node in model.graph.node:
        if node.domain == DOMAIN:
            node.domain = contrib
            if node.op_type == "SparseAttention":
                masked = len(node.input) == 4 and bool(node.input[3])
                if not masked:
                    del node.input[3:]  # an empty optional name
                node.op_type += ("Masked" if masked else "") + ("Scaled" if any(a.name == "scale" for a in node.attribute) else "")
            variants.add(node.op_type)
    _register_ort_kernels(variants)
    for imp in model.opset_import:
        if imp.domain == DOMAIN:
            imp.domain = contrib
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
