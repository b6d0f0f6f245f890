"""Rows for (step, rank, micro-step), streamed from memory-mapped shards (design §7).

The epoch is a fixed list of rows, so the schedule is pure arithmetic: global step s owns
rows [s·R, (s+1)·R) of the row stream (R = device_batch × world × grad_accum), epoch after
epoch, each epoch in file order or a seeded permutation. A step's batch is therefore the
same set of rows whatever the world size at equal R, and resuming at step s needs only s.

Rows travel as stored (uint16/uint32 tokens, uint8 mask) from the mapped file straight into
pinned host buffers — the only copy before the device — then a non_blocking copy; inputs
and targets are derived on the device.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import SnapshotError
from pipeline.shard_format import SplitReader


@dataclass(frozen=True)
class RowSchedule:
    num_rows: int
    rows_per_step: int
    shuffle_seed: int | None = None  # None: file order (the packer already mixed the tasks)

    @property
    def steps_per_epoch(self) -> int:
        """Steps to see every row once; the last step of an epoch tops up from the next epoch."""
        return -(-self.num_rows // self.rows_per_step)

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self.shuffle_seed is None:
            return np.arange(self.num_rows, dtype=np.int64)
        return np.random.default_rng([self.shuffle_seed, epoch]).permutation(self.num_rows)

    def stream_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows at positions [start, stop) of the endless stream epoch 0, epoch 1, ..."""
        pos = np.arange(start, stop, dtype=np.int64)
        epoch, within = np.divmod(pos, self.num_rows)
        out = np.empty_like(pos)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = self.epoch_order(int(e))[within[sel]]
        return out

    def step_rows(self, step: int) -> np.ndarray:
        return self.stream_rows(step * self.rows_per_step, (step + 1) * self.rows_per_step)

    def micro_rows(self, step: int, rank: int, world_size: int, micro_step: int, device_batch: int) -> np.ndarray:
        """The rows of (step, rank, micro-step): micro-step-major, then rank, inside the step's block."""
        block = self.step_rows(step)
        start = (micro_step * world_size + rank) * device_batch
        return block[start:start + device_batch]

    def epoch_at(self, step: int) -> float:
        """Epochs completed (fractional) after `step` steps."""
        return step * self.rows_per_step / self.num_rows


def check_token_ids(reader: SplitReader, rows: np.ndarray, tokens: np.ndarray) -> None:
    """Refuse rows holding an id outside the vocabulary (a damaged shard): the embedding lookup would
    fail deep in the model with an IndexError, or silently read another row of a larger table."""
    vocab = reader.meta.vocab_size
    if tokens.size == 0 or int(tokens.max()) < vocab:
        return
    i = int(np.argmax((tokens >= vocab).any(axis=1)))
    shard, local = reader.locate(int(rows[i]))
    raise SnapshotError(f"row {local} holds token id {int(tokens[i].max())}, the vocabulary has {vocab}: the "
                        "shard is damaged; rebuild or re-import the snapshot (pipeline.verify finds such files)",
                        file=shard.path)


def doc_ids_for_rows(reader: SplitReader, rows: np.ndarray, row_len: int) -> np.ndarray:
    """Per position, the index of the packed conversation it belongs to (padding gets its own index)."""
    out = np.empty((len(rows), row_len), dtype=np.int32)
    for i, r in enumerate(rows):
        lens = reader.row_docs(int(r))[0]
        ids = np.repeat(np.arange(len(lens), dtype=np.int32), lens)
        out[i, :len(ids)] = ids
        out[i, len(ids):] = len(lens)
    return out


@dataclass
class StepBatch:
    """One optimizer step's micro-batches on the device."""

    step: int
    tokens: torch.Tensor          # (A, B, L) int16/int32 view of the stored ids
    mask: torch.Tensor            # (A, B, L) uint8
    doc_ids: torch.Tensor | None  # (A, B, L) int32 when --doc-mask
    n_supervised: int             # supervised targets in the whole step (all ranks, all micro-steps)
    rows: np.ndarray              # this rank's rows (A, B), for error reports

    def micro(self, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(inputs int32 (B, T), targets int64 (B, T) with -1 where not supervised, doc ids)."""
        tok = self.tokens[m]
        if tok.dtype == torch.int16:
            tok = tok.to(torch.int32) & 0xFFFF  # stored as uint16; int16 is only the transport type
        else:
            tok = tok.to(torch.int32)
        inputs = tok[:, :-1]
        targets = torch.where(self.mask[m, :, 1:].bool(), tok[:, 1:].long(), -1)
        docs = self.doc_ids[m, :, :-1] if self.doc_ids is not None else None
        return inputs, targets, docs


class StepLoader:
    """Background thread that fills pinned buffers one step ahead; the device copy is non_blocking."""

    def __init__(self, reader: SplitReader, schedule: RowSchedule, *, rank: int, world_size: int, grad_accum: int,
                 device_batch: int, device: torch.device, start_step: int, doc_mask: bool = False,
                 num_buffers: int = 3):
        self.reader, self.schedule = reader, schedule
        self.rank, self.world_size, self.grad_accum, self.device_batch = rank, world_size, grad_accum, device_batch
        self.device, self.doc_mask = torch.device(device), doc_mask
        row_len = reader.meta.row_len
        shape = (grad_accum, device_batch, row_len)
        pin = self.device.type == "cuda"
        np_tok = reader.shards[0].tokens.dtype
        self._tok_dtype = torch.int16 if np_tok == np.uint16 else torch.int32
        self._free: queue.Queue = queue.Queue()
        for _ in range(num_buffers):
            self._free.put({
                "tokens": torch.empty(shape, dtype=self._tok_dtype, pin_memory=pin),
                "mask": torch.empty(shape, dtype=torch.uint8, pin_memory=pin),
                "doc_ids": torch.empty(shape, dtype=torch.int32, pin_memory=pin) if doc_mask else None,
                "event": None,
            })
        self._ready: queue.Queue = queue.Queue(maxsize=1)
        self._step = start_step
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, daemon=True, name="nanosft-loader")
        self._thread.start()

    def _fill(self) -> None:
        step = self._step
        try:
            while not self._stop.is_set():
                buf = self._free.get()
                if buf["tokens"] is None or self._stop.is_set():
                    return
                if buf["event"] is not None:
                    buf["event"].synchronize()  # the previous device copy out of this buffer is done
                rows = np.stack([self.schedule.micro_rows(step, self.rank, self.world_size, m, self.device_batch)
                                 for m in range(self.grad_accum)])
                tok_np = buf["tokens"].numpy().view(self.reader.shards[0].tokens.dtype)
                mask_np = buf["mask"].numpy()
                self.reader.gather(rows.reshape(-1), tok_np.reshape(-1, tok_np.shape[-1]),
                                   mask_np.reshape(-1, mask_np.shape[-1]))
                check_token_ids(self.reader, rows.reshape(-1), tok_np.reshape(-1, tok_np.shape[-1]))
                if self.doc_mask:
                    buf["doc_ids"].numpy()[:] = doc_ids_for_rows(self.reader, rows.reshape(-1),
                                                                 tok_np.shape[-1]).reshape(tok_np.shape)
                n_sup = self.reader.n_supervised(self.schedule.step_rows(step))
                self._ready.put((step, rows, n_sup, buf))
                step += 1
        except BaseException as e:  # surface loader errors in the training thread
            self._ready.put(e)

    def next(self) -> StepBatch:
        item = self._ready.get()
        if isinstance(item, BaseException):
            raise item
        step, rows, n_sup, buf = item
        nb = self.device.type == "cuda"
        tokens = buf["tokens"].to(self.device, non_blocking=nb)
        mask = buf["mask"].to(self.device, non_blocking=nb)
        doc_ids = buf["doc_ids"].to(self.device, non_blocking=nb) if self.doc_mask else None
        if nb:
            buf["event"] = torch.cuda.Event()
            buf["event"].record()
        elif self.device.type == "cpu":  # .to(cpu) aliases the buffer: copy before handing it back
            tokens, mask = tokens.clone(), mask.clone()
            doc_ids = doc_ids.clone() if doc_ids is not None else None
        self._free.put(buf)
        return StepBatch(step=step, tokens=tokens, mask=mask, doc_ids=doc_ids, n_supervised=n_sup, rows=rows)

    def close(self) -> None:
        self._stop.set()
        try:  # unblock the producer if it waits for a free buffer or a ready slot
            while True:
                self._ready.get_nowait()
        except queue.Empty:
            pass
        self._free.put({"tokens": None, "mask": None, "doc_ids": None, "event": None})


def val_batches(reader: SplitReader, *, rank: int, world_size: int, device_batch: int, steps: int,
                device: torch.device):
    """The first `steps` val micro-batches of this rank, as (inputs, targets): the same every evaluation."""
    schedule = RowSchedule(reader.num_rows, device_batch * world_size)
    row_len = reader.meta.row_len
    tok_np = np.empty((device_batch, row_len), dtype=reader.shards[0].tokens.dtype)
    mask_np = np.empty((device_batch, row_len), dtype=np.uint8)
    for s in range(steps):
        rows = schedule.micro_rows(s, rank, world_size, 0, device_batch)
        reader.gather(rows, tok_np, mask_np)
        check_token_ids(reader, rows, tok_np)
        tok = torch.from_numpy(tok_np.astype(np.int64)).to(device)
        mask = torch.from_numpy(mask_np).to(device)
        yield tok[:, :-1].to(torch.int32), torch.where(mask[:, 1:].bool(), tok[:, 1:], -1)
