"""TensorRT engines from the ONNX files of onnx_export.py: one serialized plan per budget,
static shapes, the ONNX file's precision (a strongly typed network), a timing cache shared
by all engines of a folder, and the astraea plugins with their AOT Triton kernels
(astraea.plugins.trt). The weights are network inputs, so a plan holds none: every engine
of a folder runs on the one weights file (weight-free plans rather than refitting).

NOT RUN: TensorRT cannot be installed in this environment (README). The tests that need it
are marked `trt` and skipped here.
"""

from __future__ import annotations

from pathlib import Path

from .io import atomic_file
from .runtime import EngineError


def build_plan(onnx_path: Path, plan_path: Path, timing_cache: Path, workspace_gib: float | None = None) -> None:
    import tensorrt as trt  # engines.build refuses the backend before any work where it is missing

    from astraea.plugins import trt as plugins

    plugins.register()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT did not build an engine from {onnx_path} (see its log above)")
    with atomic_file(plan_path, "wb") as fh:
        fh.write(bytes(plan))
    with atomic_file(timing_cache, "wb") as fh:
        fh.write(bytes(config.get_timing_cache().serialize()))
