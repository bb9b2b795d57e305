"""Small measuring tools shared by the benchmark scripts in ``experiments/`` and the memory tests.

Absolute timings on shared machines are noisy, so benchmarks report *ratios* of two things measured
side by side in one run (``interleaved_times``). Peak memory on the CPU is the process's peak resident
set size, reset before the measured call (Linux ``/proc/self/clear_refs``); on CUDA it is
``torch.cuda.max_memory_allocated``.
"""

import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}; peak memory needs Linux")


def _fix_malloc_mmap_threshold() -> None:
    """Make glibc serve every block over 128 KiB with mmap and give it back on free, so that the
    resident set follows the live tensors (glibc otherwise raises the threshold as blocks are freed)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def peak_extra_memory(fn: Callable[[], object], *, device: str = "cpu") -> tuple[object, int]:
    """Run ``fn()`` and return ``(result, bytes)``: its peak memory above what was in use before."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - before
    _fix_malloc_mmap_threshold()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    before = _rss_kib("VmRSS")
    result = fn()
    return result, max(0, _rss_kib("VmHWM") - before) * 1024


def interleaved_times(fns: dict[str, Callable[[], object]], *, repeats: int = 5) -> dict[str, float]:
    """Median seconds of each function, run in turn ``repeats`` times (after one warm-up each)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
