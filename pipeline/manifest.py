"""Snapshot manifests, ids, lock files and verification (design §6).

A snapshot folder holds its shards and `manifest.json`, written last: a folder without a
manifest is not a snapshot. The id hashes everything that determines the bytes, so the
same inputs give the same id and the same files on any machine and for any worker count.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cli import with_path
from pipeline.errors import SnapshotError
from pipeline.layout import snapshots_dir
from pipeline.shard_format import FORMAT_VERSION, ShardReader
from pipeline.tempfiles import temp_path

MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.pkl"
SPLITS = ("train", "val")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def content_sha256(path: str | Path) -> str:
    """Hash of what a source file *says*, not how it is encoded.

    Parquet bytes change with the writer's version (footer, page layout) while the rows stay the
    same; snapshot ids and render-cache keys hash the rows (as one uncompressed Arrow IPC stream of
    the table, schema metadata dropped), so a re-export of the same data keeps its snapshot id.
    Other files (JSONL, word lists, pickles) are hashed as bytes.
    """
    path = Path(path)
    if path.suffix != ".parquet":
        return sha256_file(path)
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pq.read_table(path)
    table = table.replace_schema_metadata(None).combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return "rows:" + hashlib.sha256(sink.getvalue()).hexdigest()


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def snapshot_id(identity: dict[str, Any]) -> str:
    """Hash of everything that determines the snapshot's bytes (recipe, inputs, tokenizer, versions)."""
    return hashlib.sha256(canonical_json(identity)).hexdigest()[:16]


def snapshot_identity(*, format_version: int, template_version: int, pack_version: int, recipe: dict[str, Any],
                      input_hashes: list[str], tokenizer_fingerprint: str) -> dict[str, Any]:
    """What the snapshot id hashes. Input files count by content, not path: where a file lives (data dir,
    virtualenv) does not change the bytes; which files a task reads is in the recipe."""
    return {"format_version": format_version, "template_version": template_version, "pack_version": pack_version,
            "recipe": recipe, "inputs": sorted(input_hashes), "tokenizer": tokenizer_fingerprint}


def manifest_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """The identity a manifest records, so its `snapshot_id` can be recomputed and checked."""
    try:
        return snapshot_identity(format_version=manifest["format_version"],
                                 template_version=manifest["template_version"],
                                 pack_version=manifest["pack_version"], recipe=manifest["recipe"],
                                 input_hashes=[d["content_sha256"] for d in manifest["inputs"]],
                                 tokenizer_fingerprint=manifest["tokenizer"]["fingerprint"])
    except (KeyError, TypeError) as e:
        raise SnapshotError(f"manifest lacks a field of the snapshot identity ({e})") from None


def write_json_atomic(path: Path, value: Any, indent: int | None = 2, newline: bool = True) -> None:
    """JSON under a temporary name (pid-tagged, so stale ones are found), synced, then renamed into place.
    `indent=None, newline=False` writes exactly what Python's `json.dump(value, f)` writes."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        tmp.write_text(json.dumps(value, indent=indent) + ("\n" if newline else ""), encoding="utf-8")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk: the error names the file, no half file stays
        tmp.unlink(missing_ok=True)
        raise with_path(e, path) from None


def load_manifest(snapshot: str | Path) -> dict[str, Any]:
    path = Path(snapshot) / MANIFEST_NAME
    if not path.is_file():
        raise SnapshotError(f"no {MANIFEST_NAME}: not a finished snapshot (an interrupted build leaves none); "
                            "re-run prepare-data", file=Path(snapshot))
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SnapshotError(f"manifest is not valid JSON: {e}", file=path) from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SnapshotError(f"manifest format_version {manifest.get('format_version')!r}, this nanosft reads "
                            f"{FORMAT_VERSION}", file=path)
    return manifest


def shard_paths(snapshot: str | Path, manifest: dict[str, Any], split: str) -> list[Path]:
    return [Path(snapshot) / s["file"] for s in manifest["shards"] if s["split"] == split]


def verify_snapshot(snapshot: str | Path, full: bool = True) -> dict[str, Any]:
    """Check a snapshot against its manifest; raise SnapshotError on the first problem.

    Quick mode (full=False) checks presence and sizes, as the trainer does at every start;
    full mode recomputes every sha256 and re-derives each shard's statistics from its rows.
    """
    snapshot = Path(snapshot)
    manifest = load_manifest(snapshot)
    recomputed = snapshot_id(manifest_identity(manifest))
    if recomputed != manifest.get("snapshot_id"):
        raise SnapshotError(f"snapshot_id {manifest.get('snapshot_id')!r} is not the id of the manifest's recipe, "
                            f"inputs, tokenizer and versions ({recomputed}): the manifest was edited",
                            file=snapshot / MANIFEST_NAME)
    listed = {s["file"] for s in manifest["shards"]}
    for s in manifest["shards"]:
        path = snapshot / s["file"]
        if not path.is_file():
            raise SnapshotError("shard listed in the manifest is missing", file=path)
        size = path.stat().st_size
        if size != s["bytes"]:
            raise SnapshotError(f"size {size} bytes, manifest says {s['bytes']}", file=path)
        if full:
            digest = sha256_file(path)
            if digest != s["sha256"]:
                raise SnapshotError(f"sha256 {digest} does not match the manifest's {s['sha256']} "
                                    "(the file changed after it was written)", file=path)
            _check_shard_rows(path, s, manifest)
        else:  # cheap (the footer only): a damaged footer or an edited manifest shows now, not mid-training
            _check_shard_meta(ShardReader(path), s, manifest)
    tok = manifest["tokenizer"]
    tok_path = snapshot / tok["file"]
    if not tok_path.is_file():
        raise SnapshotError("the snapshot's tokenizer is missing", file=tok_path)
    if tok_path.stat().st_size != tok["bytes"] or (full and sha256_file(tok_path) != tok["sha256"]):
        raise SnapshotError("tokenizer file does not match the manifest", file=tok_path)
    extra = sorted(p.name for p in snapshot.glob("*.arrow") if p.name not in listed)
    if extra:
        raise SnapshotError(f"shard file(s) not in the manifest: {', '.join(extra)}", file=snapshot)
    return manifest


def _check_shard_meta(shard: ShardReader, entry: dict[str, Any], manifest: dict[str, Any]) -> None:
    """The shard's schema metadata and row count against the manifest (what the trainer trusts)."""
    meta, expect = shard.meta, manifest["tokenizer"]
    have = {"max_seq_len": meta.max_seq_len, "bos_id": meta.bos_id, "vocab_size": meta.vocab_size,
            "tokenizer fingerprint": meta.tokenizer_fingerprint, "split": meta.split}
    want = {"max_seq_len": manifest["max_seq_len"], "bos_id": expect["bos_id"], "vocab_size": expect["vocab_size"],
            "tokenizer fingerprint": expect["fingerprint"], "split": entry["split"]}
    diffs = [f"{k} {have[k]!r} vs manifest {want[k]!r}" for k in have if have[k] != want[k]]
    if diffs:
        raise SnapshotError(f"schema metadata disagrees with the manifest: {'; '.join(diffs)}", file=shard.path)
    if shard.num_rows != entry["rows"]:
        raise SnapshotError(f"{shard.num_rows} rows, manifest says {entry['rows']}", file=shard.path)


def _check_shard_rows(path: Path, entry: dict[str, Any], manifest: dict[str, Any]) -> None:
    shard = ShardReader(path)
    meta = shard.meta
    _check_shard_meta(shard, entry, manifest)
    n_sup = shard.mask.sum(axis=1, dtype=np.int64)
    if not np.array_equal(n_sup, shard.n_supervised):
        raise SnapshotError("n_supervised does not match the mask", file=path)
    if shard.num_rows and n_sup.min() <= 0 and manifest["recipe"].get("overlong") != "nanochat":
        raise SnapshotError(f"row {int(np.argmin(n_sup))} has no supervised target (allowed only in "
                            "overlong = 'nanochat' snapshots)", file=path)
    if shard.num_rows and int(shard.tokens.max()) >= meta.vocab_size:
        raise SnapshotError(f"a token id {int(shard.tokens.max())} is outside the vocabulary ({meta.vocab_size})",
                            file=path)
    if shard.mask[:, 0].any():
        raise SnapshotError("mask is set at position 0 (never a target)", file=path)
    fill = np.add.reduceat(shard.doc_lens, shard.doc_offsets[:-1]) if len(shard.doc_lens) else np.zeros(0)
    if (fill > meta.row_len).any():
        raise SnapshotError("a row's documents are longer than the row", file=path)
    if shard.num_rows and ((np.diff(shard.doc_offsets) <= 0).any()
                           or (shard.tokens[np.arange(shard.num_rows), 0] != meta.bos_id).any()):
        raise SnapshotError("a row is empty or does not start with BOS", file=path)
    if int(n_sup.sum()) != entry["supervised"] or int(shard.doc_lens.sum()) != entry["tokens"]:
        raise SnapshotError("token or supervised counts differ from the manifest", file=path)


# ----------------------------------------------------------------------------- lock files

def lock_path(recipe_file: str | Path) -> Path:
    p = Path(recipe_file)
    return p.with_name(p.stem + ".lock.json")


def lock_entry(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a lock pins: the snapshot id and every shard's hash."""
    return {
        "recipe": manifest["recipe"]["name"],
        "snapshot_id": manifest["snapshot_id"],
        "shards": {s["file"]: s["sha256"] for s in manifest["shards"]},
    }


def compare_lock(lock: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """Human-readable differences between a lock and a freshly built manifest (empty = matches)."""
    now = lock_entry(manifest)
    diffs = []
    if lock.get("snapshot_id") != now["snapshot_id"]:
        diffs.append(f"snapshot id {now['snapshot_id']} != locked {lock.get('snapshot_id')} "
                     "(the recipe, an input file, the tokenizer or a format version changed)")
    locked = lock.get("shards", {})
    for name in sorted(set(locked) | set(now["shards"])):
        a, b = locked.get(name), now["shards"].get(name)
        if a != b:
            diffs.append(f"{name}: sha256 {b or 'absent'} != locked {a or 'absent'}")
    return diffs


def snapshot_files(manifest: dict[str, Any]) -> list[str]:
    """Every file of a snapshot, the manifest last (an archive read in order completes with it)."""
    return [s["file"] for s in manifest["shards"]] + [manifest["tokenizer"]["file"], MANIFEST_NAME]


def latest_snapshot(data_dir: str | Path, recipe: str) -> Path:
    """The most recently built finished snapshot of a recipe in a data dir (<data_dir>/nanosft/snapshots)."""
    name = Path(recipe).stem
    folder = snapshots_dir(data_dir)
    found = [p for p in folder.glob(f"{name}-*") if (p / MANIFEST_NAME).is_file()]
    if not found:
        old = [p for p in (Path(data_dir) / "snapshots").glob(f"{name}-*") if (p / MANIFEST_NAME).is_file()]
        hint = (f" ({len(old)} found in the old layout's {Path(data_dir) / 'snapshots'}: move them into {folder},"
                " or pass one with --snapshot)" if old else "")
        raise SnapshotError(f"no snapshot of recipe {name!r} under {folder}{hint}; "
                            f"build one with `make prepare-data RECIPE={name} DATA_DIR={data_dir}`")
    return max(found, key=lambda p: (p / MANIFEST_NAME).stat().st_mtime)
