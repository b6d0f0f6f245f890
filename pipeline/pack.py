"""Packers: turn conversation lengths into rows of whole conversations (design §1, §4).

A plan needs only the lengths, so it is computed once, globally and deterministically, and rows are
materialised from it in parallel. Every packer is BOS-aligned: a conversation stays whole in one row, and the
rest of a row is padding. The caller truncates or drops conversations longer than a row before packing.

Which packer when:
- `bestfit-seed`: nanochat's original SFT loader rule (nanochat-reference §4.2-4.3), a buffer of 100
  conversations in stream order. Use it for parity with the original script: at world size 1 it gives the same
  rows, in the same order, up to the point where the original's buffer starts reading epoch 2; our stream ends
  there and the last buffer drains by the same rule, so every conversation is trained exactly once. Exact
  token parity also needs upstream's lengths, i.e. the recipe's `overlong = "nanochat"` (its default with this
  packer): cut at 2048 then to the row, nothing dropped (tests/test_parity.py).
- `bestfit`: the same rule with a larger window (default 1% of the conversations, clamped to [100, 10_000]).
  Rows follow the stream, but padding stays well above the lower bound (0.26% at 2048, 0.96% at 512 on a
  1M-conversation mix: bench/bench_prepare.py), and a large window skews the first and last ~window
  placements towards long conversations (each row starts with the longest in a full buffer).
- `bfd-blocks` (the default): best-fit-decreasing inside consecutive blocks of 65,536 conversations, rows
  shuffled within each block. Padding near the global optimum (0.049% at 2048, 0.13% at 512 on the same mix)
  while each conversation stays within its block of the mixture order (mean displacement 2% of the epoch).
- `bfd-shuffle`: global best-fit-decreasing, then a seeded shuffle of all rows. The least padding (BFD uses
  at most 11/9 of the optimal rows, plus one), but rows are built from globally sorted lengths and the
  mixture order is gone. Use it when locality of the mixture does not matter.

The best-fit rule, for a window of W: before every placement the buffer holds the W earliest unplaced
conversations (pops shift later entries up and refills append in stream order, so buffer order == stream
order). Take the longest that fits the row's remaining space, the earliest among equal lengths; if none fits,
pad the rest of the row. At the end of the stream the buffer drains by the same rule. We keep the buffer as one
FIFO of stream ids per length plus a bitset (a Python int) of the non-empty lengths, so "longest length <=
remaining" is one mask and `bit_length` in C instead of a Python scan of the window: O(capacity / 30) machine
words per placement whatever the window, and no tables of capacity-sized masks (memory stays O(n + capacity)).
"""
from __future__ import annotations

import heapq
import inspect
from collections import deque
from dataclasses import dataclass

import numpy as np

from pipeline.errors import DataError


class PackError(DataError, ValueError):
    """Bad packer input: a length outside [1, capacity], an unknown method or option."""


@dataclass(frozen=True, eq=False)
class PackPlan:
    """Rows as slices of one id array: row r holds doc_order[row_offsets[r]:row_offsets[r+1]], in order.

    Ids are positions in the lengths array that was packed. Two flat arrays (not lists of lists) so a plan for
    millions of conversations is small, cheap to store and easy to split across workers.
    """

    doc_order: np.ndarray
    row_offsets: np.ndarray

    def __post_init__(self):
        order = np.array(self.doc_order, dtype=np.int64).reshape(-1)
        offsets = np.array(self.row_offsets, dtype=np.int64).reshape(-1)
        if offsets.size == 0 or offsets[0] != 0 or offsets[-1] != order.size or np.any(np.diff(offsets) < 0):
            raise PackError(f"row_offsets must rise from 0 to len(doc_order)={order.size}, got "
                            f"{offsets[:3].tolist()}...{offsets[-3:].tolist()} ({offsets.size} entries)")
        order.setflags(write=False)
        offsets.setflags(write=False)
        object.__setattr__(self, "doc_order", order)
        object.__setattr__(self, "row_offsets", offsets)

    @property
    def n_rows(self) -> int:
        return int(self.row_offsets.size - 1)

    def row_docs(self, r: int) -> np.ndarray:
        """Conversation ids of row r, in token-stream order."""
        return self.doc_order[self.row_offsets[r]:self.row_offsets[r + 1]]

    def row_fill(self, lengths: np.ndarray) -> np.ndarray:
        """Tokens used in each row (int64[n_rows]); padding is capacity minus this."""
        csum = np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64)[self.doc_order])])
        return csum[self.row_offsets[1:]] - csum[self.row_offsets[:-1]]

    def __eq__(self, other) -> bool:
        if not isinstance(other, PackPlan):
            return NotImplemented
        return (np.array_equal(self.doc_order, other.doc_order)
                and np.array_equal(self.row_offsets, other.row_offsets))

    __hash__ = None


def _check_lengths(lengths, capacity) -> np.ndarray:
    """Lengths as int64, or a PackError naming the first conversation that cannot be placed whole."""
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
        raise PackError(f"capacity must be a positive integer, got {capacity!r}")
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise PackError(f"lengths must be a 1-D array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise PackError(f"lengths must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    bad = np.flatnonzero((arr < 1) | (arr > capacity))
    if bad.size:
        i = int(bad[0])
        raise PackError(f"conversation {i} has length {int(arr[i])}; packing needs 1 <= length <= capacity "
                        f"{capacity} ({bad.size} such conversations; truncate or drop them before packing)",
                        field=f"lengths[{i}]")
    return arr


def _check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise PackError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _bestfit_window(lengths: np.ndarray, capacity: int, window: int) -> PackPlan:
    """The original best-fit rule over a finite stream with a buffer of `window` conversations."""
    L = lengths.tolist()
    n = len(L)
    buckets = [deque() for _ in range(capacity + 1)]  # per length: buffered stream ids, ascending
    occupied = 0  # bit k set <=> buckets[k] non-empty
    order: list[int] = []
    offsets = [0]
    cursor = min(window, n)
    for i in range(cursor):  # initial fill
        buckets[L[i]].append(i)
        occupied |= 1 << L[i]
    while occupied:  # one row per pass; an empty row always fits something, so rows are never empty
        remaining = capacity
        while True:
            m = occupied & ((2 << remaining) - 1)
            if not m:
                break  # nothing in the buffer fits: pad the rest of the row
            k = m.bit_length() - 1
            b = buckets[k]
            order.append(b.popleft())
            if not b:
                occupied ^= 1 << k
            remaining -= k
            if cursor < n:  # refill: one out, one in, keeps the buffer at `window`
                j = L[cursor]
                if not buckets[j]:
                    occupied |= 1 << j
                buckets[j].append(cursor)
                cursor += 1
            if remaining == 0:
                break
        offsets.append(len(order))
    return PackPlan(np.array(order, dtype=np.int64), np.array(offsets, dtype=np.int64))


def bestfit_seed(lengths, capacity: int, window: int = 100) -> PackPlan:
    """nanochat's original SFT packer (buffer of 100) at world size 1 over one pass of the stream."""
    lengths = _check_lengths(lengths, capacity)
    return _bestfit_window(lengths, int(capacity), _check_positive("window", window))


def default_window(n: int) -> int:
    """1% of the conversations in [100, 10_000]: keeps the length-skewed start and end of the stream short."""
    return min(10_000, max(100, n // 100))


def bestfit(lengths, capacity: int, window: int | None = None) -> PackPlan:
    """The same rule with a larger window (default: `default_window(n)`): less padding, same stream order."""
    lengths = _check_lengths(lengths, capacity)
    window = default_window(lengths.size) if window is None else _check_positive("window", window)
    return _bestfit_window(lengths, int(capacity), window)


def _bfd_rows(L: list[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing over lengths L: rows as lists of indices into L.

    Longest first (ties by index), each into the fullest row it fits, the earliest opened among equally
    full ones. Within a row, conversations stay in placement order (longest first).
    """
    ids = np.argsort(-np.asarray(L, dtype=np.int64), kind="stable").tolist()
    by_free = [[] for _ in range(capacity + 1)]  # per free space: heap of open row ids
    free_bits = 0  # bit f set <=> some open row has exactly f free tokens (f >= 1)
    rows: list[list[int]] = []
    for i in ids:
        k = L[i]
        m = free_bits >> k
        if m:
            f = k + (m & -m).bit_length() - 1  # smallest free space >= k
            rows_f = by_free[f]
            r = heapq.heappop(rows_f)
            if not rows_f:
                free_bits ^= 1 << f
            rows[r].append(i)
            f -= k
        else:
            r = len(rows)
            rows.append([i])
            f = capacity - k
        if f:
            if not by_free[f]:
                free_bits |= 1 << f
            heapq.heappush(by_free[f], r)
    return rows


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PackError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _plan_from_rows(rows: list[list[int]], perm: list[int], offset: int = 0) -> tuple[list[int], list[int]]:
    order = [offset + i for r in perm for i in rows[r]]
    return order, [len(rows[r]) for r in perm]


def _plan(order: list[int], sizes: list[int]) -> PackPlan:
    offsets = np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64))]).astype(np.int64)
    return PackPlan(np.asarray(order, dtype=np.int64), offsets)


def bfd_shuffle(lengths, capacity: int, seed: int = 0) -> PackPlan:
    """Global best-fit-decreasing, then the rows in a seeded random order."""
    lengths = _check_lengths(lengths, capacity)
    seed = _check_seed(seed)
    rows = _bfd_rows(lengths.tolist(), int(capacity))
    perm = np.random.default_rng(seed).permutation(len(rows)).tolist()
    return _plan(*_plan_from_rows(rows, perm))


def bfd_blocks(lengths, capacity: int, block: int = 65_536, seed: int = 0) -> PackPlan:
    """Best-fit-decreasing inside consecutive blocks of the stream, rows shuffled within each block.

    Padding close to global BFD (a block of 65K conversations already holds every length many times over)
    while conversations move at most one block away from their mixture position, and blocks keep the
    stream order: the mixture stays locally random and the start and end of the epoch are not skewed by
    length. Block b's rows are shuffled with the seed (seed, b).
    """
    lengths = _check_lengths(lengths, capacity)
    seed = _check_seed(seed)
    block = _check_positive("block", block)
    order: list[int] = []
    sizes: list[int] = []
    for b, start in enumerate(range(0, len(lengths), block)):
        rows = _bfd_rows(lengths[start:start + block].tolist(), int(capacity))
        perm = np.random.default_rng([seed, b]).permutation(len(rows)).tolist()
        o, z = _plan_from_rows(rows, perm, start)
        order += o
        sizes += z
    return _plan(order, sizes)


PACKERS = {"bestfit-seed": bestfit_seed, "bestfit": bestfit, "bfd-shuffle": bfd_shuffle, "bfd-blocks": bfd_blocks}


def pack(lengths, capacity: int, method: str, **options) -> PackPlan:
    """Pack conversations of the given lengths into rows of `capacity` tokens with the named packer."""
    if method not in PACKERS:
        raise PackError(f"unknown packer {method!r}; choose one of {sorted(PACKERS)}")
    fn = PACKERS[method]
    allowed = [p for p in inspect.signature(fn).parameters if p not in ("lengths", "capacity")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise PackError(f"packer {method!r} has no option(s) {unknown}; it takes {allowed}")
    return fn(lengths, capacity, **options)


def lower_bound_rows(lengths, capacity: int) -> int:
    """ceil(total tokens / capacity): no packer can use fewer rows."""
    total = int(np.sum(np.asarray(lengths, dtype=np.int64), dtype=np.int64))
    return -(-total // int(capacity))


def check_plan(plan: PackPlan, lengths, capacity: int) -> None:
    """Raise PackError unless every conversation appears exactly once and every row is non-empty and fits."""
    n = len(lengths)
    if plan.doc_order.size != n or not np.array_equal(np.sort(plan.doc_order), np.arange(n)):
        raise PackError(f"plan does not hold each of the {n} conversations exactly once")
    sizes = np.diff(plan.row_offsets)
    if np.any(sizes == 0):
        raise PackError(f"plan row {int(np.flatnonzero(sizes == 0)[0])} is empty")
    fill = plan.row_fill(lengths)
    if np.any(fill > capacity):
        r = int(np.flatnonzero(fill > capacity)[0])
        raise PackError(f"plan row {r} holds {int(fill[r])} tokens, more than capacity {capacity}")


def plan_stats(plan: PackPlan, lengths, capacity: int) -> dict:
    """Rows, tokens and padding of a plan, next to the lower bound (design §4's report)."""
    placed = np.asarray(lengths, dtype=np.int64)[plan.doc_order]
    tokens = int(placed.sum())
    rows = plan.n_rows
    slots = rows * int(capacity)
    lb = lower_bound_rows(placed, capacity)
    return {
        "rows": rows,
        "tokens": tokens,
        "pad_tokens": slots - tokens,
        "pad_fraction": (slots - tokens) / slots if slots else 0.0,
        "lower_bound_rows": lb,
        "lower_bound_pad_fraction": (lb * capacity - tokens) / (lb * capacity) if lb else 0.0,
    }
