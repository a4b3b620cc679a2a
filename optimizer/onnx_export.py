"""The rewritten program of one budget as ONNX: the TensorRT backend's input.

Same function as every engine (engines.py): (weights..., tensor inputs..., block state...)
-> (output, new block state...), functional (TensorRT double-buffers the state), with the
astraea ops as `astraea`-domain nodes (astraea.plugins.onnx_ops). The weights are graph
inputs, so an ONNX file holds no weights: the engines share the one weights file, and a
TensorRT engine built from it is weight-free by construction.

`check` runs the file in onnxruntime on the CPU, with the reference kernels for the astraea
nodes, against the rewritten graph from a state left by a dense step, and returns the
largest relative error over the output and the new state.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from astraea.plugins import onnx_ops

from . import runtime
from .io import atomic_file
from .tokenwise import Signature, TensorStep, TokenwiseProgram

OPSET = 19  # QuantizeLinear / DequantizeLinear in float8e4m3fn (FP8 engines)


def input_names(sig: Signature) -> list[str]:
    state = [f"state_{i}" for i in range(len(sig.state))]
    return [f"weight:{n}" for n in sig.weights] + [s.name for s in sig.inputs] + state


def output_names(sig: Signature) -> list[str]:
    return ["output"] + [f"new_state_{i}" for i in range(len(sig.state))]


def export(tp: TokenwiseProgram, sig: Signature, weights: list[torch.Tensor], inputs: list[torch.Tensor], path: Path,
           device: torch.device) -> onnx.ModelProto:
    """Write tp as an ONNX model to path (atomically) and return it."""
    step = TensorStep(tp.graph, sig.layout, in_place=False)
    state = runtime.empty_state(sig.state, device)
    program = torch.onnx.export(step, tuple(w.detach() for w in weights) + tuple(inputs) + tuple(state),
                                dynamo=True, custom_translation_table=onnx_ops.translation_table(), opset_version=OPSET,
                                input_names=input_names(sig), output_names=output_names(sig), verbose=False)
    model = program.model_proto
    onnx.checker.check_model(model, full_check=True)
    with atomic_file(path, "wb") as fh:
        fh.write(model.SerializeToString())
    return model


def check(model: onnx.ModelProto, tp: TokenwiseProgram, dense: TokenwiseProgram, sig: Signature, weights: list[torch.Tensor],
          inputs: list[torch.Tensor]) -> float:
    """Largest relative L2 error of onnxruntime's outputs against the rewritten graph's, one
    step at tp's budget after a dense step (float32 on the CPU). The second step's latents
    differ from the first's, as in sampling: with equal inputs every score ties, and
    onnxruntime's TopK (like TensorRT's) orders equal scores its own way, where the torch op
    takes the lowest rows; either choice is the method's, but only one matches bit for bit."""
    cpu = [t.detach().float().cpu() if t.is_floating_point() and t.dtype != torch.float8_e4m3fn else t.cpu()
           for t in [*weights, *inputs]]
    w, x = cpu[: len(weights)], cpu[len(weights):]
    gen = torch.Generator().manual_seed(0)
    x2 = [t + 0.3 * torch.randn(t.shape, generator=gen) if s.name == "hidden_states" else t
          for t, s in zip(x, sig.inputs)]
    step, first = TensorStep(tp.graph, sig.layout, in_place=False), TensorStep(dense.graph, sig.layout, in_place=False)
    with torch.no_grad():
        state = list(first(*w, *x, *runtime.empty_state(sig.state, torch.device("cpu")))[1:])
        want = step(*w, *x2, *state)
    session = onnx_ops.ort_session(model)
    feed = onnx_ops.ort_inputs(input_names(sig), [*w, *x2, *state])
    got = [v.numpy() for v in session.run_with_ort_values(None, feed)]
    worst = 0.0
    for g, t in zip(got, want):
        t = t.numpy()
        if t.dtype.kind in "iu":
            worst = max(worst, float(np.any(g != t)))
        else:
            worst = max(worst, float(np.linalg.norm(g - t) / max(np.linalg.norm(t), 1e-12)))
    return worst
