"""Triton kernels of the astraea ops: plain `@triton.jit` functions and their launchers, no
op registration (that is the op files' job). Importable without a GPU; under
TRITON_INTERPRET=1 they run on CPU tensors (small shapes) so CI checks their logic."""
