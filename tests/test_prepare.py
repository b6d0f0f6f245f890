"""prepare-data end to end on the demo sources, scaled down: row contents, determinism, lock, policies, bad input.

Every recipe file lives in tmp_path, so lock files are written there and never into data_manifests/.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.cache as cache
import pipeline.prepare as prep
from pipeline.errors import DataError, SnapshotError
from pipeline.layout import demo_dir, render_cache_dir, snapshots_dir, tokenizers_dir
from pipeline.manifest import latest_snapshot, load_manifest, lock_entry, lock_path, sha256_file, shard_paths, verify_snapshot
from pipeline.mixture import mixture_order
from pipeline.prepare import LockMismatch, prepare
from pipeline.recipe import load_recipe
from pipeline.render import render_conversation
from pipeline.shard_format import SplitReader
from pipeline.tasks import build_task
from pipeline.tokenizer import load_tokenizer

from tests.recipes import CHAT_TRAIN, CHAT_VAL, write_recipe

REPO = Path(__file__).resolve().parents[1]


def build(recipe: Path, data_dir: Path, workers: int = 1, update_lock: bool = False) -> Path:
    return prepare(recipe, data_dir, workers, update_lock, out=io.StringIO())


def file_hashes(snapshot: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(snapshot.iterdir())}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    recipe = write_recipe(folder)
    data = folder / "data"
    snap = build(recipe, data)
    return SimpleNamespace(recipe=recipe, data=data, snap=snap, manifest=load_manifest(snap),
                           hashes=file_hashes(snap))


# ----------------------------------------------------------------------------- an independent model of a snapshot

def expected_split(recipe_path: Path, data_dir: Path, manifest: dict, split: str, tok) -> list[dict]:
    """Per mixture position: the task index and the fully rendered conversation, recomputed from the sources."""
    recipe = load_recipe(recipe_path)
    specs = getattr(recipe, split)
    index = {(t["split"], t["name"]): t["index"] for t in manifest["tasks"]}
    entries = [s for s in specs for _ in range(s.repeat)]
    tasks = {s.name: build_task(s, data_dir) for s in specs}
    order = mixture_order([len(tasks[s.name]) for s in entries], seed=recipe.mixture_seed)
    rendered = {}
    out = []
    for e, local in order.tolist():
        name = entries[e].name
        if (name, local) not in rendered:
            conv = tasks[name][local]
            rendered[name, local] = (conv, *render_conversation(conv, tok, "assistant"))
        conv, ids, mask = rendered[name, local]
        out.append({"task": index[split, name], "name": name, "conv": conv, "ids": ids, "mask": mask})
    return out


def strings_of(conv: dict) -> list[str]:
    out = []
    for m in conv["messages"]:
        parts = [m["content"]] if isinstance(m["content"], str) else [p["text"] for p in m["content"]]
        out.extend(p for p in parts if p.strip())
    return out


def check_snapshot_rows(recipe_path: Path, data_dir: Path, snap: Path) -> None:
    """Every row, document and statistic of `snap` against a re-derivation from the sources."""
    manifest = verify_snapshot(snap, full=True)
    recipe = load_recipe(recipe_path)
    cap = recipe.max_seq_len + 1
    tok = load_tokenizer(snap / "tokenizer.pkl")
    bos = tok.bos_id
    stats = {(t["split"], t["name"]): t for t in manifest["stats"]["tasks"]}
    for split in ("train", "val"):
        exp = expected_split(recipe_path, data_dir, manifest, split, tok)
        reader = SplitReader(shard_paths(snap, manifest, split))
        assert reader.meta.row_len == cap and reader.meta.bos_id == bos
        seen = []
        for g in range(reader.num_rows):
            shard, local = reader.locate(g)
            tokens, mask = shard.tokens[local], shard.mask[local]
            lens, ids, tasks = shard.row_docs(local)
            assert tokens.shape == (cap,) and tokens[0] == bos and mask[0] == 0
            assert len(lens) >= 1 and int(lens.sum()) <= cap
            assert shard.n_supervised[local] == int(mask.sum()) > 0
            pos = 0
            for length, doc_id, task in zip(lens.tolist(), ids.tolist(), tasks.tolist()):
                e = exp[doc_id]
                want = e["ids"][:cap]
                assert task == e["task"]
                assert length == len(want)
                assert tokens[pos:pos + length].tolist() == want, f"{split} row {g} doc {doc_id}"
                want_mask = [1] * length if recipe.mask_policy == "all" else e["mask"][:cap]
                if pos == 0:
                    want_mask = [0] + list(want_mask[1:])
                assert mask[pos:pos + length].tolist() == list(want_mask)
                if len(e["ids"]) <= cap:  # whole conversation: its source text decodes back out of the row
                    text = tok.decode(tokens[pos:pos + length].tolist())
                    assert all(s in text for s in strings_of(e["conv"]))
                seen.append(doc_id)
                pos += length
            assert (tokens[pos:] == bos).all() and (mask[pos:] == 0).all()  # padding: BOS, never supervised

        # placement: each kept mixture position exactly once; the rest counted in the stats
        counts: dict[str, Counter] = {}
        kept = []
        for p, e in enumerate(exp):
            c = counts.setdefault(e["name"], Counter())
            c["conversations"] += 1
            long = len(e["ids"]) > cap
            if long and recipe.overlong == "drop":
                c["dropped_long"] += 1
                continue
            c["truncated"] += long
            n = min(len(e["ids"]), cap)
            sup = n - 1 if recipe.mask_policy == "all" else sum(e["mask"][1:n])
            if sup <= 0:
                c["dropped_unsupervised"] += 1
                continue
            c["packed"] += 1
            c["tokens"] += n
            kept.append(p)
        assert Counter(seen) == Counter(kept)  # no duplicates, nothing missing
        assert sorted(seen) == kept
        for name, c in counts.items():
            s = stats[split, name]
            for key in ("conversations", "packed", "tokens", "truncated", "dropped_long", "dropped_unsupervised"):
                assert s[key] == c[key], (split, name, key)
            assert s["bad"] == 0
        summary = next(s for s in manifest["stats"]["splits"] if s["split"] == split)
        assert summary["rows"] == reader.num_rows
        assert summary["tokens"] == sum(c["tokens"] for c in counts.values())
        assert summary["lower_bound_rows"] == -(-summary["tokens"] // cap) <= reader.num_rows


# ----------------------------------------------------------------------------- the base snapshot

def test_snapshot_verifies_and_is_self_contained(base):
    m = verify_snapshot(base.snap, full=True)
    assert base.snap.parent == base.data.resolve() / "nanosft" / "snapshots"
    assert base.snap.name == f"small-{m['snapshot_id']}"
    assert m["max_seq_len"] == 256 and m["tokenizer"]["vocab_size"] == 512
    assert load_tokenizer(base.snap / "tokenizer.pkl").fingerprint == m["tokenizer"]["fingerprint"]
    names = [s["file"] for s in m["shards"]]
    train = [n for n in names if n.startswith("train-")]
    assert len(train) > 2 and train[0] == f"train-00000-of-{len(train):05d}.arrow"  # several shards
    assert sorted(p.name for p in base.snap.iterdir()) == sorted(names + ["manifest.json", "tokenizer.pkl"])
    assert {Path(i["path"]).name for i in m["inputs"]} >= {"identity_conversations.jsonl", "00000.parquet"}
    # the lock went next to the recipe copy, not into the repository
    assert json.loads(lock_path(base.recipe).read_text()) == lock_entry(m)
    assert not (REPO / "data_manifests" / "small.lock.json").exists()


def test_rows_are_the_rendered_conversations_of_their_doc_ids(base):
    stats = {(t["split"], t["name"]): t for t in base.manifest["stats"]["tasks"]}
    assert stats["train", "smoltalk"]["truncated"] > 0  # the truncation path is exercised
    check_snapshot_rows(base.recipe, demo_dir(base.data), base.snap)


def test_workers_do_not_change_the_bytes(base, tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "CHUNK", 64)  # several chunks per task, so the pool really splits the work
    pools = []
    real = cache.mp.get_context
    monkeypatch.setattr(cache.mp, "get_context", lambda method: pools.append(method) or real(method))
    snap = build(base.recipe, tmp_path / "data", workers=2)
    assert pools  # the parallel path ran
    assert snap.name == base.snap.name
    assert file_hashes(snap) == base.hashes


def test_manifest_names_inputs_portably(base):
    """Input paths are relative (data dir or site-packages): the id must not depend on where files live."""
    paths = [d["path"] for d in base.manifest["inputs"]]
    assert paths and not any(p.startswith("/") for p in paths), paths
    assert any(p.startswith("site-packages/english_words/") for p in paths)  # the default word list


def test_rebuild_is_byte_identical_and_a_finished_snapshot_is_kept(base, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r")
    data = tmp_path / "data"
    snap = build(recipe, data)
    assert file_hashes(snap) == base.hashes  # another data dir, same bytes
    stamp = {p.name: p.stat().st_mtime_ns for p in snap.iterdir()}

    out = io.StringIO()
    assert prepare(recipe, data, 1, out=out) == snap
    assert "nothing to do" in out.getvalue()
    assert {p.name: p.stat().st_mtime_ns for p in snap.iterdir()} == stamp  # untouched

    shard = next(snap.glob("train-*.arrow"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    out = io.StringIO()
    assert prepare(recipe, data, 1, out=out) == snap  # a damaged snapshot is rebuilt, not trusted
    assert "fails verification" in out.getvalue()
    assert file_hashes(snap) == base.hashes
    aside = [p for p in snap.parent.iterdir() if p.name.startswith(f".{snap.name}.failed-")]
    assert len(aside) == 1 and (aside[0] / shard.name).read_bytes() == bytes(raw)  # moved aside, not deleted
    assert str(aside[0]) in out.getvalue()
    shutil.rmtree(aside[0])

    shutil.rmtree(snap)
    assert prep.main(["--recipe", str(recipe), "--data-dir", str(data), "--workers", "1"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(snap)  # the path is printed last
    assert file_hashes(snap) == base.hashes


def test_lock_file_pins_the_snapshot(base, tmp_path, capsys):
    folder = tmp_path / "r"
    recipe = write_recipe(folder)
    data = tmp_path / "data"
    shutil.copytree(tokenizers_dir(base.data), tokenizers_dir(data))
    first = build(recipe, data)
    lock_file = folder / "small.lock.json"
    lock = json.loads(lock_file.read_text())
    assert lock == lock_entry(load_manifest(first)) and lock["snapshot_id"] in first.name

    for change in ({"window": 8}, {"mixture_seed": 7}):
        write_recipe(folder, **change)
        with pytest.raises(LockMismatch) as e:
            build(recipe, data)
        msg = str(e.value)
        assert "SNAPSHOT DIFFERS FROM THE LOCK" in msg and str(lock_file) in msg
        assert "snapshot id" in msg and "--update-lock" in msg and "kept" in msg
        assert "train-00000-of-" in msg  # the differing shard hashes are listed
        assert json.loads(lock_file.read_text()) == lock  # the lock is not touched
        changed = [p for p in snapshots_dir(data).iterdir() if p != first and p.name.startswith("small-")]
        assert len(changed) == 1 and verify_snapshot(changed[0])  # the new snapshot is kept, complete
        assert prep.main(["--recipe", str(recipe), "--data-dir", str(data), "--workers", "1"]) == 3
        assert "SNAPSHOT DIFFERS" in capsys.readouterr().err
        shutil.rmtree(changed[0])

    accepted = build(recipe, data, update_lock=True)  # mixture_seed = 7 accepted
    assert json.loads(lock_file.read_text()) == lock_entry(load_manifest(accepted))
    assert build(recipe, data) == accepted  # and from now on it matches
    write_recipe(folder)
    with pytest.raises(LockMismatch):
        build(recipe, data)  # going back is a change too


# ----------------------------------------------------------------------------- policies

def test_mask_policy_all_supervises_every_real_token(base, tmp_path):
    recipe = write_recipe(tmp_path / "r", mask_policy="all")
    snap = build(recipe, base.data)  # same data dir: the render cache serves both policies
    assert snap != base.snap
    check_snapshot_rows(recipe, demo_dir(base.data), snap)
    m = load_manifest(snap)
    drops = sum(t["dropped_unsupervised"] for t in base.manifest["stats"]["tasks"])
    assert drops == 0  # so both policies place the same conversations into the same rows
    for split in ("train", "val"):
        a = SplitReader(shard_paths(base.snap, base.manifest, split))
        b = SplitReader(shard_paths(snap, m, split))
        n, row_len = a.num_rows, a.meta.row_len
        assert b.num_rows == n
        ta, ma = np.zeros((n, row_len), np.uint16), np.zeros((n, row_len), np.uint8)
        tb, mb = np.zeros_like(ta), np.zeros_like(ma)
        a.gather(np.arange(n), ta, ma)
        b.gather(np.arange(n), tb, mb)
        np.testing.assert_array_equal(ta, tb)
        fill = np.array([int(b.row_docs(r)[0].sum()) for r in range(n)])
        pos = np.arange(row_len)
        np.testing.assert_array_equal(mb, ((pos > 0) & (pos[None, :] < fill[:, None])).astype(np.uint8))
        assert (ma <= mb).all() and ma.sum() < mb.sum()


def test_overlong_drop_versus_truncate(base, tmp_path):
    recipe = write_recipe(tmp_path / "r", overlong="drop")
    snap = build(recipe, base.data)
    check_snapshot_rows(recipe, demo_dir(base.data), snap)
    trunc = {(t["split"], t["name"]): t for t in base.manifest["stats"]["tasks"]}
    drop = {(t["split"], t["name"]): t for t in load_manifest(snap)["stats"]["tasks"]}
    assert sum(t["truncated"] for t in trunc.values()) > 0
    for key, t in trunc.items():
        d = drop[key]
        assert d["truncated"] == 0 and t["dropped_long"] == 0
        assert d["dropped_long"] == t["truncated"]
        assert d["packed"] == t["packed"] - t["truncated"]


# ----------------------------------------------------------------------------- bad input



def chat_line(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question number {i}?"},
                         {"role": "assistant", "content": f"answer number {i}."}]}


def write_jsonl(path: Path, n: int, bad: dict[int, str | dict]) -> Path:
    """n lines; `bad` maps a 1-based line number to a raw line or a replacement object."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for lineno in range(1, n + 1):
        v = bad.get(lineno, chat_line(lineno))
        lines.append(v if isinstance(v, str) else json.dumps(v))
    path.write_text("\n".join(lines) + "\n")
    return path


WRONG_ROLE = {"messages": [{"role": "user", "content": "BADROW7 hi"}, {"role": "user", "content": "BADROW7 again"}]}
NOT_A_STRING = {"messages": [{"role": "user", "content": "BADROW5 hi"}, {"role": "assistant", "content": 42}]}


def bad_parquet_missing_column(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"conversation": [json.dumps(chat_line(i)) for i in range(10)]}), path)
    return path


def bad_parquet_role(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [chat_line(i)["messages"] for i in range(10)]
    rows[3] = [{"role": "assistant", "content": "BADROW3"}, {"role": "user", "content": "x"}]
    pq.write_table(pa.table({"messages": rows}), path)
    return path


@pytest.mark.parametrize("overlong, mask_policy, dropped_long, dropped_unsupervised, truncated", [
    ("truncate", "assistant", 0, 2, 3), ("drop", "assistant", 3, 0, 0), ("truncate", "all", 0, 0, 3)])
def test_conversations_cut_before_any_target(base, tmp_path, overlong, mask_policy, dropped_long,
                                             dropped_unsupervised, truncated):
    """A long user turn pushes the answer past the row: under `assistant` nothing is left to learn from."""
    data = tmp_path / "data"
    shutil.copytree(tokenizers_dir(base.data), tokenizers_dir(data))
    long_text = " ".join(f"filler{i}" for i in range(400))
    long_q = {"messages": [{"role": "user", "content": long_text}, {"role": "assistant", "content": "ok"}]}
    long_a = {"messages": [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": long_text}]}
    src = write_jsonl(data / "mychat.jsonl", 20, {3: long_q, 9: long_q, 14: long_a})
    recipe = write_recipe(tmp_path / "r", overlong=overlong, mask_policy=mask_policy,
                          train=CHAT_TRAIN.format(path=src.as_posix()), val=CHAT_VAL)
    snap = build(recipe, data)
    check_snapshot_rows(recipe, demo_dir(data), snap)
    mine = next(t for t in load_manifest(snap)["stats"]["tasks"] if t["name"] == "mychat")
    assert (mine["dropped_long"], mine["dropped_unsupervised"], mine["truncated"]) == (
        dropped_long, dropped_unsupervised, truncated)
    assert mine["packed"] == 20 - dropped_long - dropped_unsupervised


@pytest.mark.parametrize("case", ["role", "json", "content", "parquet-column", "parquet-role"])
def test_bad_input_fails_naming_file_row_field_and_writes_nothing(base, tmp_path, case, capsys):
    data = tmp_path / "data"
    shutil.copytree(tokenizers_dir(base.data), tokenizers_dir(data))
    if case == "role":
        src, expect = write_jsonl(data / "mychat.jsonl", 12, {7: WRONG_ROLE}), ["row 7", "messages[1].role"]
    elif case == "json":
        src, expect = write_jsonl(data / "mychat.jsonl", 12, {4: '{"messages": [{"role": "user"'}), ["row 4", "JSON"]
    elif case == "content":
        src, expect = write_jsonl(data / "mychat.jsonl", 12, {5: NOT_A_STRING}), ["row 5", "messages[1].content"]
    elif case == "parquet-column":
        src, expect = bad_parquet_missing_column(data / "mychat.parquet"), ["missing column 'messages'", "messages"]
    else:
        src, expect = bad_parquet_role(data / "mychat.parquet"), ["row 3", "messages[0].role"]
    recipe = write_recipe(tmp_path / "r", train=CHAT_TRAIN.format(path=src.as_posix()), val=CHAT_VAL)
    with pytest.raises(DataError) as e:
        build(recipe, data)
    msg = str(e.value)
    assert str(src.resolve()) in msg and all(x in msg for x in expect), msg
    assert e.value.file == str(src.resolve())  # the location travels as attributes too, not only as text
    if case in ("role", "content", "parquet-role"):
        assert e.value.row is not None and e.value.field in msg
    snapshots = snapshots_dir(data)
    assert not snapshots.exists() or list(snapshots.iterdir()) == []  # no snapshot, no temp folder
    assert not list(data.rglob("*.tmp-*"))
    assert not lock_path(recipe).exists()
    assert prep.main(["--recipe", str(recipe), "--data-dir", str(data), "--workers", "1"]) == 2
    assert str(src.resolve()) in capsys.readouterr().err


def test_bad_rows_skip_counts_and_lists_them(base, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tokenizers_dir(base.data), tokenizers_dir(data))
    src = write_jsonl(data / "mychat.jsonl", 30, {5: NOT_A_STRING, 7: WRONG_ROLE})
    recipe = write_recipe(tmp_path / "r", bad_rows="skip", train=CHAT_TRAIN.format(path=src.as_posix()), val=CHAT_VAL)
    snap = build(recipe, data)
    m = verify_snapshot(snap)
    stats = {(t["split"], t["name"]): t for t in m["stats"]["tasks"]}
    mine = stats["train", "mychat"]
    assert (mine["conversations"], mine["bad"], mine["packed"]) == (30, 2, 28)
    assert stats["train", "simplespelling"]["bad"] == 0 and stats["val", "smoltalk"]["bad"] == 0
    skipped = m["stats"]["skipped_examples"]
    assert len(skipped) == 2
    assert any("row 5" in s and "messages[1].content" in s and str(src.resolve()) in s for s in skipped)
    assert any("row 7" in s and "messages[1].role" in s and str(src.resolve()) in s for s in skipped)
    # the good lines are all there, the bad ones nowhere
    tok = load_tokenizer(snap / "tokenizer.pkl")
    reader = SplitReader(shard_paths(snap, m, "train"))
    text = "".join(tok.decode(reader.locate(g)[0].tokens[reader.locate(g)[1]].tolist()) for g in range(reader.num_rows))
    assert "BADROW" not in text
    for i in set(range(1, 31)) - {5, 7}:
        assert f"answer number {i}." in text


# ----------------------------------------------------------------------------- interruption

KILLER = """
import os, signal, sys
from pathlib import Path
import pipeline.prepare as prep
real, calls = prep.write_shard, []
def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # no finally block, no cleanup: a power cut
    return real(*args, **kwargs)
prep.write_shard = dying
prep.prepare(Path(sys.argv[1]), Path(sys.argv[2]), 1)
"""


def test_killed_build_leaves_nothing_that_looks_complete(base, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tokenizers_dir(base.data), tokenizers_dir(data))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(base.recipe), str(data)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert list(render_cache_dir(data).glob("*/info.json"))  # it died after rendering
    left = list(snapshots_dir(data).iterdir())
    assert len(left) == 1 and left[0].name.startswith(".")  # only a hidden temp folder
    assert len(list(left[0].glob("*.arrow"))) == 2 and not (left[0] / "manifest.json").exists()
    assert not list(snapshots_dir(data).rglob("manifest.json"))
    with pytest.raises(SnapshotError, match="not a finished snapshot"):
        verify_snapshot(left[0])
    with pytest.raises(SnapshotError, match="no snapshot"):
        latest_snapshot(data, "small")

    snap = build(base.recipe, data)
    assert file_hashes(snap) == base.hashes  # same bytes as the uninterrupted build
    assert [p.name for p in snapshots_dir(data).iterdir()] == [snap.name]  # the stale temp folder is gone


def test_failed_write_cleans_up(base, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(tokenizers_dir(base.data), tokenizers_dir(data))
    real, calls = prep.write_shard, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)
    monkeypatch.setattr(prep, "write_shard", failing)
    with pytest.raises(OSError, match="simulated"):
        build(base.recipe, data)
    assert list(snapshots_dir(data).iterdir()) == []
    monkeypatch.undo()
    assert file_hashes(build(base.recipe, data)) == base.hashes
