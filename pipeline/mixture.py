"""The mixture order: nanochat's TaskMixture shuffle of (task_idx, local_idx) pairs (reference §3.13)."""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np


def mixture_order(task_lengths: Sequence[int], seed: int = 42) -> np.ndarray:
    """int64 (N, 2) rows of (task_idx, local_idx): mixture index k reads tasks[ti][li].

    nanochat lists every (task_idx, local_idx) in task order and calls random.Random(42).shuffle on
    that list. shuffle's swaps depend only on the list's length, so shuffling the flat positions
    0..N-1 instead gives the same permutation without building a million tuples.
    """
    lengths = []
    for k, n in enumerate(task_lengths):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"task_lengths[{k}] must be a non-negative integer, got {n!r}")
        lengths.append(int(n))
    positions = list(range(sum(lengths)))
    random.Random(seed).shuffle(positions)
    flat = np.array(positions, dtype=np.int64)
    starts = np.cumsum([0] + lengths, dtype=np.int64)
    task_idx = np.searchsorted(starts, flat, side="right") - 1  # skips empty tasks (equal starts)
    order = np.empty((len(flat), 2), dtype=np.int64)
    order[:, 0] = task_idx
    order[:, 1] = flat - starts[task_idx]
    return order
