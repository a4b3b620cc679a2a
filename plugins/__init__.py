"""astraea.plugins: the `astraea::` custom ops, one file per op.

- `token_select`     score = LSE x ||x - x_ref|| + w_beta exp(skips); top-k per batch row
- `sparse_attention` query-only attention over all keys, with the row LSE (Triton on CUDA)
- `factored_attention` attention within a token's frame or position (STDiT3), with the row LSE
- `group_attention`  its query-only form: the selected queries against their own group's keys
- `cache_update`     fresh rows, LSE, reference input and skip counters, in place
- `fp8_linear`       a Linear layer in FP8 e4m3 with static scales (torch._scaled_mm on FP8 tensor cores)
- `token_mark`, `token_table`  identities that mark a block's token stream and its token-indexed
                     tables (rotary cos/sin) in a captured graph

Each op has a PyTorch reference (CPU and the tests' definition) and a fake kernel, so it
works in eager mode, under torch.compile and through torch.export. Kernels live in
`kernels/`, free of registration side effects. Importing this package registers the ops.
"""

import torch

from . import cache_update, factored_attention, fp8_linear, group_attention, sparse_attention, token_mark, token_select  # noqa: F401,E501

__all__ = ["cache_update", "factored_attention", "fp8_linear", "group_attention", "sparse_attention", "token_mark",
           "token_select"]  # the op modules; call torch.ops.astraea.*


def decompositions() -> dict:
    """{op: its implementation in ATen and the kernel ops} for every astraea op a compiler
    should see through, in the order decompose applies them (a function can emit a later one)."""
    return {torch.ops.astraea.fp8_linear.default: fp8_linear._math,
            torch.ops.astraea.group_attention.default: group_attention._math,
            torch.ops.astraea.factored_attention.default: factored_attention._math}


def decompose(ep):
    """ep (a torch.export ExportedProgram) with every astraea op a compiler should see through
    written out (decompositions(): FP8 Linear layers in ATen ops, query-only factored attention
    as its implementation for the device, factored attention as its grouping around
    astraea::sparse_attention), each by ExportedProgram.run_decompositions where the program
    holds it. What Inductor and AOTInductor compile; a program without those ops comes back
    unchanged (the same object)."""
    for op, body in decompositions().items():
        if any(n.target is op for n in ep.graph.nodes):
            ep = ep.run_decompositions({op: body})
    return ep
