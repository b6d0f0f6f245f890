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
from pipeline.cli import describe_os_error, run_cli
from pipeline.errors import DataError, RecipeError, SnapshotError
from pipeline.manifest import load_manifest, sha256_file, verify_snapshot
from pipeline.prepare import prepare
from pipeline.tempfiles import remove_stale_temps

from tests.recipes import write_recipe

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
    data = tmp_path / name
    shutil.copytree(base.data / "tokenizers", data / "tokenizers")
    return data


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


def test_ctrl_c_during_render_ends_pool_and_parent_in_a_second(base, tmp_path):
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
        out, err = proc.communicate(timeout=10)
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert err.strip() == "interrupted; nothing was published" and out == "", err
    assert elapsed < 2.5, elapsed
    for m in marks.iterdir():  # the workers are gone too
        with pytest.raises(ProcessLookupError):
            os.kill(int(m.name.split("-")[1]), 0)
    assert not list(data.rglob("*.tmp-*")) and not list((data / "snapshots").glob("small-*"))


@pytest.mark.parametrize("stage", ["train_tokenizer", "write_shard"])
def test_ctrl_c_in_tokenizer_training_or_shard_writing_is_one_line(base, tmp_path, monkeypatch, capsys, stage):
    data = tmp_path / "data" if stage == "train_tokenizer" else fresh(base, tmp_path)

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(prep, stage, interrupted)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # keep pytest's own SIGINT handler
    assert prep.main(["--recipe", str(base.recipe), "--data-dir", str(data), "--workers", "1"]) == 130
    assert capsys.readouterr().err.splitlines()[-1:] == ["interrupted; nothing was published"]
    assert not list(data.rglob("*.tmp-*")) and not list(data.rglob("manifest.json"))


# ----------------------------------------------------------------------------- concurrency

def run_prepare(recipe: Path, data: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.prepare", "--recipe", str(recipe), "--data-dir",
                             str(data), "--workers", "1"], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_concurrent_builds_same_recipe_twice_and_another_recipe_all_succeed(base, tmp_path):
    data = fresh(base, tmp_path)
    # `small` is a prefix of `small-b`: a careless glob for one's temp folders would match the other's
    other = write_recipe(tmp_path / "r2", name="small-b", mixture_seed=7, filename="small-b.toml")
    procs = [run_prepare(base.recipe, data), run_prepare(base.recipe, data), run_prepare(other, data)]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
    assert results[0][0] == results[1][0] == f"{data.resolve() / 'snapshots' / base.snap.name}\n"
    names = sorted(p.name for p in (data / "snapshots").iterdir())
    assert len(names) == 2 and names[0] == base.snap.name and names[1].startswith("small-b-")
    assert not list(data.rglob("*.tmp-*"))
    for name in names:
        verify_snapshot(data / "snapshots" / name)


def test_a_snapshot_published_meanwhile_by_another_process_counts_as_success(base, tmp_path, monkeypatch):
    data = fresh(base, tmp_path)
    real = prep.write_json_atomic

    def and_meanwhile(path, value):  # just before this build publishes, another one publishes the same id
        real(path, value)
        if Path(path).name == "manifest.json":
            shutil.copytree(base.snap, data / "snapshots" / base.snap.name)
    monkeypatch.setattr(prep, "write_json_atomic", and_meanwhile)
    out = io.StringIO()
    snap = prepare(base.recipe, data, 1, out=out)
    assert snap == data.resolve() / "snapshots" / base.snap.name and "published by another process" in out.getvalue()
    assert [p.name for p in (data / "snapshots").iterdir()] == [base.snap.name]
    verify_snapshot(snap)


def test_stale_temps_of_dead_processes_go_and_live_ones_stay(tmp_path):
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
        snapshots = data / "snapshots"
        theirs = snapshots / f".small-b-0123456789abcdef.tmp-{live.pid}"  # another recipe, building now
        mine_dead = snapshots / f".small-0123456789abcdef.tmp-{dead_pid()}"
        theirs.mkdir(parents=True)
        mine_dead.mkdir()
        build(base.recipe, data)
        assert theirs.is_dir() and not mine_dead.exists()
    finally:
        live.kill()
        live.wait()
