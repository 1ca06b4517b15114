"""The one timing helper of the benchmarks: the median of repeated calls after warm-up.

On CUDA each call is bracketed by CUDA events on the current stream (after a synchronize, so
earlier work is not counted) and read after the end event completes; on the CPU by
time.perf_counter. Returns the median and the spread (max - min) / median of the repeats.
"""

import statistics
import time

import torch


def time_ms(fn, device, warmup, repeats):
    """{'ms': median milliseconds of `repeats` calls of fn after `warmup` untimed ones, 'spread': ...}."""
    for _ in range(warmup):
        fn()
    times = [_once_ms(fn, device) for _ in range(repeats)]
    median = statistics.median(times)
    return {"ms": median, "spread": (max(times) - min(times)) / median}


def _once_ms(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3
