"""Faults a user or an operator causes (issue 9): Ctrl-C, concurrent builds, full or read-only disks, damaged
files, leftovers of killed runs. Each ends in one line (`error: …` exit 2, or `interrupted; …` exit 130) and
leaves nothing half-written; real subprocesses where signals and concurrency are the point."""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import zstandard

import pipeline.prepare as prep
from pipeline.errors import DataError, RecipeError, SnapshotError
from pipeline.manifest import load_manifest, verify_snapshot
from pipeline.prepare import prepare

from tests.recipes import CHAT_TRAIN, CHAT_VAL, write_recipe

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def build(recipe: Path, data_dir: Path, workers: int = 1) -> Path:
    return prepare(recipe, data_dir, workers, out=io.StringIO())


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A built small snapshot; its data dir's tokenizer is copied into fresh data dirs (no retraining)."""
    folder = tmp_path_factory.mktemp("rel")
    recipe = write_recipe(folder / "r")
    data = folder / "data"
    snap = build(recipe, data)
    return SimpleNamespace(recipe=recipe, data=data, snap=snap)


def fresh(base, tmp_path: Path, name: str = "data") -> Path:
    """A new data dir holding only the base's trained tokenizer (wherever the layout keeps it)."""
    data = tmp_path / name
    rel = next(p for p in base.data.rglob("tokenizers") if p.is_dir()).relative_to(base.data)
    shutil.copytree(base.data / rel, data / rel)
    return data


def snapshots_of(base, data: Path) -> Path:
    """The snapshots folder of a data dir (the same place as in the base's)."""
    return Path(data).resolve() / base.snap.parent.relative_to(base.data.resolve())


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("error: "), err
    return lines[-1]


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------- Ctrl-C

CTRL_C = r"""
import os, sys, time
from pathlib import Path
import pipeline.cache as cache
import pipeline.prepare as prep
cache.CHUNK = 8  # many chunks: the forked pool starts
def slow(job):  # a worker that is busy when Ctrl-C comes
    (Path(sys.argv[3]) / f"worker-{os.getpid()}").write_text("")
    time.sleep(60)
cache._render_chunk = slow
sys.exit(prep.main(["--recipe", sys.argv[1], "--data-dir", sys.argv[2], "--workers", "2"]))
"""


def test_ctrl_c_during_render_ends_pool_and_parent_promptly(base, tmp_path):
    data, marks = fresh(base, tmp_path), tmp_path / "marks"
    marks.mkdir()
    # a new session: SIGINT to its process group is what a terminal's Ctrl-C does (parent and workers)
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C, str(base.recipe), str(data), str(marks)], cwd=REPO,
                            env=ENV, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while len(list(marks.iterdir())) < 2:
            assert proc.poll() is None and time.time() - t0 < 60, proc.communicate()
            time.sleep(0.05)
        t0 = time.time()
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=40)
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert err.strip() == "interrupted; nothing was published" and out == "", err
    # a pool left running would hold the parent for the workers' 60 s sleep; the margin is for a loaded CI box
    assert elapsed < 20, elapsed
    for m in marks.iterdir():  # the workers are gone too
        with pytest.raises(ProcessLookupError):
            os.kill(int(m.name.split("-")[1]), 0)
    assert not list(data.rglob("*.tmp-*")) and not list(snapshots_of(base, data).glob("small-*"))


@pytest.mark.parametrize("stage", ["train_tokenizer", "write_shard"])
def test_ctrl_c_in_tokenizer_training_or_shard_writing_is_one_line(base, tmp_path, monkeypatch, capsys, stage):
    data = tmp_path / "data" if stage == "train_tokenizer" else fresh(base, tmp_path)

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(prep, stage, interrupted)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # keep pytest's own SIGINT handler
    try:
        code = prep.main(["--recipe", str(base.recipe), "--data-dir", str(data), "--workers", "1"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main() as a traceback")
    assert code == 130
    assert capsys.readouterr().err.splitlines()[-1:] == ["interrupted; nothing was published"]
    assert not list(data.rglob("*.tmp-*")) and not list(data.rglob("manifest.json"))


# ----------------------------------------------------------------------------- concurrency

def run_prepare(recipe: Path, data: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.prepare", "--recipe", str(recipe), "--data-dir",
                             str(data), "--workers", "1"], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # three real processes at once: ~10 s on a busy 2-core machine
def test_concurrent_builds_same_recipe_twice_and_another_recipe_all_succeed(base, tmp_path):
    data = fresh(base, tmp_path)
    # `small` is a prefix of `small-b`: a careless glob for one's temp folders would match the other's
    other = write_recipe(tmp_path / "r2", name="small-b", mixture_seed=7, filename="small-b.toml")
    procs = [run_prepare(base.recipe, data), run_prepare(base.recipe, data), run_prepare(other, data)]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
    assert results[0][0] == results[1][0] == f"{snapshots_of(base, data) / base.snap.name}\n"
    names = sorted(p.name for p in snapshots_of(base, data).iterdir() if not p.name.startswith("."))
    assert len(names) == 2 and names[0] == base.snap.name and names[1].startswith("small-b-")
    assert not list(data.rglob("*.tmp-*"))
    for name in names:
        verify_snapshot(snapshots_of(base, data) / name)


def test_a_snapshot_published_meanwhile_by_another_process_counts_as_success(base, tmp_path, monkeypatch):
    data = fresh(base, tmp_path)
    real = prep.write_json_atomic

    def and_meanwhile(path, value):  # just before this build publishes, another one publishes the same id
        real(path, value)
        if Path(path).name == "manifest.json":
            shutil.copytree(base.snap, snapshots_of(base, data) / base.snap.name)
    monkeypatch.setattr(prep, "write_json_atomic", and_meanwhile)
    out = io.StringIO()
    snap = prepare(base.recipe, data, 1, out=out)
    assert snap == snapshots_of(base, data) / base.snap.name and "published by another process" in out.getvalue()
    assert [p.name for p in snapshots_of(base, data).iterdir()] == [base.snap.name]
    verify_snapshot(snap)


def test_stale_temps_of_dead_processes_go_and_live_ones_stay(tmp_path):
    from pipeline.tempfiles import remove_stale_temps
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        dead = dead_pid()
        (tmp_path / f".a.tmp-{dead}").mkdir()
        (tmp_path / f".b.pt.tmp-{dead}").write_text("")
        (tmp_path / f".c.tmp-{live.pid}").mkdir()
        removed = remove_stale_temps(tmp_path)
        assert sorted(p.name for p in removed) == [f".a.tmp-{dead}", f".b.pt.tmp-{dead}"]
        assert [p.name for p in tmp_path.iterdir()] == [f".c.tmp-{live.pid}"]
    finally:
        live.kill()
        live.wait()


def test_a_live_build_temp_of_another_recipe_survives(base, tmp_path):
    data = fresh(base, tmp_path)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        snapshots = snapshots_of(base, data)
        theirs = snapshots / f".small-b-0123456789abcdef.tmp-{live.pid}"  # another recipe, building now
        mine_dead = snapshots / f".small-0123456789abcdef.tmp-{dead_pid()}"
        theirs.mkdir(parents=True)
        mine_dead.mkdir()
        build(base.recipe, data)
        assert theirs.is_dir() and not mine_dead.exists()
    finally:
        live.kill()
        live.wait()


# ----------------------------------------------------------------------------- one-line errors: disk, folders

def prepare_cli(recipe: Path, data: Path) -> int:
    return prep.main(["--recipe", str(recipe), "--data-dir", str(data), "--workers", "1"])


@pytest.mark.parametrize("where", ["write_shard", "write_json_atomic"])
def test_disk_full_during_prepare_is_one_line_and_publishes_nothing(base, tmp_path, monkeypatch, capsys, where):
    data = fresh(base, tmp_path)

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(prep, where, full)
    assert prepare_cli(base.recipe, data) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "disk is full" in line and ("train-00000" in line or "manifest.json" in line), line
    assert not list(snapshots_of(base, data).glob("small-*")) and not list(data.rglob("*.tmp-*"))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_real_full_disk_under_pyarrow_names_the_shard(base, tmp_path, monkeypatch):
    from pipeline.cli import describe_os_error
    import pyarrow as pa
    from pipeline.shard_format import ShardReader, ShardRows, write_shard
    shard = ShardReader(sorted(base.snap.glob("train-*.arrow"))[0])
    rows = ShardRows(tokens=shard.tokens, mask=shard.mask, doc_offsets=shard.doc_offsets, doc_lens=shard.doc_lens,
                     doc_ids=shard.doc_ids, doc_tasks=shard.doc_tasks)
    real = pa.OSFile
    monkeypatch.setattr(pa, "OSFile", lambda path, mode="r": real("/dev/full", mode))  # writes fail with ENOSPC
    with pytest.raises(OSError) as e:
        write_shard(tmp_path / "x.arrow", rows, shard.meta)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "x.arrow")
    assert describe_os_error(e.value) == f"{tmp_path / 'x.arrow'}: the disk is full: free some space and run again; " \
                                         "nothing was published"
    assert not list(tmp_path.iterdir())


def test_os_errors_without_a_file_name_still_read_as_one_line():
    from pipeline.cli import describe_os_error, run_cli
    e = OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device\nmore")
    assert describe_os_error(e).count("\n") == 0 and "No space left" in describe_os_error(e)
    assert run_cli(lambda: (_ for _ in ()).throw(e)) == 2


def test_read_only_data_dir_is_one_line(base, tmp_path, monkeypatch, capsys):
    data = tmp_path / "ro"
    data.mkdir()
    real = Path.mkdir

    def read_only(self, *a, **k):  # as if `data` were on a read-only mount (tests may run as root: no chmod)
        if str(self).startswith(str(data.resolve())) and self != data.resolve():
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *a, **k)
    monkeypatch.setattr(Path, "mkdir", read_only)
    assert prepare_cli(base.recipe, data) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "read-only" in line and str(data.resolve()) in line, line


def test_data_dir_that_is_a_file_is_one_line(base, tmp_path, capsys):
    data = tmp_path / "file"
    data.write_text("")
    assert prepare_cli(base.recipe, data) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(data.resolve()) in line and "is a file" in line, line


def test_export_into_a_missing_folder_is_one_line(base, tmp_path, capsys):
    export = __import__("pipeline.export", fromlist=["main"])
    assert export.main([str(base.snap), str(tmp_path / "nope" / "x.tar.zst")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(tmp_path / "nope") in line and "does not exist" in line, line


# ----------------------------------------------------------------------------- damaged snapshot files

def copy_snapshot(base, tmp_path: Path) -> Path:
    dst = tmp_path / "snapshots" / base.snap.name
    shutil.copytree(base.snap, dst)
    return dst


def same_size(data: bytes, size: int) -> bytes:
    assert len(data) <= size
    return data + b"\0" * (size - len(data))


def hostile_pickle() -> bytes:
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch /tmp/nanosft-pwned",))
    return pickle.dumps(Evil())


@pytest.mark.parametrize("damage", ["hostile", "truncated"])
def test_damaged_tokenizer_in_a_snapshot_is_one_line_from_inspect(base, tmp_path, capsys, damage):
    inspect_cli = __import__("pipeline.inspect", fromlist=["main"])
    snap = copy_snapshot(base, tmp_path)
    tok = snap / "tokenizer.pkl"
    raw = tok.read_bytes()
    tok.write_bytes(same_size(hostile_pickle() if damage == "hostile" else raw[: len(raw) // 2], len(raw)))
    assert inspect_cli.main([str(snap), "--row", "0", "--color", "never"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(tok) in line, line


def test_verify_recomputes_the_snapshot_id(base, tmp_path, capsys):
    verify = __import__("pipeline.verify", fromlist=["main"])
    snap = copy_snapshot(base, tmp_path)
    m = json.loads((snap / "manifest.json").read_text())
    m["snapshot_id"] = "0123456789abcdef"
    (snap / "manifest.json").write_text(json.dumps(m))
    assert verify.main([str(snap)]) == 1 and verify.main([str(snap), "--quick"]) == 1
    assert "the manifest was edited" in capsys.readouterr().err


def test_quick_open_compares_shard_metadata_with_the_manifest(base, tmp_path):
    snap = copy_snapshot(base, tmp_path)
    m = json.loads((snap / "manifest.json").read_text())
    m["max_seq_len"] = m["max_seq_len"] // 2  # the recipe (the id) is untouched: only this field lies
    (snap / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SnapshotError, match=r"max_seq_len 256 vs manifest 128") as e:
        verify_snapshot(snap, full=False)
    assert e.value.file.endswith(".arrow")


def test_damaged_arrow_footer_names_the_shard_in_a_quick_open(base, tmp_path):
    snap = copy_snapshot(base, tmp_path)
    shard = sorted(snap.glob("train-*.arrow"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-40:-10] = b"\xff" * 30  # the footer's flatbuffer, before its length and the ARROW1 magic
    shard.write_bytes(bytes(raw))
    with pytest.raises(SnapshotError) as e:
        verify_snapshot(snap, full=False)
    assert e.value.file == str(shard), str(e.value)


# ----------------------------------------------------------------------------- import / export leftovers

def archive_of(folder: Path, out: Path, arcname: str, dir_entry: bool = True, subdir: bool = False) -> Path:
    """What `tar --zstd -cf out -C parent folder` writes: a directory entry, then the files."""
    with open(out, "wb") as raw, zstandard.ZstdCompressor().stream_writer(raw) as z, \
            tarfile.open(fileobj=z, mode="w|") as tar:
        if dir_entry:
            tar.add(folder, arcname=arcname, recursive=False)
        if subdir:
            tar.add(folder, arcname=f"{arcname}/sub", recursive=False)
        for p in sorted(folder.iterdir()):
            tar.add(p, arcname=f"{arcname}/{p.name}")
    return out


def test_import_accepts_a_plain_tar_zstd_with_its_folder_entry(base, tmp_path):
    importer = __import__("pipeline.import", fromlist=["import_snapshot"])
    archive = archive_of(base.snap, tmp_path / "plain.tar.zst", base.snap.name)
    out = importer.import_snapshot(archive, tmp_path / "data")
    assert out.name == base.snap.name
    verify_snapshot(out)
    bad = archive_of(base.snap, tmp_path / "sub.tar.zst", base.snap.name, subdir=True)
    with pytest.raises(SnapshotError, match="pipeline.export"):
        importer.import_snapshot(bad, tmp_path / "data2")


@pytest.mark.skipif(not (shutil.which("tar") and shutil.which("zstd")), reason="needs tar and zstd")
def test_import_accepts_what_gnu_tar_zstd_writes(base, tmp_path):
    importer = __import__("pipeline.import", fromlist=["import_snapshot"])
    archive = tmp_path / "gnu.tar.zst"
    subprocess.run(["tar", "--zstd", "-cf", str(archive), "-C", str(base.snap.parent), base.snap.name], check=True)
    out = importer.import_snapshot(archive, tmp_path / "data")
    assert out.name == base.snap.name
    verify_snapshot(out)


def test_import_of_a_renamed_folder_publishes_under_the_manifest_name(base, tmp_path, capsys):
    importer = __import__("pipeline.import", fromlist=["import_snapshot"])
    archive = archive_of(base.snap, tmp_path / "renamed.tar.zst", "my-renamed-copy", dir_entry=False)
    out = importer.import_snapshot(archive, tmp_path / "data")
    assert out.name == base.snap.name and "my-renamed-copy" in capsys.readouterr().err
    assert [p.name for p in snapshots_of(base, tmp_path / "data").iterdir()] == [base.snap.name]


def test_import_over_a_corrupt_copy_says_how_to_fix_it(base, tmp_path, capsys):
    importer = __import__("pipeline.import", fromlist=["main"])
    archive = archive_of(base.snap, tmp_path / "a.tar.zst", base.snap.name)
    existing = snapshots_of(base, tmp_path / "data") / base.snap.name
    shutil.copytree(base.snap, existing)
    (existing / "tokenizer.pkl").write_bytes(b"x")
    assert importer.main([str(archive), "--data-dir", str(tmp_path / "data")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"rm -r {existing}" in line, line
    shutil.rmtree(existing)
    assert importer.main([str(archive), "--data-dir", str(tmp_path / "data")]) == 0


def test_demo_writer_removes_its_stale_temps(tmp_path):
    from pipeline.demo_data import SOURCE_PATHS, write_demo_sources
    target = tmp_path / SOURCE_PATHS["smoltalk_train"]
    target.parent.mkdir(parents=True)
    stale = target.with_name(f".{target.name}.tmp-{dead_pid()}")
    stale.write_bytes(b"half")
    write_demo_sources(tmp_path, sizes={k: 2 for k in SOURCE_PATHS})
    assert not stale.exists() and target.is_file()


# ----------------------------------------------------------------------------- recipes and source rows



def chat_jsonl(path: Path, n: int, raw: dict[int, bytes] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"messages": [{"role": "user", "content": f"q{i}?"}, {"role": "assistant",
                                                                            "content": f"a{i}."}]}).encode()
             for i in range(1, n + 1)]
    for lineno, b in (raw or {}).items():
        lines[lineno - 1] = b
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("name", ["../../escaped", "a/b", ".hidden", "has space", "ünï", ""])
def test_recipe_name_outside_the_safe_set_is_refused_at_load(base, tmp_path, capsys, name):
    recipe = write_recipe(tmp_path / "r", name=name)
    with pytest.raises(RecipeError) as e:
        prep.load_recipe(recipe)
    assert e.value.field == "name" and e.value.file == str(recipe)
    data = tmp_path / "d" / "data"
    assert prepare_cli(recipe, data) == 2
    assert "field 'name'" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "d").exists() or not list((tmp_path / "d").rglob("*escaped*"))


@pytest.mark.parametrize("params, field", [('{ path = 3 }', "train[1].params.path"),
                                           ('{ path = "identity_conversations.jsonl", pth = "x" }',
                                            "train[1].params.pth")])
def test_task_parameter_errors_name_the_recipe_file_and_dotted_field(tmp_path, params, field):
    train = f"""
[[train]]
kind = "smoltalk"
params = {{ split = "train" }}

[[train]]
kind = "customjson"
name = "identity"
params = {params}
"""
    recipe = write_recipe(tmp_path, train=train)
    with pytest.raises(RecipeError) as e:
        prep.load_recipe(recipe)
    assert e.value.file == str(recipe) and e.value.field == field, str(e.value)
    assert str(recipe) in str(e.value) and field in str(e.value)


def test_invalid_utf8_on_line_20_is_skipped_with_its_line_number(base, tmp_path):
    data = fresh(base, tmp_path)
    src = chat_jsonl(data / "mychat.jsonl", 30, {20: b'{"messages": "\xff\xfe"}'})
    recipe = write_recipe(tmp_path / "r", bad_rows="skip", train=CHAT_TRAIN.format(path=src.as_posix()), val=CHAT_VAL)
    snap = build(recipe, data)
    mine = next(t for t in load_manifest(snap)["stats"]["tasks"] if t["name"] == "mychat")
    assert mine["bad"] == 1 and mine["conversations"] == 30 and mine["packed"] == 29
    skipped = load_manifest(snap)["stats"]["skipped_examples"]
    assert any("row 20" in e and "UTF-8" in e and "line 20" in e for e in skipped), skipped

    recipe = write_recipe(tmp_path / "f", bad_rows="fail", train=CHAT_TRAIN.format(path=src.as_posix()), val=CHAT_VAL)
    with pytest.raises(DataError) as e:
        build(recipe, data)
    assert e.value.row == 20 and e.value.file == str(src.resolve()) and "UTF-8" in str(e.value)


def test_an_empty_source_file_is_refused_under_fail_and_reported_under_skip(base, tmp_path):
    data = fresh(base, tmp_path)
    src = data / "empty.jsonl"
    src.write_bytes(b"")
    recipe = write_recipe(tmp_path / "f", train=CHAT_TRAIN.format(path=src.as_posix()), val=CHAT_VAL)
    with pytest.raises(DataError) as e:
        build(recipe, data)
    assert str(src.resolve()) in str(e.value) and e.value.task == "mychat" and e.value.field == "train[0]"

    recipe = write_recipe(tmp_path / "s", bad_rows="skip", train=CHAT_TRAIN.format(path=src.as_posix()), val=CHAT_VAL)
    out = io.StringIO()
    prepare(recipe, data, 1, out=out)
    assert f"warning: task mychat: no conversation: its source file(s) {src.resolve()}" in out.getvalue()

    alone = CHAT_TRAIN.format(path=src.as_posix()).split("[[train]]\nkind = \"simplespelling\"")[0]
    recipe = write_recipe(tmp_path / "a", bad_rows="skip", train=alone, val=CHAT_VAL)
    with pytest.raises(DataError, match="no conversation left to pack; empty task\\(s\\): mychat") as e:
        build(recipe, data)
    assert str(src.resolve()) in str(e.value)
