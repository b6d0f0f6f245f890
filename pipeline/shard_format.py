"""The shard contract (design §5): the one owner of the on-disk row format.

A shard is an Arrow IPC *file*, uncompressed, holding ONE record batch, so that
`pyarrow.memory_map` hands out a single contiguous (rows, max_seq_len + 1) numpy view
of `tokens` and `mask` without copying. The pipeline writes shards through
`write_shard`; the trainer and the tools read them through `ShardReader` /
`SplitReader`. Nothing else in the project touches Arrow.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from pipeline.cli import with_path
from pipeline.errors import SnapshotError
from pipeline.tempfiles import temp_path

FORMAT_VERSION = 1
COLUMNS = ("tokens", "mask", "doc_lens", "doc_ids", "doc_tasks", "n_supervised")
_META_PREFIX = "nanosft."


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (halves the bytes of the largest column), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_filename(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.arrow"


@dataclass(frozen=True)
class ShardMeta:
    """Schema metadata: what a reader must check before trusting the token ids."""

    max_seq_len: int
    bos_id: int
    vocab_size: int
    tokenizer_fingerprint: str
    split: str

    @property
    def row_len(self) -> int:
        return self.max_seq_len + 1

    def to_arrow(self) -> dict[bytes, bytes]:
        fields = {"format_version": FORMAT_VERSION, **self.__dict__}
        return {(_META_PREFIX + k).encode(): str(v).encode() for k, v in fields.items()}

    @classmethod
    def from_arrow(cls, metadata: dict[bytes, bytes] | None, path: Path) -> "ShardMeta":
        md = {k.decode(): v.decode() for k, v in (metadata or {}).items()}
        get = lambda key: md.get(_META_PREFIX + key)  # noqa: E731
        version = get("format_version")
        if version is None:
            raise SnapshotError("not a nanosft shard (no nanosft.format_version in the schema metadata)", file=path)
        if int(version) != FORMAT_VERSION:
            raise SnapshotError(f"shard format version {version}, this nanosft reads {FORMAT_VERSION}; "
                                "rebuild the snapshot with this version", file=path)
        try:
            return cls(max_seq_len=int(get("max_seq_len")), bos_id=int(get("bos_id")),
                       vocab_size=int(get("vocab_size")), tokenizer_fingerprint=str(get("tokenizer_fingerprint")),
                       split=str(get("split")))
        except (TypeError, ValueError) as e:
            raise SnapshotError(f"bad schema metadata: {e}", file=path) from None


def shard_schema(meta: ShardMeta) -> pa.Schema:
    row_len = meta.row_len
    tok = pa.from_numpy_dtype(token_dtype(meta.vocab_size))
    return pa.schema([
        pa.field("tokens", pa.list_(tok, row_len), nullable=False),
        pa.field("mask", pa.list_(pa.uint8(), row_len), nullable=False),
        pa.field("doc_lens", pa.list_(pa.int32()), nullable=False),
        pa.field("doc_ids", pa.list_(pa.int64()), nullable=False),
        pa.field("doc_tasks", pa.list_(pa.int16()), nullable=False),
        pa.field("n_supervised", pa.int32(), nullable=False),
    ], metadata=meta.to_arrow())


@dataclass(frozen=True)
class ShardRows:
    """Materialised rows of one shard. Per-document columns are flat arrays split by `doc_offsets`."""

    tokens: np.ndarray        # (n, row_len) token dtype
    mask: np.ndarray          # (n, row_len) uint8: 1 where that position is a supervised target
    doc_offsets: np.ndarray   # int32 (n + 1,): row r's documents are [doc_offsets[r], doc_offsets[r+1])
    doc_lens: np.ndarray      # int32 (n_docs,)
    doc_ids: np.ndarray       # int64 (n_docs,)
    doc_tasks: np.ndarray     # int16 (n_docs,)

    @property
    def n_supervised(self) -> np.ndarray:
        return self.mask.sum(axis=1, dtype=np.int64).astype(np.int32)


def _record_batch(rows: ShardRows, meta: ShardMeta, allow_unsupervised: bool = False) -> pa.RecordBatch:
    n, row_len = rows.tokens.shape
    if row_len != meta.row_len or rows.mask.shape != rows.tokens.shape:
        raise ValueError(f"rows are {rows.tokens.shape}/{rows.mask.shape}, expected (*, {meta.row_len})")
    schema = shard_schema(meta)
    tokens = np.ascontiguousarray(rows.tokens, dtype=token_dtype(meta.vocab_size)).reshape(-1)
    mask = np.ascontiguousarray(rows.mask, dtype=np.uint8).reshape(-1)
    offsets = pa.array(np.asarray(rows.doc_offsets, dtype=np.int32))
    n_supervised = rows.n_supervised
    if n and n_supervised.min() <= 0 and not allow_unsupervised:
        raise ValueError(f"row {int(np.argmin(n_supervised))} has no supervised target")
    arrays = [
        pa.FixedSizeListArray.from_arrays(pa.array(tokens), row_len),
        pa.FixedSizeListArray.from_arrays(pa.array(mask), row_len),
        pa.ListArray.from_arrays(offsets, pa.array(np.asarray(rows.doc_lens, dtype=np.int32))),
        pa.ListArray.from_arrays(offsets, pa.array(np.asarray(rows.doc_ids, dtype=np.int64))),
        pa.ListArray.from_arrays(offsets, pa.array(np.asarray(rows.doc_tasks, dtype=np.int16))),
        pa.array(n_supervised),
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def write_shard(path: Path, rows: ShardRows, meta: ShardMeta, allow_unsupervised: bool = False) -> int:
    """Write one shard atomically (temp name, fsync, rename); returns its size in bytes.

    A row without a supervised target is refused unless `allow_unsupervised` (only `overlong = "nanochat"`
    snapshots, which keep upstream's rows exactly, set it)."""
    path = Path(path)
    batch = _record_batch(rows, meta, allow_unsupervised)
    tmp = temp_path(path)
    try:
        with pa.OSFile(str(tmp), "wb") as sink:
            with pa.ipc.new_file(sink, batch.schema) as writer:
                writer.write_batch(batch)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # pyarrow's errors (a full disk) do not name the file
        raise with_path(e, path) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path.stat().st_size


class ShardReader:
    """Zero-copy, memory-mapped view of one shard.

    `tokens` and `mask` are numpy views straight into the mapped file: the first copy
    happens when the trainer gathers rows into its pinned buffer.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise SnapshotError("shard file is missing", file=self.path)
        try:
            self._source = pa.memory_map(str(self.path), "r")
            reader = pa.ipc.open_file(self._source)
            if reader.num_record_batches != 1:
                raise SnapshotError(f"expected 1 record batch, found {reader.num_record_batches}", file=self.path)
            batch = reader.get_batch(0)
        except (pa.ArrowException, OSError) as e:  # a damaged footer reads as an OSError from pyarrow
            raise SnapshotError(f"not a readable Arrow IPC file ({e}): damaged; rebuild or re-import the snapshot",
                                file=self.path) from None
        self.meta = ShardMeta.from_arrow(reader.schema.metadata, self.path)
        expected = shard_schema(self.meta)
        if not reader.schema.remove_metadata().equals(expected.remove_metadata()):
            raise SnapshotError(f"schema is\n{reader.schema.remove_metadata()}\nexpected\n{expected.remove_metadata()}",
                                file=self.path)
        self.num_rows = batch.num_rows
        row_len = self.meta.row_len
        cols = {name: batch.column(name) for name in COLUMNS}
        self.tokens = _fixed_values(cols["tokens"]).reshape(self.num_rows, row_len)
        self.mask = _fixed_values(cols["mask"]).reshape(self.num_rows, row_len)
        self.n_supervised = cols["n_supervised"].to_numpy(zero_copy_only=True)
        self.doc_offsets = _list_offsets(cols["doc_lens"])
        self.doc_lens = _list_values(cols["doc_lens"])
        self.doc_ids = _list_values(cols["doc_ids"])
        self.doc_tasks = _list_values(cols["doc_tasks"])

    def row_docs(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(doc_lens, doc_ids, doc_tasks) of row r."""
        a, b = self.doc_offsets[r], self.doc_offsets[r + 1]
        return self.doc_lens[a:b], self.doc_ids[a:b], self.doc_tasks[a:b]


def _fixed_values(arr: pa.FixedSizeListArray) -> np.ndarray:
    if arr.offset != 0 or arr.null_count:
        raise SnapshotError("fixed-size list column has an offset or nulls")
    return arr.values.to_numpy(zero_copy_only=True)


def _list_offsets(arr: pa.ListArray) -> np.ndarray:
    return arr.offsets.to_numpy(zero_copy_only=True)


def _list_values(arr: pa.ListArray) -> np.ndarray:
    return arr.values.to_numpy(zero_copy_only=True)


class SplitReader:
    """The shards of one split, in order, addressed by a global row index."""

    def __init__(self, paths: Sequence[str | Path]):
        if not paths:
            raise SnapshotError("split has no shards")
        self.shards = [ShardReader(p) for p in paths]
        metas = {(s.meta.max_seq_len, s.meta.bos_id, s.meta.vocab_size, s.meta.tokenizer_fingerprint, s.meta.split)
                 for s in self.shards}
        if len(metas) != 1:
            raise SnapshotError(f"shards disagree on their metadata: {sorted(metas)}")
        self.meta = self.shards[0].meta
        self.row_starts = np.cumsum([0] + [s.num_rows for s in self.shards])
        self.num_rows = int(self.row_starts[-1])
        self._n_supervised = np.concatenate([s.n_supervised for s in self.shards]).astype(np.int64)

    def locate(self, row: int) -> tuple[ShardReader, int]:
        if not 0 <= row < self.num_rows:
            raise IndexError(f"row {row} out of range [0, {self.num_rows})")
        i = int(np.searchsorted(self.row_starts, row, side="right")) - 1
        return self.shards[i], row - int(self.row_starts[i])

    def gather(self, rows: np.ndarray, tokens_out: np.ndarray, mask_out: np.ndarray) -> None:
        """Copy the given global rows into preallocated (len(rows), row_len) buffers (e.g. pinned memory)."""
        rows = np.asarray(rows, dtype=np.int64)
        shard_idx = np.searchsorted(self.row_starts, rows, side="right") - 1
        for i in np.unique(shard_idx):
            sel = np.nonzero(shard_idx == i)[0]
            local = rows[sel] - self.row_starts[i]
            shard = self.shards[int(i)]
            tokens_out[sel] = shard.tokens[local]
            mask_out[sel] = shard.mask[local]

    def n_supervised(self, rows: np.ndarray) -> int:
        """Supervised targets in the given rows: the denominator of a step's loss."""
        return int(self._n_supervised[np.asarray(rows, dtype=np.int64)].sum())

    def row_docs(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        shard, local = self.locate(row)
        return shard.row_docs(local)
