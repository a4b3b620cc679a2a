"""The TensorRT backend's input, checked here without TensorRT: the astraea ops as ONNX
nodes (registered schemas, onnx.checker), run in onnxruntime with the reference kernels
against the torch ops and against the rewritten graph of a whole step (FP8 steps too, as
Q/DQ nodes)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from astraea import onnx_export
from astraea.plugins import onnx_ops
from astraea.sampling import first_step_kwargs
from astraea.tokenwise import signature, weight_tensors
from conftest import engine_case

pytest.importorskip("onnxruntime_extensions")
ops = torch.ops.astraea


class _Ops(torch.nn.Module):
    def __init__(self, k, masked):
        super().__init__()
        self.k, self.masked = k, masked

    def forward(self, lse, x, x_ref, skips, q, key, value, mask):
        idx = ops.token_select(lse, x, x_ref, skips, self.k, 0.5, None)
        out, row_lse = ops.sparse_attention(q, key, value, mask if self.masked else None, None)
        return idx, out, row_lse


@pytest.mark.parametrize("masked", [False, True])
def test_ops_as_onnx_nodes_run_like_the_torch_ops(masked):
    gen = torch.Generator().manual_seed(0)
    b, n, d, k = 2, 11, 6, 4
    x = torch.randn(b, n, d, generator=gen)
    x_ref = x.clone()
    x_ref[0, 7:] += 1.0  # row 0: the last rows changed; row 1: nothing changed, every score ties
    args = (torch.rand(b, n, generator=gen), x, x_ref, torch.zeros(b, n, dtype=torch.int32),
            torch.randn(b, 2, 3, 8, generator=gen), torch.randn(b, 2, n, 8, generator=gen),
            torch.randn(b, 2, n, 8, generator=gen), torch.rand(b, n, generator=gen) > 0.3)
    module = _Ops(k, masked)
    model = torch.onnx.export(module, args, dynamo=True, custom_translation_table=onnx_ops.translation_table(),
                              opset_version=onnx_export.OPSET).model_proto
    onnx.checker.check_model(model, full_check=True)
    nodes = Counter((n.domain, n.op_type) for n in model.graph.node)
    assert nodes[("astraea", "SelectScores")] == 1 and nodes[("astraea", "SparseAttention")] == 1
    session = onnx_ops.ort_session(model)
    got = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})
    want = module(*args)
    assert np.array_equal(got[0][0], want[0][0].numpy())  # distinct scores: the same rows
    assert want[0][1].tolist() == list(range(k)) and len(set(got[0][1].tolist())) == k  # all tie: any k rows
    np.testing.assert_allclose(got[1], want[1].numpy(), atol=1e-5)
    np.testing.assert_allclose(got[2], want[2].numpy(), atol=1e-5)


def _exported_step(tmp_path):
    """A tiny Wan run's budget-3 step as ONNX: (programs, tp, sig, weights, inputs, onnx model)."""
    cfg, model, programs, _, _, _ = engine_case("cpu")
    kwargs = first_step_kwargs(model, cfg.video, cfg.sampling)
    tp = programs[3]
    sig = signature(tp, kwargs)
    table = weight_tensors(tp, sig.weights)
    weights, inputs = [table[w] for w in sig.weights], [kwargs[s.name] for s in sig.inputs]
    onnx_model = onnx_export.export(tp, sig, weights, inputs, tmp_path / "k3.onnx", model.device)
    return programs, tp, sig, weights, inputs, onnx_model


def test_a_rewritten_step_exports_and_runs_in_onnxruntime(tmp_path):
    programs, tp, sig, weights, inputs, onnx_model = _exported_step(tmp_path)
    assert (tmp_path / "k3.onnx").stat().st_size < 2**20  # the weights are inputs, not initialisers
    nodes = Counter((n.domain, n.op_type) for n in onnx_model.graph.node)
    assert nodes[("astraea", "SelectScores")] == tp.blocks == nodes[("astraea", "SparseAttention")]
    assert [i.name for i in onnx_model.graph.input] == onnx_export.input_names(sig)
    assert onnx_export.check(onnx_model, tp, programs[max(programs)], sig, weights, inputs) < 1e-4


def test_an_fp8_step_exports_as_qdq_nodes_and_runs_in_onnxruntime(tmp_path):
    """build.fp8_scaling tensor: each astraea::fp8_linear of the rewritten step becomes
    QuantizeLinear / DequantizeLinear (float8e4m3fn) around a MatMul, with the e4m3 weights
    as float8 graph inputs; onnxruntime runs the step like the FP8 graph (its definition).
    Channel scales have no Q/DQ form: the export names the setting to use."""
    import dataclasses

    from astraea import quantize
    from astraea.tokenwise import build_programs

    cfg, model, _, _, _, _ = engine_case("cpu")
    n = model.layout(cfg.video).video_tokens
    kwargs = first_step_kwargs(model, cfg.video, cfg.sampling)
    names = quantize.candidates(model.transformer)

    def fp8_step(scheme):
        amax = {}
        for name, m in names.items():
            w = m.weight.detach().float().abs()
            amax[f"{name}.weight_amax"] = w.amax() if scheme == "tensor" else w.amax(dim=1)
            if scheme == "tensor":
                amax[f"{name}.input_amax"] = torch.tensor(3.0)  # static: any calibrated value
        fp8 = dataclasses.replace(model, transformer=quantize.convert(model.transformer, amax, set(names)))
        programs = build_programs(fp8, cfg, [n, 3], progress=False)
        sig = signature(programs[3], kwargs)
        table = weight_tensors(programs[3], sig.weights)
        return programs, sig, [table[w] for w in sig.weights], [kwargs[s.name] for s in sig.inputs]

    programs, sig, weights, inputs = fp8_step("tensor")
    tp = programs[3]
    onnx_model = onnx_export.export(tp, sig, weights, inputs, tmp_path / "fp8.onnx", model.device)
    layers = sum(node.target is ops.fp8_linear.default for node in tp.graph.graph.nodes)
    nodes = Counter(n.op_type for n in onnx_model.graph.node)
    assert layers > 0 and nodes["QuantizeLinear"] == layers and nodes["DequantizeLinear"] == 2 * layers
    fp8_inputs = [i.name for i in onnx_model.graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT8E4M3FN]
    assert len(fp8_inputs) == len(names) and all(name.startswith("weight:") for name in fp8_inputs)
    assert onnx_export.check(onnx_model, tp, programs[n], sig, weights, inputs) < 1e-4
    programs, sig, weights, inputs = fp8_step("channel")
    with pytest.raises(Exception, match="set build.fp8_scaling: tensor"):
        onnx_export.export(programs[3], sig, weights, inputs, tmp_path / "channel.onnx", model.device)
    assert not (tmp_path / "channel.onnx").exists()


@pytest.mark.trt
def test_a_tensorrt_plan_runs_like_onnxruntime(tmp_path):
    """Needs TensorRT and a GPU: the plan of a rewritten step (AOT Triton plugins), run by
    the runtime's TensorRT engine, against onnxruntime's run of the same ONNX file."""
    from astraea import runtime, trt_build

    _, _, sig, weights, inputs, _ = _exported_step(tmp_path)
    trt_build.build_plan(tmp_path / "k3.onnx", tmp_path / "k3.plan", tmp_path / "timing.cache")
    cuda = torch.device("cuda", torch.cuda.current_device())
    names = {"inputs": onnx_export.input_names(sig), "outputs": onnx_export.output_names(sig)}
    engine = runtime._TensorRTEngine(tmp_path / "k3.plan", cuda, names)
    feed = [t.detach().to(cuda).contiguous() for t in [*weights, *inputs]] + runtime.empty_state(sig.state, cuda)
    session = onnx_ops.ort_session(str(tmp_path / "k3.onnx"))
    want = session.run(None, {n: t.cpu().numpy() for n, t in zip(names["inputs"], feed)})
    got = engine(*feed)
    torch.cuda.synchronize()
    for o, w in zip(got, want):
        np.testing.assert_allclose(o.cpu().numpy(), w, atol=1e-4, rtol=1e-4)
