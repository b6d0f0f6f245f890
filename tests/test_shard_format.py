"""The shard contract (design §5): round trip, zero-copy mmap, dtypes, refusals, multi-shard reads."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import pipeline.shard_format as sf
from pipeline.errors import SnapshotError
from pipeline.shard_format import ShardMeta, ShardReader, ShardRows, SplitReader, shard_filename, token_dtype, write_shard

BOS = 3


def make_meta(vocab_size=512, max_seq_len=31, split="train") -> ShardMeta:
    return ShardMeta(max_seq_len=max_seq_len, bos_id=BOS, vocab_size=vocab_size, tokenizer_fingerprint="fp-abc",
                     split=split)


def make_rows(rng: np.random.Generator, n: int, meta: ShardMeta, first_id: int = 0) -> ShardRows:
    """n BOS-aligned rows of 1-4 documents each, padded with masked BOS, every row with a supervised target."""
    row_len = meta.row_len
    tokens = np.full((n, row_len), meta.bos_id, dtype=np.int64)
    mask = np.zeros((n, row_len), dtype=np.uint8)
    lens, per_row = [], []
    for r in range(n):
        k = int(rng.integers(1, 5))
        cuts = np.sort(rng.choice(np.arange(2, row_len + 1), size=k, replace=False))
        doc_lens = np.diff(np.concatenate([[0], cuts]))
        pos = 0
        for length in doc_lens:
            tokens[r, pos] = meta.bos_id
            tokens[r, pos + 1:pos + length] = rng.integers(0, meta.vocab_size, length - 1)
            mask[r, pos + 1:pos + length] = rng.integers(0, 2, length - 1)
            pos += length
        mask[r, rng.integers(1, pos)] = 1  # at least one supervised target, never at position 0
        lens.extend(doc_lens.tolist())
        per_row.append(k)
    n_docs = len(lens)
    return ShardRows(tokens=tokens.astype(token_dtype(meta.vocab_size)), mask=mask,
                     doc_offsets=np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32),
                     doc_lens=np.array(lens, dtype=np.int32),
                     doc_ids=np.arange(first_id, first_id + n_docs, dtype=np.int64) * 7 + 1_000_000_000_000,
                     doc_tasks=rng.integers(0, 9, n_docs).astype(np.int16))


def test_round_trip_every_column_and_metadata(tmp_path):
    meta = make_meta()
    rows = make_rows(np.random.default_rng(0), 12, meta)
    path = tmp_path / shard_filename("train", 0, 1)
    nbytes = write_shard(path, rows, meta)
    assert path.name == "train-00000-of-00001.arrow"
    assert nbytes == path.stat().st_size > rows.tokens.nbytes + rows.mask.nbytes  # uncompressed

    r = ShardReader(path)
    assert r.meta == meta and r.num_rows == 12
    assert r.tokens.dtype == np.uint16 and r.tokens.shape == (12, 32)
    np.testing.assert_array_equal(r.tokens, rows.tokens)
    np.testing.assert_array_equal(r.mask, rows.mask)
    np.testing.assert_array_equal(r.doc_offsets, rows.doc_offsets)
    np.testing.assert_array_equal(r.doc_lens, rows.doc_lens)
    np.testing.assert_array_equal(r.doc_ids, rows.doc_ids)
    np.testing.assert_array_equal(r.doc_tasks, rows.doc_tasks)
    np.testing.assert_array_equal(r.n_supervised, rows.mask.sum(axis=1))
    assert (r.doc_lens.dtype, r.doc_ids.dtype, r.doc_tasks.dtype, r.n_supervised.dtype) == (
        np.int32, np.int64, np.int16, np.int32)
    for i in range(12):
        a, b = rows.doc_offsets[i], rows.doc_offsets[i + 1]
        lens, ids, tasks = r.row_docs(i)
        assert lens.tolist() == rows.doc_lens[a:b].tolist()
        assert ids.tolist() == rows.doc_ids[a:b].tolist()
        assert tasks.tolist() == rows.doc_tasks[a:b].tolist()

    # what a reader that knows only design §5 sees, through plain pyarrow
    with pa.memory_map(str(path)) as src:
        f = pa.ipc.open_file(src)
        assert f.num_record_batches == 1
        schema = f.schema
        md = {k.decode(): v.decode() for k, v in schema.metadata.items()}
        assert md["nanosft.format_version"] == str(sf.FORMAT_VERSION)
        assert md["nanosft.max_seq_len"] == "31" and md["nanosft.bos_id"] == str(BOS)
        assert md["nanosft.vocab_size"] == "512" and md["nanosft.tokenizer_fingerprint"] == "fp-abc"
        assert schema.names == ["tokens", "mask", "doc_lens", "doc_ids", "doc_tasks", "n_supervised"]
        assert schema.field("tokens").type == pa.list_(pa.uint16(), 32)
        assert schema.field("mask").type == pa.list_(pa.uint8(), 32)
        assert schema.field("doc_lens").type == pa.list_(pa.int32())
        assert schema.field("doc_ids").type == pa.list_(pa.int64())
        assert schema.field("doc_tasks").type == pa.list_(pa.int16())
        assert schema.field("n_supervised").type == pa.int32()
        table = f.read_all()
        assert table.column("doc_lens").to_pylist()[3] == r.row_docs(3)[0].tolist()


def test_tokens_and_mask_are_zero_copy_views_of_the_mapped_file(tmp_path):
    meta = make_meta()
    rows = make_rows(np.random.default_rng(1), 6, meta)
    path = tmp_path / "train-00000-of-00001.arrow"
    write_shard(path, rows, meta)
    r = ShardReader(path)
    for arr in (r.tokens, r.mask):
        assert not arr.flags.owndata and not arr.flags.writeable
        base, chain = arr, []
        while base is not None:
            chain.append(type(base))
            base = getattr(base, "base", None)
        assert any(issubclass(t, pa.Array) for t in chain)  # backed by Arrow memory, not a numpy copy

    # the views read through to the file: patch bytes on disk, the already-open arrays see them
    raw = path.read_bytes()
    tok_off = raw.find(rows.tokens.tobytes())
    mask_off = raw.find(rows.mask.tobytes())
    assert tok_off > 0 and mask_off > 0
    new_tok = (int(rows.tokens[2, 5]) + 1) % meta.vocab_size
    with open(path, "r+b") as f:
        f.seek(tok_off + (2 * meta.row_len + 5) * 2)
        f.write(np.array([new_tok], dtype=np.uint16).tobytes())
        f.seek(mask_off + 4 * meta.row_len + 7)
        f.write(bytes([7]))
        f.flush()
        os.fsync(f.fileno())
    assert int(r.tokens[2, 5]) == new_tok
    assert int(r.mask[4, 7]) == 7


@pytest.mark.parametrize("vocab_size, dtype, arrow_type", [
    (512, np.uint16, pa.uint16()), (65536, np.uint16, pa.uint16()),
    (65537, np.uint32, pa.uint32()), (200_000, np.uint32, pa.uint32())])
def test_token_dtype_follows_the_vocab(tmp_path, vocab_size, dtype, arrow_type):
    assert token_dtype(vocab_size) == dtype
    meta = make_meta(vocab_size=vocab_size)
    rows = make_rows(np.random.default_rng(2), 4, meta)
    top = vocab_size - 1
    tokens = rows.tokens.astype(dtype)
    tokens[0, -1] = top  # the largest id survives the round trip
    rows = ShardRows(tokens=tokens, mask=rows.mask, doc_offsets=rows.doc_offsets, doc_lens=rows.doc_lens,
                     doc_ids=rows.doc_ids, doc_tasks=rows.doc_tasks)
    path = tmp_path / "val-00000-of-00001.arrow"
    write_shard(path, rows, meta)
    r = ShardReader(path)
    assert r.tokens.dtype == dtype and int(r.tokens[0, -1]) == top
    assert pa.ipc.open_file(pa.memory_map(str(path))).schema.field("tokens").type.value_type == arrow_type


def test_a_row_without_a_supervised_target_is_refused(tmp_path):
    meta = make_meta()
    rows = make_rows(np.random.default_rng(3), 5, meta)
    mask = rows.mask.copy()
    mask[3] = 0
    bad = ShardRows(tokens=rows.tokens, mask=mask, doc_offsets=rows.doc_offsets, doc_lens=rows.doc_lens,
                    doc_ids=rows.doc_ids, doc_tasks=rows.doc_tasks)
    with pytest.raises(ValueError, match="row 3 has no supervised target"):
        write_shard(tmp_path / "train-00000-of-00001.arrow", bad, meta)
    assert list(tmp_path.iterdir()) == []


def test_rows_of_the_wrong_length_are_refused(tmp_path):
    meta = make_meta()
    rows = make_rows(np.random.default_rng(4), 2, make_meta(max_seq_len=15))
    with pytest.raises(ValueError, match="expected"):
        write_shard(tmp_path / "x.arrow", rows, meta)
    assert list(tmp_path.iterdir()) == []


def test_split_reader_gathers_across_shard_boundaries(tmp_path):
    meta = make_meta()
    rng = np.random.default_rng(5)
    parts, paths, first = [], [], 0
    for i, n in enumerate([5, 3, 4]):
        rows = make_rows(rng, n, meta, first_id=first)
        first += len(rows.doc_lens)
        paths.append(tmp_path / shard_filename("train", i, 3))
        write_shard(paths[-1], rows, meta)
        parts.append(rows)
    all_tokens = np.concatenate([p.tokens for p in parts])
    all_mask = np.concatenate([p.mask for p in parts])

    reader = SplitReader(paths)
    assert reader.num_rows == 12 and reader.meta == meta
    want = np.array([4, 5, 7, 8, 0, 11, 5])  # both sides of both boundaries, out of order, a repeat
    tokens = np.zeros((len(want), meta.row_len), dtype=np.uint16)
    mask = np.zeros((len(want), meta.row_len), dtype=np.uint8)
    reader.gather(want, tokens, mask)
    np.testing.assert_array_equal(tokens, all_tokens[want])
    np.testing.assert_array_equal(mask, all_mask[want])
    assert reader.n_supervised(want) == int(all_mask[want].sum())

    shard, local = reader.locate(8)
    assert (shard.path, local) == (paths[2], 0)
    row_ids = [p.doc_ids[p.doc_offsets[r]:p.doc_offsets[r + 1]].tolist() for p in parts for r in range(len(p.tokens))]
    assert [reader.row_docs(g)[1].tolist() for g in range(12)] == row_ids
    with pytest.raises(IndexError):
        reader.locate(12)


def test_split_reader_refuses_shards_that_disagree(tmp_path):
    a, b = make_meta(), make_meta(max_seq_len=15)
    write_shard(tmp_path / "a.arrow", make_rows(np.random.default_rng(6), 2, a), a)
    write_shard(tmp_path / "b.arrow", make_rows(np.random.default_rng(7), 2, b), b)
    with pytest.raises(SnapshotError, match="disagree"):
        SplitReader([tmp_path / "a.arrow", tmp_path / "b.arrow"])
    with pytest.raises(SnapshotError, match="no shards"):
        SplitReader([])


def _write_raw(path: Path, batch: pa.RecordBatch, batches: int = 1) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as w:
        for _ in range(batches):
            w.write_batch(batch)


def _good_batch(meta: ShardMeta) -> pa.RecordBatch:
    return sf._record_batch(make_rows(np.random.default_rng(8), 3, meta), meta)


def test_wrong_format_version_is_refused_naming_the_file(tmp_path):
    meta = make_meta()
    batch = _good_batch(meta)
    md = dict(batch.schema.metadata)
    md[b"nanosft.format_version"] = str(sf.FORMAT_VERSION + 1).encode()
    path = tmp_path / "train-00000-of-00001.arrow"
    _write_raw(path, batch.replace_schema_metadata(md))
    with pytest.raises(SnapshotError, match="format version") as e:
        ShardReader(path)
    assert e.value.file == str(path) and str(path) in str(e.value)


def test_an_arrow_file_without_nanosft_metadata_is_refused(tmp_path):
    path = tmp_path / "plain.arrow"
    _write_raw(path, _good_batch(make_meta()).replace_schema_metadata({}))
    with pytest.raises(SnapshotError, match="not a nanosft shard") as e:
        ShardReader(path)
    assert e.value.file == str(path)


def test_not_an_arrow_file_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "train-00000-of-00001.arrow"
    path.write_bytes(b"this is not an arrow file\n" * 10)
    with pytest.raises(SnapshotError, match="not a readable Arrow IPC file") as e:
        ShardReader(path)
    assert e.value.file == str(path)
    missing = tmp_path / "nope.arrow"
    with pytest.raises(SnapshotError, match="missing") as e:
        ShardReader(missing)
    assert e.value.file == str(missing)


def test_wrong_schema_is_refused_naming_the_file(tmp_path):
    meta = make_meta()
    good = _good_batch(meta)
    # tokens stored as int32 instead of uint16, metadata intact
    tokens = pa.FixedSizeListArray.from_arrays(good.column("tokens").values.cast(pa.int32()), meta.row_len)
    cols = [tokens] + [good.column(i) for i in range(1, good.num_columns)]
    bad = pa.RecordBatch.from_arrays(cols, names=good.schema.names).replace_schema_metadata(good.schema.metadata)
    path = tmp_path / "train-00000-of-00001.arrow"
    _write_raw(path, bad)
    with pytest.raises(SnapshotError, match="schema is") as e:
        ShardReader(path)
    assert e.value.file == str(path)

    # a column missing
    dropped = pa.RecordBatch.from_arrays([good.column(i) for i in range(5)], names=good.schema.names[:5]
                                         ).replace_schema_metadata(good.schema.metadata)
    _write_raw(path, dropped)
    with pytest.raises(SnapshotError) as e:
        ShardReader(path)
    assert e.value.file == str(path)

    # rows of another length than the metadata says
    _write_raw(path, _good_batch(make_meta(max_seq_len=15)).replace_schema_metadata(good.schema.metadata))
    with pytest.raises(SnapshotError, match="schema is"):
        ShardReader(path)

    # two record batches: the single contiguous view would not exist
    _write_raw(path, good, batches=2)
    with pytest.raises(SnapshotError, match="1 record batch") as e:
        ShardReader(path)
    assert e.value.file == str(path)


def test_write_is_atomic(tmp_path, monkeypatch):
    meta = make_meta()
    path = tmp_path / "train-00000-of-00001.arrow"
    old = make_rows(np.random.default_rng(9), 4, meta)
    write_shard(path, old, meta)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    before = path.read_bytes()

    # a write that dies before the rename leaves the old file intact and no temp file
    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(sf.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        write_shard(path, make_rows(np.random.default_rng(10), 4, meta), meta)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert path.read_bytes() == before
    np.testing.assert_array_equal(ShardReader(path).tokens, old.tokens)
