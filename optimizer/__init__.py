"""Astraea: compile-time token-wise acceleration of video diffusion transformers.

Stages (see README.md): config -> family adapter -> dense reference -> budget search ->
graph rewrite -> per-budget engines -> runtime. This package (`astraea`) is the optimizer;
`astraea.passes` holds the graph passes and `astraea.plugins` the custom ops.
"""

__version__ = "0.1.0"
