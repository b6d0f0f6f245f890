"""mixture_order against a direct transcription of nanochat's TaskMixture (reference §3.13)."""
from __future__ import annotations

import random

import numpy as np
import pytest

from pipeline.mixture import mixture_order


def nanochat_index_map(lengths, seed=42):
    """TaskMixture.__init__ as nanochat writes it: list the (task_idx, local_idx) tuples, then shuffle."""
    index_map = []
    for task_idx, task_length in enumerate(lengths):
        for local_idx in range(task_length):
            index_map.append((task_idx, local_idx))
    rng = random.Random(seed)
    rng.shuffle(index_map)
    return index_map


@pytest.mark.parametrize("lengths", [[5], [3, 0, 7], [0, 0, 4], [1, 1, 1, 1], [1000, 20, 333, 1], [0]])
def test_parity_with_transcription(lengths):
    order = mixture_order(lengths)
    assert order.dtype == np.int64 and order.shape == (sum(lengths), 2)
    assert [tuple(r) for r in order.tolist()] == nanochat_index_map(lengths)


def test_other_seed():
    assert [tuple(r) for r in mixture_order([10, 20], seed=7).tolist()] == nanochat_index_map([10, 20], seed=7)
    assert not np.array_equal(mixture_order([10, 20], seed=7), mixture_order([10, 20]))


def test_task_listed_twice_appears_twice_in_different_places():
    # nanochat's identity task is listed twice (2 epochs): each conversation occurs once per listing
    lengths = [50, 8, 8, 30]
    order = mixture_order(lengths)
    assert [tuple(r) for r in order.tolist()] == nanochat_index_map(lengths)
    for t, n in enumerate(lengths):
        assert sorted(order[order[:, 0] == t, 1].tolist()) == list(range(n))
    first = {li: k for k, (ti, li) in enumerate(order.tolist()) if ti == 1}
    second = {li: k for k, (ti, li) in enumerate(order.tolist()) if ti == 2}
    assert first.keys() == second.keys() and any(first[i] != second[i] for i in first)


def test_nanochat_sft_size():
    # the moe3 train mixture (§3.14): SmolTalk, identity x2, MMLU x3, GSM8K x4, SimpleSpelling, SpellingBee
    lengths = [460_341, 1000, 1000] + [99_842] * 3 + [7473] * 4 + [200_000, 80_000]
    order = mixture_order(lengths)
    assert len(order) == 1_071_759
    expected = nanochat_index_map(lengths)
    assert np.array_equal(order, np.array(expected, dtype=np.int64))


def test_bad_lengths():
    with pytest.raises(ValueError, match=r"task_lengths\[1\]"):
        mixture_order([3, -1])
    with pytest.raises(ValueError):
        mixture_order([3, 2.0])
