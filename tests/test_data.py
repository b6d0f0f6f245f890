"""trainer/data.py: the row schedule (pure arithmetic over step, rank, micro-step) and the step loader,
checked against rows read straight from hand-written shards (design §5, §7)."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from pipeline.shard_format import ShardMeta, ShardRows, SplitReader, write_shard
from trainer.data import RowSchedule, StepLoader, doc_ids_for_rows, val_batches

CPU = torch.device("cpu")


# --- RowSchedule ------------------------------------------------------------------------------

@pytest.mark.parametrize("shuffle", [None, 7])
def test_step_rows_independent_of_world_size(shuffle):
    """At equal rows per step, (world 1, accum 2) and (world 2, accum 1) see the same rows in a step,
    and the union over ranks and micro-steps is exactly the step's block, each row once."""
    B = 3
    sched = RowSchedule(num_rows=29, rows_per_step=2 * B, shuffle_seed=shuffle)
    for step in range(12):  # crosses several epoch boundaries
        block = sched.step_rows(step)
        one_rank = np.concatenate([sched.micro_rows(step, 0, 1, m, B) for m in range(2)])
        two_ranks = np.concatenate([sched.micro_rows(step, r, 2, 0, B) for r in range(2)])
        np.testing.assert_array_equal(one_rank, block)
        np.testing.assert_array_equal(two_ranks, block)
        # four micro-batches over 2 ranks x 2 accum at rows_per_step = 4B
        big = RowSchedule(29, 4 * B, shuffle)
        parts = [big.micro_rows(step, r, 2, m, B) for m in range(2) for r in range(2)]
        assert all(len(p) == B for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), big.step_rows(step))


def test_steps_tile_the_epoch_and_top_up_from_the_next():
    sched = RowSchedule(num_rows=10, rows_per_step=4)
    assert sched.steps_per_epoch == 3
    rows = [sched.step_rows(s) for s in range(5)]
    np.testing.assert_array_equal(np.concatenate(rows[:2]), np.arange(8))
    np.testing.assert_array_equal(rows[2], [8, 9, 0, 1])  # the last step of epoch 0 tops up from epoch 1
    np.testing.assert_array_equal(np.concatenate(rows[3:]), np.arange(2, 10))  # epoch 1 continues where it was
    assert RowSchedule(12, 4).steps_per_epoch == 3
    assert RowSchedule(3, 8).steps_per_epoch == 1
    np.testing.assert_array_equal(RowSchedule(3, 8).step_rows(0), [0, 1, 2, 0, 1, 2, 0, 1])


def test_shuffle_is_a_deterministic_permutation_per_epoch():
    a, b = RowSchedule(50, 7, shuffle_seed=3), RowSchedule(50, 7, shuffle_seed=3)
    orders = [a.epoch_order(e) for e in range(3)]
    for e, order in enumerate(orders):
        np.testing.assert_array_equal(np.sort(order), np.arange(50))
        np.testing.assert_array_equal(order, b.epoch_order(e))
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(orders[0], np.arange(50))
    assert not np.array_equal(orders[0], RowSchedule(50, 7, shuffle_seed=4).epoch_order(0))
    # the stream walks epoch 0's order, then epoch 1's: the first 8 steps hold each row once, then epoch 1
    stream = np.concatenate([a.step_rows(s) for s in range(a.steps_per_epoch)])
    np.testing.assert_array_equal(stream[:50], orders[0])
    np.testing.assert_array_equal(stream[50:], orders[1][:len(stream) - 50])


def test_epoch_at():
    sched = RowSchedule(num_rows=10, rows_per_step=4)
    assert sched.epoch_at(0) == 0.0
    assert sched.epoch_at(1) == pytest.approx(0.4)
    assert sched.epoch_at(sched.steps_per_epoch) == pytest.approx(1.2)
    assert sched.epoch_at(5) == pytest.approx(2.0)


# --- hand-written shards ----------------------------------------------------------------------

VOCAB = 65000  # fits uint16, and most ids are > 32767: they must survive the int16 transport
SEQ = 12


def _rows(rng: np.random.Generator, n: int, first_doc: int) -> ShardRows:
    row_len = SEQ + 1
    tokens = rng.integers(0, VOCAB, size=(n, row_len))
    tokens[:, 0] = VOCAB - 1  # an id far above 32767 at a fixed place
    mask = (rng.random((n, row_len)) < 0.5).astype(np.uint8)
    mask[:, 0] = 0
    mask[np.arange(n), rng.integers(1, row_len, size=n)] = 1  # never a row without a supervised target
    lens, offsets = [], [0]
    for _ in range(n):
        cuts = np.sort(rng.choice(np.arange(1, row_len), size=rng.integers(0, 3), replace=False))
        parts = np.diff(np.concatenate([[0], cuts, [rng.integers(cuts[-1] + 1 if len(cuts) else 1, row_len + 1)]]))
        lens.extend(parts.tolist())
        offsets.append(offsets[-1] + len(parts))
    n_docs = offsets[-1]
    return ShardRows(tokens=tokens, mask=mask, doc_offsets=np.array(offsets),
                     doc_lens=np.array(lens), doc_ids=np.arange(first_doc, first_doc + n_docs),
                     doc_tasks=np.zeros(n_docs, dtype=np.int16))


@pytest.fixture(scope="module")
def reader(tmp_path_factory) -> SplitReader:
    """Two train shards (7 + 6 rows) with vocab 65000, written through the shard contract."""
    d = tmp_path_factory.mktemp("shards")
    meta = ShardMeta(max_seq_len=SEQ, bos_id=VOCAB - 1, vocab_size=VOCAB, tokenizer_fingerprint="test", split="train")
    rng = np.random.default_rng(0)
    paths = [d / "train-00000-of-00002.arrow", d / "train-00001-of-00002.arrow"]
    write_shard(paths[0], _rows(rng, 7, 0), meta)
    write_shard(paths[1], _rows(rng, 6, 100), meta)
    r = SplitReader(paths)
    assert r.shards[0].tokens.dtype == np.uint16 and r.num_rows == 13
    assert (r.shards[0].tokens > 32767).any()
    return r


def _row(reader: SplitReader, row: int) -> tuple[np.ndarray, np.ndarray]:
    shard, local = reader.locate(int(row))
    return shard.tokens[local].astype(np.int64), shard.mask[local]


def _expected_micro(reader, rows):
    toks, masks = zip(*(_row(reader, r) for r in rows))
    toks, masks = np.stack(toks), np.stack(masks)
    return toks[:, :-1], np.where(masks[:, 1:] == 1, toks[:, 1:], -1)


def _drain(loader: StepLoader, n: int) -> list:
    try:
        return [loader.next() for _ in range(n)]
    finally:
        loader.close()


@pytest.mark.parametrize("world,accum", [(1, 2), (2, 1)])
def test_loader_batches_match_the_shards(reader, world, accum):
    B = 2
    sched = RowSchedule(reader.num_rows, B * world * accum, shuffle_seed=5)
    for rank in range(world):
        loader = StepLoader(reader, sched, rank=rank, world_size=world, grad_accum=accum, device_batch=B,
                            device=CPU, start_step=0)
        for step, batch in enumerate(_drain(loader, 9)):  # 9 steps x 4 rows > 2 epochs of 13 rows
            assert batch.step == step
            assert batch.n_supervised == sum(int(_row(reader, r)[1].sum()) for r in sched.step_rows(step))
            assert batch.doc_ids is None
            for m in range(accum):
                rows = sched.micro_rows(step, rank, world, m, B)
                np.testing.assert_array_equal(batch.rows[m], rows)
                x, y, docs = batch.micro(m)
                want_x, want_y = _expected_micro(reader, rows)
                assert x.dtype == torch.int32 and y.dtype == torch.int64 and docs is None
                np.testing.assert_array_equal(x.numpy(), want_x)
                np.testing.assert_array_equal(y.numpy(), want_y)
                assert x.max() > 32767 and x.min() >= 0


def test_step_rows_same_for_any_world_size(reader):
    """A step's rows, gathered over all ranks, are the same for (world 1, accum 2) and (world 2, accum 1)."""
    B = 2
    sched = RowSchedule(reader.num_rows, 4)
    one = _drain(StepLoader(reader, sched, rank=0, world_size=1, grad_accum=2, device_batch=B, device=CPU,
                            start_step=0), 4)
    two = [_drain(StepLoader(reader, sched, rank=r, world_size=2, grad_accum=1, device_batch=B, device=CPU,
                             start_step=0), 4) for r in range(2)]
    for s in range(4):
        a = torch.cat([one[s].micro(m)[1] for m in range(2)])
        b = torch.cat([two[r][s].micro(0)[1] for r in range(2)])
        assert torch.equal(a, b)
        assert one[s].n_supervised == two[0][s].n_supervised == two[1][s].n_supervised


def test_doc_ids_follow_doc_lens(reader):
    B = 3
    sched = RowSchedule(reader.num_rows, B)
    loader = StepLoader(reader, sched, rank=0, world_size=1, grad_accum=1, device_batch=B, device=CPU,
                        start_step=0, doc_mask=True)
    seen_multi = False
    for batch in _drain(loader, 5):
        _, _, docs = batch.micro(0)
        assert docs.shape == (B, SEQ) and docs.dtype == torch.int32
        full = batch.doc_ids[0].numpy()
        for i, r in enumerate(batch.rows[0]):
            lens = reader.row_docs(int(r))[0]
            seen_multi |= len(lens) > 1
            pos = 0
            for d, n in enumerate(lens):
                assert (full[i, pos:pos + n] == d).all()
                pos += n
            assert (full[i, pos:] == len(lens)).all()  # padding is a document of its own
    assert seen_multi
    np.testing.assert_array_equal(doc_ids_for_rows(reader, np.array([0]), SEQ + 1)[0],
                                  np.repeat(np.arange(len(reader.row_docs(0)[0]) + 1),
                                            list(reader.row_docs(0)[0]) + [SEQ + 1 - sum(reader.row_docs(0)[0])]))


def test_loader_started_at_step_s_equals_advancing(reader):
    sched = RowSchedule(reader.num_rows, 4, shuffle_seed=1)
    kw = dict(rank=0, world_size=1, grad_accum=2, device_batch=2, device=CPU, doc_mask=True)
    full = _drain(StepLoader(reader, sched, start_step=0, **kw), 8)
    late = _drain(StepLoader(reader, sched, start_step=5, **kw), 3)
    for a, b in zip(full[5:], late):
        assert a.step == b.step
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask) and torch.equal(a.doc_ids, b.doc_ids)
        assert a.n_supervised == b.n_supervised
        np.testing.assert_array_equal(a.rows, b.rows)


def test_batches_do_not_alias_the_reused_buffers(reader):
    """The loader recycles its buffers; batches already handed out must keep their values."""
    sched = RowSchedule(reader.num_rows, 2)
    loader = StepLoader(reader, sched, rank=0, world_size=1, grad_accum=1, device_batch=2, device=CPU,
                        start_step=0, num_buffers=2)
    batches = _drain(loader, 6)
    for b in batches:
        np.testing.assert_array_equal(b.micro(0)[1].numpy(), _expected_micro(reader, b.rows[0])[1])


def test_close_stops_the_blocked_producer(reader):
    sched = RowSchedule(reader.num_rows, 2)
    for consumed in (0, 2):
        loader = StepLoader(reader, sched, rank=0, world_size=1, grad_accum=1, device_batch=2, device=CPU,
                            start_step=0)
        for _ in range(consumed):
            loader.next()
        time.sleep(0.05)  # let the producer fill ahead and block on the full queue
        loader.close()
        # a producer left blocked on the full queue would never end; 10 s only bounds a loaded CI machine
        loader._thread.join(timeout=10)
        assert not loader._thread.is_alive()


def test_loader_errors_reach_the_training_thread(reader):
    """A schedule that asks for rows the split lacks fails in next(), not silently in the thread."""
    sched = RowSchedule(reader.num_rows + 5, 4)
    loader = StepLoader(reader, sched, rank=0, world_size=1, grad_accum=1, device_batch=4, device=CPU,
                        start_step=3)  # step 3 holds rows 12..15; 13..15 do not exist
    try:
        with pytest.raises(IndexError):
            loader.next()
    finally:
        loader.close()


def test_val_batches_are_the_first_rows_every_time(reader):
    B, world = 2, 2
    for rank in range(world):
        got = list(val_batches(reader, rank=rank, world_size=world, device_batch=B, steps=3, device=CPU))
        again = list(val_batches(reader, rank=rank, world_size=world, device_batch=B, steps=3, device=CPU))
        assert len(got) == 3
        for s, ((x, y), (x2, y2)) in enumerate(zip(got, again)):
            rows = np.arange(s * B * world + rank * B, s * B * world + (rank + 1) * B)
            want_x, want_y = _expected_micro(reader, rows)
            np.testing.assert_array_equal(x.numpy(), want_x)
            np.testing.assert_array_equal(y.numpy(), want_y)
            assert x.dtype == torch.int32 and torch.equal(x, x2) and torch.equal(y, y2)
