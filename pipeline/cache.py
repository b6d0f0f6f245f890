"""Render a task once, in parallel, into a content-addressed cache of flat arrays.

The key hashes the task's definition, its input files, the tokenizer and the template
version, so changing the mixture (repeats, order), the packer or `max_seq_len` never
re-tokenizes. Rows are split into fixed chunks rendered by a process pool and
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
from pipeline.manifest import canonical_json
from pipeline.recipe import TaskSpec
from pipeline.render import TEMPLATE_VERSION, render_conversation
from pipeline.shard_format import token_dtype
from pipeline.tasks import build_task
from pipeline.tokenizer import load_tokenizer

CACHE_VERSION = 2
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
_worker: dict[str, Any] = {}


def _init_worker(spec: TaskSpec, data_dir: str, tokenizer_path: str) -> None:
    _worker["task"] = build_task(spec, Path(data_dir))
    _worker["tok"] = load_tokenizer(Path(tokenizer_path))


def _render_chunk(bounds: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, dict]]]:
    """Render conversations [a, b): (tokens, mask, lengths, [(index, error fields)])."""
    task, tok = _worker["task"], _worker["tok"]
    dtype = token_dtype(tok.vocab_size)
    ids_all: list[int] = []
    mask_all: list[int] = []
    lengths = np.zeros(bounds[1] - bounds[0], dtype=np.int64)
    errors = []
    for j, i in enumerate(range(*bounds)):
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
    return RenderedTask(
        tokens=np.load(path / "tokens.npy", mmap_mode="r"),
        mask=np.load(path / "mask.npy", mmap_mode="r"),
        offsets=np.load(path / "offsets.npy"),
        bad=np.load(path / "bad.npy"),
        errors=info["errors"],
    )


def render_task(spec: TaskSpec, n: int, data_dir: Path, tokenizer_path: Path, key: str, cache_root: Path,
                workers: int) -> RenderedTask:
    """Render the task's n conversations into `cache_root/key`, or reuse that folder if it exists."""
    final = cache_root / key
    if (final / "info.json").is_file():
        return load_rendered(final)
    cache_root.mkdir(parents=True, exist_ok=True)
    for stale in cache_root.glob(f".{key}.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = cache_root / f".{key}.tmp-{os.getpid()}"
    tmp.mkdir()
    chunks = [(a, min(a + CHUNK, n)) for a in range(0, n, CHUNK)]
    lengths = np.zeros(n, dtype=np.int64)
    bad = np.zeros(n, dtype=bool)
    errors: list[dict[str, Any]] = []
    args = (spec, str(data_dir), str(tokenizer_path))
    try:
        with open(tmp / "tokens.bin", "wb") as ft, open(tmp / "mask.bin", "wb") as fm:
            bar = tqdm(total=n, desc=f"render {spec.name}", unit="conv", leave=False, disable=None)
            if workers <= 1 or len(chunks) <= 1:
                _init_worker(*args)
                results = map(_render_chunk, chunks)
                pool = None
            else:
                pool = mp.get_context("spawn").Pool(min(workers, len(chunks)), _init_worker, args)
                results = pool.imap(_render_chunk, chunks)  # imap keeps chunk order: identical bytes
            try:
                for (a, b), (ids, mask, lens, errs) in zip(chunks, results):
                    ids.tofile(ft)
                    mask.tofile(fm)
                    lengths[a:b] = lens
                    for i, err in errs:
                        bad[i] = True
                        if len(errors) < MAX_ERRORS_KEPT:
                            errors.append({"index": i, **err})
                    bar.update(b - a)
            finally:
                bar.close()
                if pool is not None:
                    pool.terminate()
        dtype = token_dtype(load_tokenizer(tokenizer_path).vocab_size)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        _bin_to_npy(tmp / "tokens.bin", tmp / "tokens.npy", dtype, int(offsets[-1]))
        _bin_to_npy(tmp / "mask.bin", tmp / "mask.npy", np.dtype(np.uint8), int(offsets[-1]))
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "bad.npy", bad)
        (tmp / "info.json").write_text(json.dumps({"task": spec.name, "n": n, "bad": int(bad.sum()),
                                                   "errors": errors}, indent=1))
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_rendered(final)


def _bin_to_npy(src: Path, dst: Path, dtype: np.dtype, count: int) -> None:
    """Give a raw array file an .npy header without loading it into memory."""
    out = np.lib.format.open_memmap(dst, mode="w+", dtype=dtype, shape=(count,))
    src_arr = np.fromfile(src, dtype=dtype, count=count)
    out[:] = src_arr
    out.flush()
    del out
    src.unlink()
