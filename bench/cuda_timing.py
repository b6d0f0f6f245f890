"""CUDA-event timing shared by the kernel benchmarks: candidates interleaved round by round (the card's clock
drifts under its power cap), medians of event times, and peak memory above what is already allocated."""
from __future__ import annotations

import statistics
from typing import Callable

import torch


def timed(fn: Callable[[], object], iters: int) -> float:
    """Median ms of `iters` calls."""
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def interleaved(candidates: dict[str, Callable[[], object]], rounds: int, iters: int) -> dict[str, float]:
    """{name: median ms}: every candidate timed once per round, rounds in turn."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            times[name].append(timed(fn, iters))
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_gib(fn: Callable[[], object]) -> float:
    """GiB allocated at fn's peak above what was allocated before it: what it keeps for its backward, plus
    its temporaries."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30
