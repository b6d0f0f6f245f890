"""Manifests, verification, lock helpers and the snapshot tools (verify, inspect, export, import) on a real snapshot."""
from __future__ import annotations

import importlib
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import zstandard

from pipeline import export, inspect as inspect_cli, verify
from pipeline.errors import SnapshotError
from pipeline.export import export_snapshot
from pipeline.layout import snapshots_dir
from pipeline.manifest import (compare_lock, latest_snapshot, load_manifest, lock_entry, lock_path, sha256_file,
                               shard_paths, snapshot_files, snapshot_id, verify_snapshot, write_json_atomic)
from pipeline.prepare import prepare
from pipeline.shard_format import ShardReader, ShardRows, write_shard
from pipeline.tokenizer import load_tokenizer
from tests.recipes import write_recipe

importer = importlib.import_module("pipeline.import")  # `import` is a keyword
import_snapshot = importer.import_snapshot

TINY_SIZES = ("{smoltalk_train=60, smoltalk_test=20, mmlu_auxiliary_train=20, mmlu_test=20, gsm8k_train=40, "
              "gsm8k_test=20, identity=10}")
TINY_TRAIN = """
[[train]]
kind = "smoltalk"
params = { split = "train" }

[[train]]
kind = "gsm8k"
params = { split = "train" }

[[train]]
kind = "simplespelling"
params = { size = 100, split = "train" }
"""
TINY_VAL = """
[[val]]
kind = "gsm8k"
params = { split = "test" }
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("manifest")
    recipe = write_recipe(folder, name="tiny", filename="tiny.toml", sizes=TINY_SIZES, train=TINY_TRAIN,
                          val=TINY_VAL, rows_per_shard=32)
    data = folder / "data"
    return prepare(recipe, data, 1, out=io.StringIO())


@pytest.fixture
def snap(built, tmp_path):
    """A private copy of the built snapshot, free to tamper with."""
    return Path(shutil.copytree(built, snapshots_dir(tmp_path) / built.name))


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())}


def train_shards(snap: Path) -> list[Path]:
    return shard_paths(snap, load_manifest(snap), "train")


# ----------------------------------------------------------------------------- verify

def test_a_fresh_snapshot_verifies(snap, capsys):
    m = verify_snapshot(snap, full=True)
    assert verify_snapshot(snap, full=False) == m
    assert len(train_shards(snap)) > 2
    assert verify.main([str(snap)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK") and m["snapshot_id"] in out and "hashes and row statistics match" in out
    assert verify.main([str(snap), "--quick"]) == 0
    assert "sizes only" in capsys.readouterr().out


def test_one_flipped_byte_is_caught_by_the_hash(snap, capsys):
    shard = train_shards(snap)[1]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    verify_snapshot(snap, full=False)  # same size: the quick check cannot see it
    with pytest.raises(SnapshotError, match="sha256") as e:
        verify_snapshot(snap, full=True)
    assert e.value.file == str(shard)
    assert verify.main([str(snap)]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and shard.name in err
    assert verify.main([str(snap), "--quick"]) == 0


def test_a_truncated_shard_fails_on_size(snap):
    shard = train_shards(snap)[0]
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-100])
    for full in (False, True):
        with pytest.raises(SnapshotError, match=f"size {len(raw) - 100} bytes, manifest says {len(raw)}") as e:
            verify_snapshot(snap, full=full)
        assert e.value.file == str(shard)


def test_a_deleted_shard_is_missing(snap):
    shard = train_shards(snap)[-1]
    shard.unlink()
    with pytest.raises(SnapshotError, match="missing") as e:
        verify_snapshot(snap, full=False)
    assert e.value.file == str(shard)


def test_an_extra_shard_is_flagged(snap, capsys):
    extra = snap / "train-00099-of-00099.arrow"
    shutil.copyfile(train_shards(snap)[0], extra)
    with pytest.raises(SnapshotError, match=r"not in the manifest: train-00099-of-00099\.arrow"):
        verify_snapshot(snap, full=False)
    assert verify.main([str(snap)]) == 1
    assert extra.name in capsys.readouterr().err


def test_a_changed_tokenizer_is_flagged(snap):
    tok = snap / "tokenizer.pkl"
    raw = bytearray(tok.read_bytes())
    raw[-3] ^= 0xFF
    tok.write_bytes(bytes(raw))
    with pytest.raises(SnapshotError, match="tokenizer") as e:
        verify_snapshot(snap, full=True)
    assert e.value.file == str(tok)


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_text(p.read_text()[:-40]), "not valid JSON"),
    (lambda p: p.write_bytes(b"\xff\xfe" + p.read_bytes()), "not valid JSON"),
    (lambda p: p.unlink(), "not a finished snapshot"),
    (lambda p: p.write_text(p.read_text().replace('"format_version": 1', '"format_version": 99', 1)), "format_version"),
])
def test_a_damaged_manifest_is_refused(snap, damage, message, capsys):
    damage(snap / "manifest.json")
    with pytest.raises(SnapshotError, match=message):
        verify_snapshot(snap)
    assert verify.main([str(snap)]) == 1
    assert "FAILED" in capsys.readouterr().err


def _rewrite_shard(snap: Path, shard: Path, edit) -> None:
    """Rewrite a shard with edited rows and fix its manifest entry: only the row checks can see the edit."""
    r = ShardReader(shard)
    rows = ShardRows(tokens=np.array(r.tokens), mask=np.array(r.mask), doc_offsets=np.array(r.doc_offsets),
                     doc_lens=np.array(r.doc_lens), doc_ids=np.array(r.doc_ids), doc_tasks=np.array(r.doc_tasks))
    meta = r.meta
    del r
    edit(rows)
    write_shard(shard, rows, meta)
    m = load_manifest(snap)
    entry = next(s for s in m["shards"] if s["file"] == shard.name)
    entry["bytes"], entry["sha256"] = shard.stat().st_size, sha256_file(shard)
    write_json_atomic(snap / "manifest.json", m)


def _no_bos(rows):
    rows.tokens[2, 0] = rows.tokens[2, 0] + 1


def _target_at_0(rows):
    rows.mask[1, 0] = 1


def _longer_docs(rows):
    rows.doc_lens[0] += 300


@pytest.mark.parametrize("edit, message", [(_no_bos, "does not start with BOS"),
                                           (_target_at_0, "position 0"),
                                           (_longer_docs, "longer than the row")])
def test_row_checks_catch_a_consistent_but_wrong_shard(snap, edit, message):
    shard = train_shards(snap)[1]
    _rewrite_shard(snap, shard, edit)
    verify_snapshot(snap, full=False)  # sizes and the manifest agree
    with pytest.raises(SnapshotError, match=message) as e:
        verify_snapshot(snap, full=True)
    assert e.value.file == str(shard)


def test_verify_finds_the_newest_snapshot_of_a_recipe(snap, tmp_path, capsys):
    data = snap.parents[2]
    assert latest_snapshot(data, "tiny") == snap
    assert verify.main(["--recipe", "tiny", "--data-dir", str(data)]) == 0
    assert str(snap) in capsys.readouterr().out
    assert verify.main(["--recipe", "other", "--data-dir", str(data)]) == 1
    assert "no snapshot of recipe 'other'" in capsys.readouterr().err
    assert inspect_cli.main(["--recipe", "tiny", "--data-dir", str(data), "--stats"]) == 0  # inspect finds it too
    assert inspect_cli.main(["--recipe", "other", "--data-dir", str(data)]) == 2  # error: exit 2, as every CLI


# ----------------------------------------------------------------------------- ids and locks

def test_snapshot_id_hashes_content_not_key_order():
    a = {"recipe": {"name": "x", "max_seq_len": 256}, "inputs": [["a", "1"]], "tokenizer": "fp"}
    b = {"tokenizer": "fp", "inputs": [["a", "1"]], "recipe": {"max_seq_len": 256, "name": "x"}}
    assert snapshot_id(a) == snapshot_id(b)
    assert re.fullmatch(r"[0-9a-f]{16}", snapshot_id(a))
    for changed in ({**a, "tokenizer": "fq"}, {**a, "inputs": [["a", "2"]]},
                    {**a, "recipe": {"name": "x", "max_seq_len": 512}}):
        assert snapshot_id(changed) != snapshot_id(a)


def test_lock_entry_and_compare(snap):
    m = load_manifest(snap)
    assert lock_path("data_manifests/demo.toml") == Path("data_manifests/demo.lock.json")
    lock = lock_entry(m)
    assert lock["recipe"] == "tiny" and lock["snapshot_id"] == m["snapshot_id"]
    assert lock["shards"] == {s["file"]: s["sha256"] for s in m["shards"]}
    assert compare_lock(lock, m) == []

    name = m["shards"][1]["file"]
    changed = json.loads(json.dumps(lock))
    changed["shards"][name] = "0" * 64
    diffs = compare_lock(changed, m)
    assert len(diffs) == 1 and name in diffs[0] and "0" * 64 in diffs[0]

    fewer = json.loads(json.dumps(lock))
    del fewer["shards"][name]
    fewer["snapshot_id"] = "feedfacefeedface"
    diffs = compare_lock(fewer, m)
    assert any("snapshot id" in d and "feedfacefeedface" in d for d in diffs)
    assert any(name in d and "absent" in d for d in diffs)


def test_snapshot_files_end_with_the_manifest(snap):
    m = load_manifest(snap)
    files = snapshot_files(m)
    assert files[-1] == "manifest.json" and sorted(files) == sorted(p.name for p in snap.iterdir())


# ----------------------------------------------------------------------------- inspect

HEADER = re.compile(r"\n--- conversation (\d+) \((\w+), (\d+) tokens\) ---\n")


def test_inspect_decodes_a_row(snap, capsys):
    m = load_manifest(snap)
    assert inspect_cli.main([str(snap), "--row", "0", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("train row 0 of ") and "supervised tokens shown [[like this]]" in out
    assert "[[" in out and "]]" in out and "\x1b[" not in out

    tok = load_tokenizer(snap / "tokenizer.pkl")
    shard = ShardReader(train_shards(snap)[0])
    lens, ids, tasks = shard.row_docs(0)
    names = [t["name"] for t in m["tasks"]]
    found = HEADER.findall(out)
    assert [(int(i), n, int(k)) for i, n, k in found] == [
        (int(i), names[int(t)], int(k)) for i, t, k in zip(ids, tasks, lens)]
    bodies = HEADER.split(out)[4::4]  # the text after each header
    pad = m["max_seq_len"] + 1 - int(lens.sum())
    assert bodies[-1].endswith(f"\n--- padding: {pad} tokens ---\n\n")
    bodies[-1] = bodies[-1].split("\n--- padding")[0]
    pos = 0
    for body, length in zip(bodies, lens.tolist()):
        doc = shard.tokens[0, pos:pos + length].tolist()
        assert body.replace("[[", "").replace("]]", "") == tok.decode(doc)  # the marked text is the row
        assert body.startswith("<|bos|>") and "[[" in body  # every doc here has a supervised answer
        pos += length


def test_inspect_stats_val_split_colors_and_bad_rows(snap, capsys):
    m = load_manifest(snap)
    assert inspect_cli.main([str(snap), "--stats"]) == 0
    out = capsys.readouterr().out
    assert m["snapshot_id"] in out and "max_seq_len 256" in out
    for t in m["tasks"]:
        assert t["name"] in out
    assert re.search(r"^train: [\d,]+ rows", out, re.M) and re.search(r"^val: [\d,]+ rows", out, re.M)

    assert inspect_cli.main([str(snap), "--split", "val", "--row", "0", "--color", "always"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("val row 0 of ") and inspect_cli.SUP_ON in out and "[[" not in out

    n = sum(s["rows"] for s in m["shards"] if s["split"] == "train")
    for bad in (n, -1):
        assert inspect_cli.main([str(snap), "--row", str(bad), "--color", "never"]) == 2
        assert capsys.readouterr().err.strip() == f"error: row {bad} out of range [0, {n})"


# ----------------------------------------------------------------------------- export / import

def test_export_import_round_trip(snap, tmp_path, capsys):
    archive = tmp_path / "snap.tar.zst"
    assert export.main([str(snap), str(archive)]) == 0
    assert capsys.readouterr().out.strip() == str(archive)
    again = export_snapshot(snap, tmp_path / "again.tar.zst")
    assert again.read_bytes() == archive.read_bytes()  # reproducible archive bytes
    mine = tmp_path / "mine.tar.zst"
    mine.write_bytes(b"someone else's file")
    assert export.main([str(snap), str(mine)]) == 2  # an existing file is never replaced
    assert "exists" in capsys.readouterr().err and mine.read_bytes() == b"someone else's file"
    assert not list(tmp_path.glob(".*.tmp-*"))

    with zstandard.ZstdDecompressor().stream_reader(archive.open("rb")) as z, tarfile.open(fileobj=z, mode="r|") as t:
        members = [(mem.name, mem.isfile()) for mem in t]
    assert members == [(f"{snap.name}/{f}", True) for f in snapshot_files(load_manifest(snap))]

    other = tmp_path / "other-data"
    assert importer.main([str(archive), "--data-dir", str(other)]) == 0
    imported = snapshots_dir(other) / snap.name
    assert capsys.readouterr().out.strip() == str(imported)
    assert hashes(imported) == hashes(snap)
    verify_snapshot(imported, full=True)
    assert sorted(p.name for p in snapshots_dir(other).iterdir()) == [snap.name]  # no temp folder left
    assert import_snapshot(archive, other) == imported  # importing twice keeps the verified copy


def test_export_refuses_a_snapshot_that_does_not_verify(snap, tmp_path, capsys):
    shard = train_shards(snap)[0]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    out = tmp_path / "out"
    out.mkdir()
    assert export.main([str(snap), str(out / "x.tar.zst")]) == 2
    assert shard.name in capsys.readouterr().err
    assert list(out.iterdir()) == []


def _archive(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with open(path, "wb") as raw, zstandard.ZstdCompressor().stream_writer(raw) as z, \
            tarfile.open(fileobj=z, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"hello\n") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.mark.parametrize("case, reason", [
    ("dotdot", "could escape"), ("dotdot-inside", "could escape"), ("absolute", "could escape"),
    ("symlink", "not a regular file"), ("hardlink", "not a regular file"), ("two-folders", "more than one folder"),
    ("nested", "could escape"), ("bare-file", "could escape")])
def test_import_refuses_archives_that_could_escape(snap, tmp_path, case, reason):
    target = tmp_path / "target"
    outside = tmp_path / "evil"
    first = _file(f"{snap.name}/tokenizer.pkl", (snap / "tokenizer.pkl").read_bytes())  # a good member first
    bad = {
        "dotdot": [_file("../evil")],
        "dotdot-inside": [first, _file(f"{snap.name}/../../evil")],
        "absolute": [_file(str(outside))],
        "symlink": [first, _link(f"{snap.name}/manifest.json", str(outside))],
        "hardlink": [first, _link(f"{snap.name}/manifest.json", "../evil", tarfile.LNKTYPE)],
        "two-folders": [first, _file("other-folder/manifest.json", (snap / "manifest.json").read_bytes())],
        "nested": [first, _file(f"{snap.name}/sub/manifest.json")],
        "bare-file": [_file("manifest.json")],
    }[case]
    archive = _archive(tmp_path / "bad.tar.zst", bad)
    with pytest.raises(SnapshotError, match=reason) as e:
        import_snapshot(archive, target)
    assert e.value.file == str(archive)
    assert not outside.exists() and not (tmp_path / "evil").exists()
    assert list(snapshots_dir(target).iterdir()) == []  # nothing unpacked, no temp folder left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.zst", "nanosft", "target"]


@pytest.mark.parametrize("damage", ["flip-early", "flip-middle", "flip-late", "truncate", "garbage", "empty-tar",
                                    "tampered-shard"])
def test_import_refuses_a_corrupted_archive(snap, tmp_path, damage):
    archive = export_snapshot(snap, tmp_path / "snap.tar.zst")
    raw = bytearray(archive.read_bytes())
    if damage.startswith("flip"):
        at = {"flip-early": 0.05, "flip-middle": 0.5, "flip-late": 0.95}[damage]
        for k in range(8):
            raw[int(len(raw) * at) + k] ^= 0x5A
        archive.write_bytes(bytes(raw))
    elif damage == "truncate":
        archive.write_bytes(bytes(raw[: len(raw) * 2 // 3]))
    elif damage == "garbage":
        archive.write_bytes(b"not an archive at all" * 100)
    elif damage == "empty-tar":
        _archive(archive, [])
    else:  # a well-formed archive whose shard bytes differ from its manifest
        names = snapshot_files(load_manifest(snap))
        members = []
        for name in names:
            data = (snap / name).read_bytes()
            if name == names[1]:
                data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
            members.append(_file(f"{snap.name}/{name}", data))
        _archive(archive, members)
    target = tmp_path / "target"
    with pytest.raises(SnapshotError):
        import_snapshot(archive, target)
    assert list(snapshots_dir(target).iterdir()) == []
