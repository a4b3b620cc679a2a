"""classify_rows on the tiny Wan model: K/V side full, everything else subset, gathers where
the two meet, and an unknown op named instead of guessed."""

from __future__ import annotations

import pytest
import torch

from astraea import loader
from astraea.capture import capture
from astraea.passes import pipeline
from astraea.passes.classify_rows import SDPA, classify_rows
from conftest import tiny_config


def _classified(family="wan", preset="tiny"):
    cfg = tiny_config(family, preset)
    model = loader.load_model(cfg)
    cap = capture(model, cfg)
    gm = cap.program.graph_module
    ctx = pipeline.PassContext(model.family, cap.layout)
    pipeline.run(gm, ctx, [("annotate_blocks", pipeline.annotate_blocks), ("classify_rows", classify_rows)])
    return gm, ctx


def test_wan_rows():
    gm, ctx = _classified()
    stats = ctx.stats["classify_rows"]
    assert stats["tables"] == 4  # cos and sin, two blocks
    for node in gm.graph.nodes:
        if node.target is SDPA and node.meta["astraea_attention"] == "self":
            q, k, v = node.args[:3]
            assert q.meta["astraea_rows"] == "subset" and node.meta["astraea_rows"] == "subset"
            assert k.meta["astraea_rows"] == "full" and v.meta["astraea_rows"] == "full"
            assert (q.meta["astraea_token_dim"], k.meta["astraea_token_dim"]) == (2, 2)
        if node.target is SDPA and node.meta["astraea_attention"] == "cross":
            assert node.args[0].meta["astraea_rows"] == "subset"
            assert "astraea_rows" not in node.args[1].meta  # text keys: no token axis
        if node.target is torch.ops.aten.linear.default and node.meta.get("astraea_rows"):
            weight = node.args[1].name
            want = "full" if ("attn1_to_k" in weight or "attn1_to_v" in weight) else "subset"
            assert node.meta["astraea_rows"] == want, (node.name, weight)
    # where the Q projection reads the normed input and the Q rotation reads the tables
    gathered = [n for n in gm.graph.nodes if n.meta.get("astraea_gather")]
    assert any(n.target is torch.ops.aten.linear.default and "attn1_to_q" in n.args[1].name for n in gathered)
    assert stats["gathers"] == len([1 for n in gathered for _ in n.meta["astraea_gather"]])
    by_block = {}
    for n in gathered:
        if n.meta["astraea_block"] == "blocks.0":
            by_block[n.name] = [n.args[i].target for i in n.meta["astraea_gather"]]
    # exactly: the Q projection's input, the two Q-side table slices, the residual add's block input
    assert sorted(map(str, (t for ts in by_block.values() for t in ts))) == sorted(
        ["aten.type_as.default", "astraea.token_table.default", "astraea.token_table.default", "astraea.token_mark.default"])
    assert not any(n.target is SDPA for n in gathered)


def test_joint_attention_rows_keep_the_text():
    gm, ctx = _classified("cogvideox", "tiny")
    q_proj = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default and "attn1_to_q" in n.args[1].name)
    src = q_proj.args[0]  # the joint [text; video] normed sequence: video rows start after the text
    assert q_proj.meta["astraea_gather"] == [0] and src.meta["astraea_token_start"] == ctx.layout.text_tokens


def test_an_op_without_a_rule_is_refused_by_name(monkeypatch):
    from astraea.passes import classify_rows as module

    rules = dict(module.TOKEN_RULES)
    del rules[torch.ops.aten.layer_norm.default]
    monkeypatch.setattr(module, "TOKEN_RULES", rules)
    with pytest.raises(pipeline.PassError, match="classify_rows failed .* no token-axis rule for aten.layer_norm.default"):
        _classified("wan", "tiny")


def test_a_reduction_over_the_token_axis_is_refused():
    from astraea.passes.classify_rows import UnsupportedOp, _reduce

    class Node:  # the minimum _reduce reads
        name, target, args, kwargs = "mean", "aten.mean.dim", (None, [1], True), {}

    class Src:
        meta = {"val": torch.empty(2, 5, 3)}

    with pytest.raises(UnsupportedOp, match="reduces over the token axis"):
        _reduce(Node, (1, 0), Src, 5)
    assert _reduce(type("N", (Node,), {"args": (None, [-1], False)}), (1, 0), Src, 5) == (1, 0)
