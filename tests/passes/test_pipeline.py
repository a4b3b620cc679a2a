"""The pass pipeline's mechanics and annotate_blocks on each family's tiny model."""

from __future__ import annotations

import pytest

from astraea import loader
from astraea.capture import capture
from astraea.passes import pipeline
from conftest import tiny_config

EXPECTED = {  # family/preset: (blocks, self-attention SDPAs, cross-attention SDPAs)
    ("wan", "tiny"): (2, 2, 2),
    ("cogvideox", "tiny"): (2, 2, 0),
    ("cogvideox", "tiny-rotary"): (2, 2, 0),
    ("hunyuan_video", "tiny"): (2, 2, 0),  # one dual-stream + one single-stream block
}


def _captured(family, preset):
    cfg = tiny_config(family, preset)
    model = loader.load_model(cfg)
    cap = capture(model, cfg)
    return cap.program.graph_module, pipeline.PassContext(model.family, cap.layout)


def test_annotate_blocks(family_preset, tmp_path):
    gm, ctx = _captured(*family_preset)
    ctx.dump_dir = tmp_path
    before = len(gm.graph.nodes)
    pipeline.run(gm, ctx, [("annotate_blocks", pipeline.annotate_blocks)])
    blocks, self_attn, cross_attn = EXPECTED[family_preset]
    assert ctx.stats["annotate_blocks"] == {"blocks": blocks, "self_attention": self_attn, "cross_attention": cross_attn}
    assert len(gm.graph.nodes) == before
    for node in gm.graph.nodes:
        if node.meta.get("astraea_attention") == "self":
            assert node.meta["astraea_block"].split(".")[0] in ctx.family.block_containers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00-annotate_blocks-after.txt", "00-annotate_blocks-before.txt"]


def test_a_failing_pass_is_named_with_those_before_it():
    gm, ctx = _captured("wan", "tiny")

    def break_graph(gm, ctx):
        raise RuntimeError("cannot classify aten.foo")

    passes = [("annotate_blocks", pipeline.annotate_blocks), ("propagate_subset", break_graph)]
    with pytest.raises(pipeline.PassError, match=r"pass propagate_subset failed \(passes run before it: annotate_blocks\): "
                                                 r"RuntimeError: cannot classify aten.foo"):
        pipeline.run(gm, ctx, passes)


def test_pipeline_table_of_contents():
    assert [name for name, _ in pipeline.PIPELINE] == [
        "annotate_blocks", "classify_rows", "insert_selection", "gather_subset", "replace_attention", "shard_attention",
        "write_cache", "cleanup"]
