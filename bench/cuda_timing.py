"""CUDA-event timing shared by the kernel benchmarks: candidates interleaved round by round (the card's clock
drifts under its power cap), medians of event times, and peak memory above what is already allocated; plus
the forward + backward closure they time and its error from an fp32 run."""
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


def fwd_bwd(fn: Callable, leaves: list[torch.Tensor], *args, grad: torch.Tensor | None = None) -> Callable[[], torch.Tensor]:
    """A call of fn(*leaves, *args) and its backward (with `grad`, or none for a scalar), the leaves' gradients
    cleared first; it returns fn's output."""
    def run():
        for t in leaves:
            t.grad = None
        out = fn(*leaves, *args)
        out.backward(grad)
        return out
    return run


def rel_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref).norm() / ref.norm()).item()


def errors_and_peaks(runs: dict[str, Callable[[], torch.Tensor]], leaves: list[torch.Tensor], ref_out: torch.Tensor,
                     ref_leaves: list[torch.Tensor]) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per fwd_bwd run: its output's and each leaf gradient's relative error from the fp32 run (ref_out,
    ref_leaves' gradients), and its peak GiB above the inputs."""
    errors, peaks = {}, {}
    for name, run in runs.items():
        out = run()
        errors[name] = [rel_error(out, ref_out)] + [rel_error(t.grad, r.grad) for t, r in zip(leaves, ref_leaves)]
        peaks[name] = peak_gib(run)
    return errors, peaks
