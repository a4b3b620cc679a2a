"""Time on a device: CUDA events on a GPU, perf_counter on the CPU, and the device's name.

Every number astraea-bench, the cost model and the build's runtime check report is taken
through `Clock` / `time_call`, so a GPU time is the kernels' time (events recorded on the
stream), never the host's view of an asynchronous launch.
"""

from __future__ import annotations

import platform
import time

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class Clock:
    """A CUDA event on a GPU, a perf_counter reading on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.event = torch.cuda.Event(enable_timing=True) if self.cuda else None
        self.t = 0.0

    def record(self) -> None:
        if self.cuda:
            self.event.record()
        else:
            self.t = time.perf_counter()

    def until(self, end: Clock) -> float:
        """Milliseconds from this reading to `end` (synchronises on a GPU)."""
        if self.cuda:
            end.event.synchronize()
            return self.event.elapsed_time(end.event)
        return (end.t - self.t) * 1e3


def time_call(device: torch.device, fn) -> float:
    """Milliseconds of one call of fn."""
    start, end = Clock(device), Clock(device)
    start.record()
    fn()
    end.record()
    return start.until(end)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
