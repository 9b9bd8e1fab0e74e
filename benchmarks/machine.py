"""The one machine line every timing benchmark prints: timings depend on the processor, so each
figure is reported with the processor it was measured on."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def cpu_name() -> str:
    """The processor's model name from ``/proc/cpuinfo`` (``platform`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_line() -> str:
    """Processor, CPU count, torch version and threads, and the load average when the benchmark starts
    (a load above the thread count means another job shared the machine and the timings are high)."""
    load = f", load average {os.getloadavg()[0]:.1f} at start" if hasattr(os, "getloadavg") else ""
    return (f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads{load}")


def median_seconds(fn: Callable[[], Any], repeat: int) -> float:
    """The median wall time in seconds of ``repeat`` calls of ``fn`` (the median resists one slow call)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
