"""prepare-data: recipe → rendered, packed, verified snapshot.

    python -m pipeline.prepare --recipe data_manifests/demo.toml --data-dir data [--workers N]

Stages: sources → mixture order → render (cached, parallel) → pack plan (pure function of
the lengths) → shards → manifest (last) → atomic rename of the snapshot folder → lock check.
The last line printed is the snapshot path.
Everything it writes lands under <data_dir>/nanosft/ (pipeline.layout); the inputs are only read.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import sysconfig
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import polars as pl
from filelock import FileLock, Timeout
from tqdm import tqdm

from pipeline.cli import error, run_cli
from pipeline.cache import RenderedTask, RenderPool, cache_key
from pipeline.errors import DataError, SnapshotError
from pipeline.layout import owned_dir, render_cache_dir, snapshots_dir, source_root, tokenizers_dir
from pipeline.manifest import (MANIFEST_NAME, SPLITS, TOKENIZER_NAME, compare_lock, content_sha256, load_manifest,
                               lock_entry, lock_path, sha256_file, snapshot_id, snapshot_identity, verify_snapshot,
                               write_json_atomic)
from pipeline.mixture import mixture_order
from pipeline.pack import PackPlan, lower_bound_rows, pack
from pipeline.recipe import Recipe, TaskSpec, load_recipe, resolve_recipe_path
from pipeline.render import NANOCHAT_MAX_TOKENS, TEMPLATE_VERSION
from pipeline.shard_format import FORMAT_VERSION, ShardMeta, ShardRows, shard_filename, token_dtype, write_shard
from pipeline.tasks import build_task
from pipeline.tempfiles import remove_stale_temps
from pipeline.tasks.source import with_recipe
from pipeline.tokenizer import ChatTokenizer, load_tokenizer, save_tokenizer, train_tokenizer

PACK_VERSION = 1  # bump when a packer's output for the same lengths changes
REPORT_ERRORS = 5


@dataclass(frozen=True)
class SplitDocs:
    """The conversations of one split that go into rows, in mixture order."""

    entry: np.ndarray      # int64: index into the split's expanded task list
    task: np.ndarray       # int64: index into the recipe's task table
    local: np.ndarray      # int64: index within the task
    mixture_pos: np.ndarray  # int64: global conversation id (position in the mixture order)
    length: np.ndarray     # int64: tokens after truncation


# ----------------------------------------------------------------------------- tokenizer

def resolve_tokenizer(recipe: Recipe, data_dir: Path, demo_texts) -> tuple[ChatTokenizer, Path]:
    spec = recipe.tokenizer
    if spec.source == "file":
        path = data_dir / spec.path
        if not path.is_file():
            raise DataError(f"tokenizer not found at {path}. Point --data-dir at a nanochat base dir "
                            "(it keeps tokenizer/tokenizer.pkl), or run nanochat's scripts.tok_train there",
                            field="tokenizer.path")
        return load_tokenizer(path), path
    path = tokenizers_dir(data_dir) / f"{recipe.name}-v{spec.vocab_size}" / "tokenizer.pkl"
    if path.is_file():
        return load_tokenizer(path), path
    print(f"training a {spec.vocab_size}-token tokenizer on the {recipe.name} text (rustbpe)", file=sys.stderr)
    tok = train_tokenizer(demo_texts(), spec.vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tok, path)
    return load_tokenizer(path), path


# ----------------------------------------------------------------------------- tasks and inputs

def expand(specs: tuple[TaskSpec, ...]) -> list[TaskSpec]:
    """A task with repeat=k is listed k times in a row, as nanochat lists it (order matters for the shuffle)."""
    return [s for s in specs for _ in range(s.repeat)]


def task_table(recipe: Recipe) -> list[tuple[str, TaskSpec]]:
    """One row per distinct (split, task name): what `doc_tasks` indexes."""
    return [(split, s) for split in SPLITS for s in getattr(recipe, split)]


def check_empty_tasks(table: list[tuple[str, TaskSpec]], tasks: list, bad_rows: str, out) -> None:
    """A task with no conversation (an empty source file, or a slice that selects none) is refused under
    bad_rows = "fail" and reported under "skip", naming its files: it would silently add nothing."""
    for (split, spec), task in zip(table, tasks):
        if len(task) > 0:
            continue
        files = ", ".join(str(p) for p in task.inputs()) or "(no input file)"
        reason = (f"no conversation: its source file(s) {files} hold no row, or start/stop/step select none")
        if bad_rows == "fail":
            raise DataError(reason + " (bad_rows = 'fail'; fill the file, drop the task, or set bad_rows = 'skip')",
                            task=spec.name, field=f"{split}[{recipe_index(table, split, spec)}]")
        print(f"warning: task {spec.name}: {reason}", file=out)


def recipe_index(table: list[tuple[str, TaskSpec]], split: str, spec: TaskSpec) -> int:
    """Position of a task in its split's list (for the dotted recipe field `train[i]`)."""
    return [s for sp, s in table if sp == split].index(spec)


def describe_input(path: Path, data_dir: Path) -> dict[str, Any]:
    """An input file for the manifest: a portable name (relative to the data dir or to site-packages),
    its size, its byte hash and its content hash (the one the snapshot id uses)."""
    path = Path(path)
    shown = str(path)
    for root, prefix in ((data_dir, ""), (Path(sysconfig.get_paths()["purelib"]), "site-packages/")):
        try:
            shown = prefix + str(path.resolve().relative_to(Path(root).resolve()))
            break
        except ValueError:
            continue
    return {"path": shown, "bytes": path.stat().st_size, "sha256": sha256_file(path),
            "content_sha256": content_sha256(path)}


# ----------------------------------------------------------------------------- per split

def split_docs(recipe: Recipe, split: str, table: list[tuple[str, TaskSpec]], rendered: dict[int, RenderedTask],
               counts: dict[int, dict[str, int]]) -> SplitDocs:
    """Mixture order → the conversations that enter rows, after the overlong and empty policies."""
    entries = expand(getattr(recipe, split))
    index_of = {(sp, s.name): i for i, (sp, s) in enumerate(table)}
    entry_task = np.array([index_of[(split, s.name)] for s in entries], dtype=np.int64)
    lengths = [len(rendered[t].bad) for t in entry_task]
    order = mixture_order(lengths, seed=recipe.mixture_seed)
    entry, local = order[:, 0].astype(np.int64), order[:, 1].astype(np.int64)
    task = entry_task[entry]
    full = np.zeros(len(order), dtype=np.int64)
    keep = np.ones(len(order), dtype=bool)
    nanochat = recipe.overlong == "nanochat"
    cut = min(recipe.row_capacity, NANOCHAT_MAX_TOKENS) if nanochat else recipe.row_capacity
    for t in np.unique(task):
        sel = np.nonzero(task == t)[0]
        r = rendered[int(t)]
        c = counts[int(t)]
        n_full = r.lengths[local[sel]]
        bad = r.bad[local[sel]]
        long = (n_full > cut) & ~bad
        length = np.minimum(n_full, cut)
        if recipe.mask_policy == "all":
            sup = length - 1
        else:
            sup = r.supervised_after_first(local[sel], length)
        dropped_long = long if recipe.overlong == "drop" else np.zeros_like(long)
        empty = (sup <= 0) & ~bad & ~dropped_long
        kept_empty = empty if nanochat else np.zeros_like(empty)  # upstream keeps them: rows stay aligned
        keep[sel] = ~(bad | dropped_long | (empty & ~kept_empty))
        full[sel] = length
        c["conversations"] += len(sel)
        c["bad"] += int(bad.sum())
        c["truncated"] += int((long & ~dropped_long).sum())
        c["dropped_long"] += int(dropped_long.sum())
        c["dropped_unsupervised"] += int((empty & ~kept_empty).sum())
        c["kept_unsupervised"] += int(kept_empty.sum())
    pos = np.nonzero(keep)[0]
    return SplitDocs(entry=entry[pos], task=task[pos], local=local[pos], mixture_pos=pos.astype(np.int64),
                     length=full[pos])


def materialize(docs: SplitDocs, plan: PackPlan, r0: int, r1: int, rendered: dict[int, RenderedTask],
                row_len: int, bos_id: int, dtype: np.dtype, mask_policy: str) -> ShardRows:
    """Rows [r0, r1) of the plan as arrays: a vectorised gather from the render cache."""
    n = r1 - r0
    a, b = int(plan.row_offsets[r0]), int(plan.row_offsets[r1])
    ids = plan.doc_order[a:b]
    lens = docs.length[ids]
    per_row = np.diff(plan.row_offsets[r0:r1 + 1])
    dest_start = np.repeat(np.arange(n, dtype=np.int64), per_row) * row_len + _starts_in_row(lens, per_row)
    tokens = np.full(n * row_len, bos_id, dtype=dtype)
    mask = np.zeros(n * row_len, dtype=np.uint8)
    tasks = docs.task[ids]
    for t in np.unique(tasks):
        sel = np.nonzero(tasks == t)[0]
        r = rendered[int(t)]
        src = _ranges(r.offsets[docs.local[ids[sel]]], lens[sel])
        dst = _ranges(dest_start[sel], lens[sel])
        tokens[dst] = r.tokens[src]
        mask[dst] = 1 if mask_policy == "all" else r.mask[src]
    tokens = tokens.reshape(n, row_len)
    mask = mask.reshape(n, row_len)
    mask[:, 0] = 0  # the first position is never a target
    offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)
    return ShardRows(tokens=tokens, mask=mask, doc_offsets=offsets, doc_lens=lens.astype(np.int32),
                     doc_ids=docs.mixture_pos[ids], doc_tasks=tasks.astype(np.int16))


def doc_supervised(rows: ShardRows) -> np.ndarray:
    """Supervised targets inside each document's span of its row (for per-task statistics)."""
    n, row_len = rows.mask.shape
    per_row = np.diff(rows.doc_offsets)
    in_row = _starts_in_row(rows.doc_lens.astype(np.int64), per_row)
    start = np.repeat(np.arange(n, dtype=np.int64), per_row) * row_len + in_row
    csum = np.concatenate([[0], np.cumsum(rows.mask.reshape(-1), dtype=np.int64)])
    return csum[start + rows.doc_lens] - csum[start]


def _starts_in_row(lens: np.ndarray, per_row: np.ndarray) -> np.ndarray:
    """Offset of each document inside its row, given documents grouped row by row."""
    starts = np.cumsum(lens) - lens
    first = np.repeat(starts[np.cumsum(per_row) - per_row], per_row)
    return starts - first


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + l) for each (s, l), without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    shifts = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shifts


def write_split(folder: Path, split: str, recipe: Recipe, tok: ChatTokenizer, docs: SplitDocs, plan: PackPlan,
                rendered: dict[int, RenderedTask], sup_by_task: np.ndarray) -> list[dict[str, Any]]:
    """Materialise and write the split's shards; returns their manifest entries and adds to sup_by_task."""
    n_shards = max(1, -(-plan.n_rows // recipe.rows_per_shard))
    meta = ShardMeta(max_seq_len=recipe.max_seq_len, bos_id=tok.bos_id, vocab_size=tok.vocab_size,
                     tokenizer_fingerprint=tok.fingerprint, split=split)
    dtype = token_dtype(tok.vocab_size)
    entries = []
    for s in tqdm(range(n_shards), desc=f"write {split}", unit="shard", leave=False, disable=None):
        r0, r1 = s * recipe.rows_per_shard, min((s + 1) * recipe.rows_per_shard, plan.n_rows)
        rows = materialize(docs, plan, r0, r1, rendered, recipe.row_capacity, tok.bos_id, dtype, recipe.mask_policy)
        name = shard_filename(split, s, n_shards)
        nbytes = write_shard(folder / name, rows, meta, allow_unsupervised=recipe.overlong == "nanochat")
        np.add.at(sup_by_task, rows.doc_tasks.astype(np.int64), doc_supervised(rows))
        entries.append({"file": name, "split": split, "rows": r1 - r0, "bytes": nbytes,
                        "tokens": int(rows.doc_lens.sum()), "supervised": int(rows.n_supervised.sum()),
                        "unsupervised_rows": int((rows.n_supervised == 0).sum()),
                        "sha256": sha256_file(folder / name)})
    return entries


# ----------------------------------------------------------------------------- report

def summarize(name: str, plan: PackPlan, docs: SplitDocs, entries: list[dict[str, Any]],
              row_len: int) -> dict[str, Any]:
    rows_sup = sum(e["supervised"] for e in entries)
    tokens = int(docs.length.sum())
    rows = plan.n_rows
    lb = lower_bound_rows(docs.length, row_len)
    slots = rows * row_len
    return {
        "split": name, "conversations": int(len(docs.length)), "rows": rows, "tokens": tokens,
        "supervised": rows_sup, "pad_fraction": (slots - tokens) / slots if slots else 0.0,
        "lower_bound_rows": lb,
        "lower_bound_pad_fraction": (lb * row_len - tokens) / (lb * row_len) if lb else 0.0,
        "supervised_fraction": rows_sup / slots if slots else 0.0,
        "unsupervised_rows": sum(e["unsupervised_rows"] for e in entries),  # > 0 only with overlong = "nanochat"
    }


def task_stats(table: list[tuple[str, TaskSpec]], counts: dict[int, dict[str, int]],
               docs_by_split: dict[str, SplitDocs], sup_by_task: np.ndarray) -> pl.DataFrame:
    frames = []
    for split, docs in docs_by_split.items():
        frames.append(pl.DataFrame({"task": docs.task, "tokens": docs.length}))
    packed = (pl.concat(frames).group_by("task").agg(pl.len().alias("packed"), pl.col("tokens").sum())
              if frames else pl.DataFrame({"task": [], "packed": [], "tokens": []}))
    base = pl.DataFrame([{"task": i, "split": sp, "name": s.name, **counts[i], "supervised": int(sup_by_task[i])}
                         for i, (sp, s) in enumerate(table)])
    out = base.join(packed, on="task", how="left").fill_null(0)
    return out.with_columns((pl.col("supervised") / pl.col("tokens").clip(lower_bound=1)).alias("supervised_frac"))


def print_report(stats: pl.DataFrame, splits: list[dict[str, Any]], errors: list[str], out=sys.stderr) -> None:
    cols = ["split", "name", "conversations", "packed", "tokens", "supervised_frac", "truncated", "dropped_long",
            "dropped_unsupervised", "bad"]
    widths = [5, 16, 13, 9, 12, 8, 9, 8, 8, 6]
    heads = ["split", "task", "convs", "packed", "tokens", "sup", "trunc", "drop>", "drop0", "bad"]
    print("  ".join(h.rjust(w) if i > 1 else h.ljust(w) for i, (h, w) in enumerate(zip(heads, widths))), file=out)
    for row in stats.select(cols).iter_rows():
        cells = []
        for i, (v, w) in enumerate(zip(row, widths)):
            s = f"{v:.3f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)
            cells.append(s.rjust(w) if i > 1 else s.ljust(w))
        print("  ".join(cells), file=out)
    for s in splits:
        print(f"{s['split']:5}: {s['rows']:,} rows, {s['tokens']:,} tokens, padding {100 * s['pad_fraction']:.3f}% "
              f"(lower bound {s['lower_bound_rows']:,} rows = {100 * s['lower_bound_pad_fraction']:.3f}%), "
              f"supervised {100 * s['supervised_fraction']:.1f}% of slots", file=out)
        if s["unsupervised_rows"]:
            print(f"{s['split']:5}: {s['unsupervised_rows']:,} rows with no supervised target, kept as nanochat "
                  "keeps them (overlong = 'nanochat'); the trainer skips a step that has no target", file=out)
    for e in errors[:REPORT_ERRORS]:
        print(f"skipped: {e}", file=out)


# ----------------------------------------------------------------------------- main

def prepare(recipe_file: Path, data_dir: Path, workers: int, update_lock: bool = False, out=sys.stderr) -> Path:
    recipe = load_recipe(recipe_file)
    data_dir = Path(data_dir).resolve()
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError("the data dir is a file, not a folder; pass --data-dir a folder", file=data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    with build_lock(data_dir, recipe.name, out):
        return _prepare(recipe_file, recipe, data_dir, workers, update_lock, out)


@contextmanager
def build_lock(data_dir: Path, recipe_name: str, out) -> Iterator[None]:
    """One build of a recipe per data dir at a time (other recipes build alongside): a second run waits,
    then finds the snapshot the first published."""
    path = owned_dir(data_dir) / "locks" / f"prepare-{recipe_name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another prepare of recipe {recipe_name!r} in {data_dir} (lock {path})", file=out)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def publish(tmp: Path, final: Path) -> bool:
    """Rename a finished temp snapshot into place. If another process published the same id first, its
    snapshot (the same bytes) counts as success: returns False and this one is discarded."""
    try:
        os.replace(tmp, final)
        return True
    except OSError:
        if not (final / MANIFEST_NAME).is_file():
            raise
        verify_snapshot(final, full=False)
        return False


def _stale_snapshot_temps(snapshots: Path, recipe_name: str) -> None:
    """Remove this recipe's temp folders left by dead processes (never another recipe's: `a` vs `a-b`)."""
    own = re.compile(rf"^\.{re.escape(recipe_name)}-[0-9a-f]{{16}}\.tmp-\d+$")
    for p in snapshots.glob(f".{recipe_name}-*.tmp-*"):
        if own.match(p.name):
            remove_stale_temps(snapshots, p.name)


def _prepare(recipe_file: Path, recipe: Recipe, data_dir: Path, workers: int, update_lock: bool, out) -> Path:
    t0 = time.time()

    demo_texts = None
    sources = source_root(data_dir, recipe.demo is not None)  # inputs are read there, never written
    if recipe.demo is not None:
        from pipeline.demo_data import demo_tokenizer_texts, write_demo_sources
        write_demo_sources(sources, seed=recipe.demo.seed, sizes=dict(recipe.demo.sizes) or None)
        demo_texts = lambda: demo_tokenizer_texts(sources)  # noqa: E731
    elif recipe.tokenizer.source == "train":
        raise DataError("tokenizer.source = 'train' needs a [demo] section (the text it trains on)",
                        field="tokenizer.source")
    tok, tok_path = resolve_tokenizer(recipe, data_dir, demo_texts)

    table = task_table(recipe)
    tasks = [build_task(spec, sources, f"{split}[{recipe_index(table, split, spec)}]", recipe_file)
             for split, spec in table]
    check_empty_tasks(table, tasks, recipe.bad_rows, out)
    inputs = {}
    for t in tasks:
        for p in t.inputs():
            inputs.setdefault(str(Path(p).resolve()), Path(p))
    described = {key: describe_input(p, data_dir) for key, p in inputs.items()}
    content_by_path = {key: d["content_sha256"] for key, d in described.items()}
    input_desc = sorted(described.values(), key=lambda d: d["path"])
    identity = snapshot_identity(format_version=FORMAT_VERSION, template_version=TEMPLATE_VERSION,
                                 pack_version=PACK_VERSION, recipe=recipe.to_dict(),
                                 input_hashes=[d["content_sha256"] for d in input_desc],
                                 tokenizer_fingerprint=tok.fingerprint)
    sid = snapshot_id(identity)
    snapshots = snapshots_dir(data_dir)
    final = snapshots / f"{recipe.name}-{sid}"
    lock_file = lock_path(recipe_file)

    if final.exists():
        try:
            manifest = verify_snapshot(final, full=True)
            print(f"snapshot {final.name} exists and verifies: nothing to do", file=out)
            _check_lock(lock_file, manifest, update_lock, out)
            return final
        except SnapshotError as e:
            aside = final.with_name(f".{final.name}.failed-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
            os.replace(final, aside)  # kept for a look, not deleted: the rebuild takes its place
            print(f"snapshot {final.name} exists but fails verification ({e}); moved it to {aside} (delete it "
                  "when done) and rebuilding it", file=out)

    # render every distinct task once (cached across recipes and packers)
    rendered: dict[int, RenderedTask] = {}
    counts: dict[int, dict[str, int]] = {}
    errors: list[str] = []
    cache_root = render_cache_dir(data_dir)
    with RenderPool(tasks, tok, workers) as renderer:
        for i, ((split, spec), task) in enumerate(zip(table, tasks)):
            hashes = sorted(content_by_path[str(Path(p).resolve())] for p in task.inputs())
            rendered[i] = renderer.render(i, cache_key(spec, hashes, tok.fingerprint), cache_root)
            counts[i] = {"conversations": 0, "bad": 0, "truncated": 0, "dropped_long": 0,
                         "dropped_unsupervised": 0, "kept_unsupervised": 0}
            bad = rendered[i].errors
            if bad and recipe.bad_rows == "fail":
                first = bad[0]
                raise DataError(f"{first['reason']} (bad_rows = 'fail'; {int(rendered[i].bad.sum())} bad row(s) "
                                "in this task; set bad_rows = 'skip' in the recipe to skip and count them)",
                                file=first["file"], row=first["row"], field=first["field"], task=first["task"])
            errors.extend(e["message"] for e in bad)

    # pack and write each split into a temporary folder; rename it into place last
    snapshots.mkdir(parents=True, exist_ok=True)
    _stale_snapshot_temps(snapshots, recipe.name)  # left by an interrupted run
    tmp = snapshots / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        shutil.copyfile(tok_path, tmp / TOKENIZER_NAME)  # a snapshot carries its tokenizer: self-contained
        shard_entries, split_summaries, docs_by_split = [], [], {}
        sup_by_task = np.zeros(len(table), dtype=np.int64)
        for split in SPLITS:
            docs = split_docs(recipe, split, table, rendered, counts)
            if len(docs.length) == 0:
                empty = [f"{t.name} ({', '.join(map(str, t.inputs()))})" for (sp, _), t in zip(table, tasks)
                         if sp == split and len(t) == 0]
                raise DataError(f"the {split} split has no conversation left to pack"
                                + (f"; empty task(s): {'; '.join(empty)}" if empty else ""), task=split)
            docs_by_split[split] = docs
            plan = pack(docs.length, recipe.row_capacity, recipe.packing.method, **recipe.packing.options)
            entries = write_split(tmp, split, recipe, tok, docs, plan, rendered, sup_by_task)
            shard_entries += entries
            split_summaries.append(summarize(split, plan, docs, entries, recipe.row_capacity))
        stats = task_stats(table, counts, docs_by_split, sup_by_task)
        manifest = {
            "format_version": FORMAT_VERSION,
            "snapshot_id": sid,
            "recipe": recipe.to_dict(),
            "max_seq_len": recipe.max_seq_len,
            "template_version": TEMPLATE_VERSION,
            "pack_version": PACK_VERSION,
            "tokenizer": {"fingerprint": tok.fingerprint, "bos_id": tok.bos_id, "vocab_size": tok.vocab_size,
                          "file": TOKENIZER_NAME, "bytes": (tmp / TOKENIZER_NAME).stat().st_size,
                          "sha256": sha256_file(tmp / TOKENIZER_NAME), "source": describe_input(tok_path, data_dir)},
            "inputs": input_desc,
            "tasks": [{"index": i, "split": sp, "name": s.name, "kind": s.kind} for i, (sp, s) in enumerate(table)],
            "packages": _package_versions(),
            "shards": shard_entries,
            "stats": {"splits": split_summaries, "tasks": stats.to_dicts(), "skipped_examples": errors[:20]},
        }
        write_json_atomic(tmp / MANIFEST_NAME, manifest)  # last: its presence marks a complete snapshot
        if not publish(tmp, final):
            print(f"snapshot {final.name} was published by another process meanwhile: using it", file=out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print_report(stats, split_summaries, errors, out)
    print(f"built {final.name} in {time.time() - t0:.1f}s", file=out)
    _check_lock(lock_file, load_manifest(final), update_lock, out)
    return final


def _package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": sys.version.split()[0]}
    for name in ("numpy", "pyarrow", "polars", "tiktoken", "rustbpe", "english-words"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


class LockMismatch(Exception):
    """A rebuilt snapshot whose id or shard hashes differ from the committed lock file."""


def _check_lock(lock_file: Path, manifest: dict[str, Any], update: bool, out) -> None:
    import json
    entry = lock_entry(manifest)
    if not lock_file.exists() or update:
        write_json_atomic(lock_file, entry)
        print(f"{'updated' if update else 'wrote'} lock {lock_file}", file=out)
        return
    diffs = compare_lock(json.loads(lock_file.read_text()), manifest)
    if diffs:
        bar = "!" * 78
        msg = "\n".join([bar, f"SNAPSHOT DIFFERS FROM THE LOCK {lock_file}:", *("  " + d for d in diffs),
                         "The snapshot was kept. If the change is intended, run again with --update-lock "
                         "(make prepare-data ARGS=--update-lock) and commit the lock.", bar])
        raise LockMismatch(msg)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.prepare", description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="demo", help="recipe name in data_manifests/ or a path to a .toml")
    ap.add_argument("--data-dir", default=os.environ.get("NANOCHAT_BASE_DIR") or "data", type=Path)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="render processes (default: all cores)")
    ap.add_argument("--update-lock", action="store_true", help="accept a snapshot that differs from the lock file")
    args = ap.parse_args(argv)

    def body() -> int:
        try:
            path = prepare(resolve_recipe_path(args.recipe), args.data_dir, args.workers, args.update_lock)
        except DataError as e:  # the missing-source messages name the fetch command with this recipe
            return error(with_recipe(str(e), args.recipe))
        except LockMismatch as e:  # the snapshot was kept: its own exit code and the full diff
            print(f"error: {e}", file=sys.stderr)
            return 3
        print(path)
        return 0
    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
