"""Render a task once, in parallel, into a content-addressed cache of flat arrays.

The key hashes the task's definition, its input files, the tokenizer and the template
version, so changing the mixture (repeats, order), the packer or `max_seq_len` never
re-tokenizes. Rows are split into fixed chunks rendered by one pool of forked processes and
concatenated in chunk order: the bytes are identical for any number of workers.
The cache holds the nanochat `assistant` mask and untruncated conversations; mask
policy and truncation are applied when rows are materialized.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.errors import DataError
from pipeline.layout import is_stale_temp
from pipeline.manifest import canonical_json
from pipeline.recipe import TaskSpec
from pipeline.render import TEMPLATE_VERSION, render_conversation
from pipeline.shard_format import token_dtype
from pipeline.tokenizer import ChatTokenizer

CACHE_VERSION = 3
CHUNK = 1024  # conversations per work unit: small enough to balance, large enough to amortise IPC
MAX_ERRORS_KEPT = 20


@dataclass(frozen=True)
class RenderedTask:
    """A task's conversations as flat arrays: conversation i is tokens[offsets[i]:offsets[i+1]]."""

    tokens: np.ndarray      # token dtype, memory-mapped
    mask: np.ndarray        # uint8, nanochat assistant mask
    offsets: np.ndarray     # int64 (n + 1)
    bad: np.ndarray         # bool (n): row could not be read or rendered (policy skip)
    errors: list[dict[str, Any]]  # the first few bad rows: {"index", "message"}

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def supervised_after_first(self, index: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Supervised targets of each conversation when cut to `lengths` and placed at a row start."""
        csum = np.concatenate([[0], np.cumsum(self.mask, dtype=np.int64)])
        start = self.offsets[index]
        return csum[start + lengths] - csum[start + np.minimum(1, lengths)]


def cache_key(spec: TaskSpec, input_hashes: list[str], tokenizer_fingerprint: str) -> str:
    ident = {"cache_version": CACHE_VERSION, "template_version": TEMPLATE_VERSION, "kind": spec.kind,
             "params": dict(spec.params), "slice": [spec.start, spec.stop, spec.step], "inputs": input_hashes,
             "tokenizer": tokenizer_fingerprint}
    return hashlib.sha256(canonical_json(ident)).hexdigest()[:24]


# ----------------------------------------------------------------------------- worker side
# Set in the parent before the pool forks: workers inherit the built tasks (rows already in memory) and the
# tokenizer instead of re-reading every source, which would cost more than the rendering it parallelises.
_worker: dict[str, Any] = {}


def _render_chunk(job: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, dict]]]:
    """Render conversations [a, b) of task t: (tokens, mask, lengths, [(index, error fields)])."""
    t, a, b = job
    task, tok = _worker["tasks"][t], _worker["tok"]
    dtype = token_dtype(tok.vocab_size)
    ids_all: list[int] = []
    mask_all: list[int] = []
    lengths = np.zeros(b - a, dtype=np.int64)
    errors = []
    for j, i in enumerate(range(a, b)):
        try:
            ids, mask = render_conversation(task[i], tok, "assistant")
        except DataError as e:
            if e.file is None and hasattr(task, "locate"):
                file, row = task.locate(i)
                e = e.located(file=file, row=row)
            e = e.located(task=task.name)
            errors.append((i, {"message": e.describe(), "reason": e.reason, "file": e.file, "row": e.row,
                               "field": e.field, "task": e.task}))
            continue
        ids_all.extend(ids)
        mask_all.extend(mask)
        lengths[j] = len(ids)
    return np.array(ids_all, dtype=dtype), np.array(mask_all, dtype=np.uint8), lengths, errors


# ----------------------------------------------------------------------------- parent side

def load_rendered(path: Path) -> RenderedTask:
    info = json.loads((path / "info.json").read_text())
    offsets = np.load(path / "offsets.npy")
    count = int(offsets[-1])
    return RenderedTask(
        tokens=_open_raw(path / "tokens.bin", np.dtype(info["token_dtype"]), count),
        mask=_open_raw(path / "mask.bin", np.dtype(np.uint8), count),
        offsets=offsets,
        bad=np.load(path / "bad.npy"),
        errors=info["errors"],
    )


def _open_raw(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    if count == 0:  # np.memmap refuses empty files
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


class RenderPool:
    """Renders tasks into the cache; chunks of every task share one pool of forked worker processes.

    The pool starts on the first task with more than one chunk (small tasks render in-process) and
    `imap` returns chunks in order, so the bytes do not depend on the number of workers.
    """

    def __init__(self, tasks: list, tok: ChatTokenizer, workers: int):
        self.tasks, self.tok, self.workers = tasks, tok, workers
        self._pool = None

    def __enter__(self) -> "RenderPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

    def _map(self, jobs: list[tuple[int, int, int]]):
        _worker.update(tasks=self.tasks, tok=self.tok)
        parallel = self.workers > 1 and len(jobs) > 1 and "fork" in mp.get_all_start_methods()
        if not parallel:
            return map(_render_chunk, jobs)
        if self._pool is None:
            self._pool = mp.get_context("fork").Pool(self.workers)
        return self._pool.imap(_render_chunk, jobs)

    def render(self, t: int, key: str, cache_root: Path) -> RenderedTask:
        """Task t's conversations, from `cache_root/key` if present, else rendered and stored there."""
        final = cache_root / key
        if (final / "info.json").is_file():
            return load_rendered(final)
        task = self.tasks[t]
        n = len(task)
        cache_root.mkdir(parents=True, exist_ok=True)
        for stale in cache_root.glob(f".{key}.tmp-*"):
            if is_stale_temp(stale):  # left by a killed run (a live run's temp is its own)
                shutil.rmtree(stale, ignore_errors=True)
        tmp = cache_root / f".{key}.tmp-{os.getpid()}"
        tmp.mkdir()
        jobs = [(t, a, min(a + CHUNK, n)) for a in range(0, n, CHUNK)]
        lengths = np.zeros(n, dtype=np.int64)
        bad = np.zeros(n, dtype=bool)
        errors: list[dict[str, Any]] = []
        try:
            with open(tmp / "tokens.bin", "wb") as ft, open(tmp / "mask.bin", "wb") as fm, \
                    tqdm(total=n, desc=f"render {task.name}", unit="conv", leave=False, disable=None) as bar:
                for (_, a, b), (ids, mask, lens, errs) in zip(jobs, self._map(jobs)):
                    ids.tofile(ft)
                    mask.tofile(fm)
                    lengths[a:b] = lens
                    for i, err in errs:
                        bad[i] = True
                        if len(errors) < MAX_ERRORS_KEPT:
                            errors.append({"index": i, **err})
                    bar.update(b - a)
            np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
            np.save(tmp / "bad.npy", bad)
            (tmp / "info.json").write_text(json.dumps({
                "task": task.name, "n": n, "bad": int(bad.sum()), "errors": errors,
                "token_dtype": token_dtype(self.tok.vocab_size).str}, indent=1))
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return load_rendered(final)
