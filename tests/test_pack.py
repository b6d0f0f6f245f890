"""Packers: parity of bestfit-seed with a literal transcription of nanochat's loader, invariants, padding."""
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.pack import (PACKERS, PackError, PackPlan, check_plan, default_window, lower_bound_rows, pack,
                           plan_stats)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def original_bestfit(lengths, row_capacity, buffer_size=100):
    """nanochat-reference §4.2-4.3 at world size 1, written out literally (list buffer, scan, pop).

    The stream is finite: refill stops after the last conversation and the buffer drains by the same rule.
    Returns rows as lists of conversation ids. Lengths only: the token-level reference (upstream's cut at 2048,
    the crop to the row, target-free conversations kept, both mask variants) is in tests/test_parity.py.
    """
    conv_buffer = []  # (id, length) in buffer order
    cursor = 0
    rows = []
    while True:
        row = []
        row_len = 0
        while row_len < row_capacity:
            while len(conv_buffer) < buffer_size and cursor < len(lengths):
                conv_buffer.append((cursor, int(lengths[cursor])))
                cursor += 1
            remaining = row_capacity - row_len
            best_idx = -1
            best_len = 0
            for i, (_, n) in enumerate(conv_buffer):
                if n <= remaining and n > best_len:
                    best_idx = i
                    best_len = n
            if best_idx >= 0:
                conv_id, n = conv_buffer.pop(best_idx)
                row.append(conv_id)
                row_len += n
            else:
                break  # pad the rest of the row
        if not row:
            return rows  # stream and buffer both empty
        rows.append(row)


def rows_of(plan):
    return [plan.row_docs(r).tolist() for r in range(plan.n_rows)]


def length_sets(rng):
    """Named (lengths, capacity) cases: realistic, tie-heavy, full rows, tiny rows."""
    return {
        "lognormal": (np.clip(np.round(rng.lognormal(np.log(300), 1.0, 3000)), 1, 2049).astype(np.int64), 2049),
        "uniform": (rng.integers(1, 2050, 3000), 2049),
        "many-ties": (rng.choice([1, 2, 3, 5, 8], 3000), 16),
        "full-rows": (rng.choice([64, 64, 63, 1, 32], 2000), 64),
        "capacity-1": (np.ones(300, dtype=np.int64), 1),
        "tiny-capacity": (rng.integers(1, 4, 1000), 3),
        "fewer-than-window": (rng.integers(1, 100, 37), 100),
    }


@pytest.mark.parametrize("case", list(length_sets(np.random.default_rng(0))))
def test_bestfit_seed_matches_original(case):
    lengths, cap = length_sets(np.random.default_rng(0))[case]
    expected = original_bestfit(lengths, cap)
    plan = pack(lengths, cap, "bestfit-seed")
    assert rows_of(plan) == expected  # same rows, same members, same order inside rows


@pytest.mark.parametrize("window", [1, 2, 7, 100, 500, 5000])
def test_bestfit_is_the_same_rule_with_a_larger_window(window):
    rng = np.random.default_rng(window)
    lengths = np.clip(np.round(rng.lognormal(np.log(80), 0.9, 2000)), 1, 513).astype(np.int64)
    assert rows_of(pack(lengths, 513, "bestfit", window=window)) == original_bestfit(lengths, 513, window)
    assert rows_of(pack(lengths, 513, "bestfit-seed", window=window)) == original_bestfit(lengths, 513, window)


def test_bestfit_seed_matches_original_on_gsm8k_lengths():
    """Lengths from real GSM8K text (bytes/4, roughly tokens) at nanochat's row capacity."""
    path = DATA / "task_data" / "openai--gsm8k" / "main" / "train" / "00000.parquet"
    if not path.exists():
        pytest.skip(f"{path} not present")
    import pyarrow.parquet as pq
    table = pq.read_table(path, columns=["question", "answer"]).to_pydict()
    lengths = np.array([(len(q.encode()) + len(a.encode())) // 4 + 8
                        for q, a in zip(table["question"], table["answer"])], dtype=np.int64)
    lengths = np.tile(lengths, 2)[: 12_000]
    for cap in (2049, 513):
        assert rows_of(pack(lengths, cap, "bestfit-seed")) == original_bestfit(lengths, cap)


def random_length_cases():
    rng = np.random.default_rng(7)
    yield np.clip(np.round(rng.lognormal(np.log(400), 0.8, 5000)), 1, 2049).astype(np.int64), 2049
    yield rng.integers(1, 9, 3000), 8
    yield np.full(50, 33, dtype=np.int64), 33
    yield np.array([], dtype=np.int64), 10


@pytest.mark.parametrize("method", sorted(PACKERS))
def test_invariants(method):
    for lengths, cap in random_length_cases():
        plan = pack(lengths, cap, method)
        assert plan.doc_order.dtype == np.int64 and plan.row_offsets.dtype == np.int64
        assert sorted(plan.doc_order.tolist()) == list(range(len(lengths)))  # each id exactly once
        sizes = np.diff(plan.row_offsets)
        assert np.all(sizes > 0)  # no empty rows
        fills = [int(lengths[plan.row_docs(r)].sum()) for r in range(plan.n_rows)]
        assert max(fills, default=0) <= cap
        assert plan.row_fill(lengths).tolist() == fills
        assert plan.n_rows >= lower_bound_rows(lengths, cap)
        check_plan(plan, lengths, cap)
        again = pack(lengths.copy(), cap, method)
        assert again == plan and rows_of(again) == rows_of(plan)  # deterministic


def test_bfd_shuffle_seed_changes_order_not_rows():
    lengths = np.clip(np.round(np.random.default_rng(3).lognormal(np.log(300), 1.0, 4000)), 1, 2049)
    lengths = lengths.astype(np.int64)
    a = rows_of(pack(lengths, 2049, "bfd-shuffle", seed=0))
    b = rows_of(pack(lengths, 2049, "bfd-shuffle", seed=1))
    assert a != b
    assert Counter(map(tuple, a)) == Counter(map(tuple, b))
    assert rows_of(pack(lengths, 2049, "bfd-shuffle")) == a  # seed 0 is the default


def literal_bfd(lengths, cap):
    """Best-fit-decreasing by scanning every open row (fullest that fits, earliest opened on ties)."""
    rows, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = int(lengths[i])
        fitting = [(f, r) for r, f in enumerate(free) if f >= n]
        if fitting:
            r = min(fitting)[1]
            rows[r].append(i)
            free[r] -= n
        else:
            rows.append([i])
            free.append(cap - n)
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bfd_places_like_literal_best_fit_decreasing(seed):
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(60), 0.9, 600)), 1, 257).astype(np.int64)
    plan = pack(lengths, 257, "bfd-shuffle", seed=seed)
    assert sorted(rows_of(plan)) == sorted(literal_bfd(lengths, 257))  # same rows, same order inside
    lb = lower_bound_rows(lengths, 257)
    assert plan.n_rows <= 11 / 9 * lb + 1  # BFD's worst-case bound against the optimum


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("median,sigma", [(300, 1.0), (800, 0.6)])
def test_larger_window_pads_less(seed, median, sigma):
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(median), sigma, 60_000)), 1, 2049).astype(np.int64)
    seed_stats = plan_stats(pack(lengths, 2049, "bestfit-seed"), lengths, 2049)
    big_stats = plan_stats(pack(lengths, 2049, "bestfit", window=10_000), lengths, 2049)
    bfd_stats = plan_stats(pack(lengths, 2049, "bfd-shuffle"), lengths, 2049)
    assert big_stats["pad_tokens"] < seed_stats["pad_tokens"]
    assert bfd_stats["pad_tokens"] <= big_stats["pad_tokens"]
    assert bfd_stats["rows"] >= bfd_stats["lower_bound_rows"]


@pytest.mark.parametrize("block", [97, 1000, 5000])
def test_bfd_blocks_is_bfd_inside_each_block(block):
    rng = np.random.default_rng(block)
    lengths = np.clip(np.round(rng.lognormal(np.log(60), 0.9, 2500)), 1, 257).astype(np.int64)
    plan = pack(lengths, 257, "bfd-blocks", block=block, seed=3)
    rows = rows_of(plan)
    blocks = [{i // block for i in row} for row in rows]
    assert all(len(b) == 1 for b in blocks)  # no row mixes blocks
    seq = [b.pop() for b in blocks]
    assert seq == sorted(seq)  # blocks keep the stream order
    for b in sorted(set(seq)):  # inside a block: exactly best-fit-decreasing, rows in some shuffled order
        start = b * block
        mine = [tuple(i - start for i in row) for row, k in zip(rows, seq) if k == b]
        assert sorted(mine) == sorted(tuple(r) for r in literal_bfd(lengths[start:start + block], 257))
    assert pack(lengths, 257, "bfd-blocks", block=block, seed=3) == plan
    assert pack(lengths, 257, "bfd-blocks", block=block, seed=4) != plan


def test_bfd_blocks_pads_like_global_bfd_and_keeps_locality():
    rng = np.random.default_rng(11)
    lengths = np.clip(np.round(rng.lognormal(np.log(300), 1.0, 60_000)), 1, 2049).astype(np.int64)
    blocks = pack(lengths, 2049, "bfd-blocks", block=16_384)
    whole = pack(lengths, 2049, "bfd-shuffle")
    window = pack(lengths, 2049, "bestfit", window=10_000)
    pad = lambda p: plan_stats(p, lengths, 2049)["pad_tokens"]  # noqa: E731
    n_blocks = -(-len(lengths) // 16_384)
    assert pad(blocks) < pad(window) and pad(blocks) <= pad(whole) + n_blocks * 2049  # ~ a row's tail per block
    displacement = lambda p: np.abs(p.doc_order - np.arange(len(lengths))).mean()  # noqa: E731
    assert displacement(blocks) < 16_384 < displacement(whole)


def test_default_window():
    assert default_window(0) == 100 and default_window(20_000) == 200 and default_window(10**8) == 10_000
    rng = np.random.default_rng(5)
    lengths = rng.integers(1, 600, 30_000)
    assert pack(lengths, 600, "bestfit") == pack(lengths, 600, "bestfit", window=300)


@pytest.mark.parametrize("method", sorted(PACKERS))
@pytest.mark.parametrize("bad,index", [([5, 0, 3], 1), ([5, 3, -2], 2), ([11, 3], 0), ([3, 4, 10, 12], 3)])
def test_bad_lengths_name_the_conversation(method, bad, index):
    with pytest.raises(ValueError, match=rf"conversation {index} has length {bad[index]}") as e:
        pack(np.array(bad), 10, method)
    assert isinstance(e.value, DataError) and e.value.field == f"lengths[{index}]"


@pytest.mark.parametrize("call,match", [
    (lambda: pack([1, 2], 10, "first-fit"), "unknown packer 'first-fit'"),
    (lambda: pack([1, 2], 10, "bestfit", seed=1), r"no option\(s\) \['seed'\]"),
    (lambda: pack([1, 2], 10, "bestfit-seed", window=0), "window must be a positive integer"),
    (lambda: pack([1, 2], 0, "bestfit"), "capacity must be a positive integer"),
    (lambda: pack([1.0, 2.0], 10, "bestfit"), "must be integers"),
    (lambda: pack([[1, 2]], 10, "bestfit"), "1-D"),
    (lambda: pack([1, 2], 10, "bfd-shuffle", seed=-1), "seed must be"),
    (lambda: PackPlan(np.array([0, 1]), np.array([0, 1])), "row_offsets"),
])
def test_bad_arguments(call, match):
    with pytest.raises(PackError, match=match):
        call()


def test_check_plan_catches_broken_plans():
    lengths = np.array([4, 4, 3])
    check_plan(PackPlan(np.array([0, 2, 1]), np.array([0, 2, 3])), lengths, 8)
    for order, offsets, match in [([0, 0, 1], [0, 2, 3], "exactly once"), ([0, 1, 2], [0, 3, 3], "empty"),
                                  ([0, 1, 2], [0, 3], "more than capacity")]:
        with pytest.raises(PackError, match=match):
            check_plan(PackPlan(np.array(order), np.array(offsets)), lengths, 8)


def test_lower_bound_and_stats():
    assert lower_bound_rows(np.array([], dtype=np.int64), 7) == 0
    assert lower_bound_rows(np.full(5, 7), 7) == 5
    assert lower_bound_rows(np.array([7, 7, 1]), 7) == 3
    assert lower_bound_rows(np.full(3, 2**31 - 1, dtype=np.int64), 2**31 - 1) == 3  # no int32 overflow
    assert lower_bound_rows(np.full(4, 3, dtype=np.int32), 5) == 3  # 12 tokens, 5 per row
    lengths = np.array([5, 5, 5, 1])  # best fit: [5, 5] [5, 1] -> 2 rows of 10
    plan = pack(lengths, 10, "bestfit-seed")
    assert rows_of(plan) == [[0, 1], [2, 3]]
    s = plan_stats(plan, lengths, 10)
    assert s == {"rows": 2, "tokens": 16, "pad_tokens": 4, "pad_fraction": 0.2, "lower_bound_rows": 2,
                 "lower_bound_pad_fraction": 0.2}
    empty = plan_stats(pack(np.array([], dtype=np.int64), 10, "bestfit"), [], 10)
    assert empty["rows"] == 0 and empty["pad_fraction"] == 0.0


def test_plan_is_immutable():
    plan = pack(np.array([3, 2, 1]), 4, "bestfit")
    with pytest.raises(ValueError):
        plan.doc_order[0] = 5
    with pytest.raises(AttributeError):
        plan.doc_order = np.array([0])
