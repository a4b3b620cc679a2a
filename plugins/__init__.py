"""astraea.plugins: the `astraea::` custom ops (token selection, query-only attention, cache
update), one file per op with its reference, fake, Triton and TensorRT faces.

The ops land with the kernels issue.
"""
