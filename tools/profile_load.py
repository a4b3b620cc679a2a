"""Profile astraea.runtime.load of an engine folder (where the seconds go), top functions by
cumulative time, as JSON on stdout.

    python3 tools/profile_load.py runs/gpu-aoti/engines
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import sys
import time

import torch

from astraea import runtime

if __name__ == "__main__":
    folder = sys.argv[1]
    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")  # the CUDA context, not counted
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    transformer = runtime.load(folder)
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumtime").print_stats(25)
    print(text.getvalue())
    print(json.dumps({"seconds": time.perf_counter() - t0, "parts": transformer.load_seconds}))
