"""A user's nanochat base dir is never touched: the demo built and trained into it writes only under
<data_dir>/nanosft/ and into a new chatsft_checkpoints/<tag>/ folder; every file the user had there is
byte-identical afterwards, and another run's checkpoints are refused rather than replaced."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.prepare as prep
from trainer import train as train_mod
from pipeline.layout import data_dir_of, demo_dir, is_stale_temp, owned_dir, snapshots_dir
from pipeline.errors import SnapshotError
from pipeline.manifest import latest_snapshot, load_manifest
from tests.recipes import write_recipe

REPO = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "USER DATA: a real question"},
            {"role": "assistant", "content": "USER DATA: a real answer"}]


def _parquet(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    (path.parent / "manifest.json").write_text(json.dumps({"files": [path.name]}))  # nanochat master's cache


def fill_nanochat_base_dir(root: Path) -> None:
    """Every path that nanochat and nanosft read in a base dir, with a user's content (not the demo's)."""
    smol = pa.table({"messages": [MESSAGES] * 3})
    mmlu = pa.table({"question": ["USER DATA q"] * 3, "subject": ["law"] * 3, "choices": [["a", "b", "c", "d"]] * 3,
                     "answer": [1, 2, 3]})
    gsm = pa.table({"question": ["USER DATA: 1,319 real problems"] * 3, "answer": ["2 + 2 = <<2+2=4>>4\n#### 4"] * 3})
    arc = pa.table({"id": ["u1"], "question": ["USER DATA arc"],
                    "choices": [{"text": ["x", "y"], "label": ["A", "B"]}], "answerKey": ["A"]})
    for split in ("train", "test"):
        _parquet(root / f"task_data/HuggingFaceTB--smol-smoltalk/default/{split}/00000.parquet", smol)
        _parquet(root / f"task_data/openai--gsm8k/main/{split}/00000.parquet", gsm)
        for subset in ("ARC-Easy", "ARC-Challenge"):
            _parquet(root / f"task_data/allenai--ai2_arc/{subset}/{split}/00000.parquet", arc)
    for split in ("auxiliary_train", "test"):
        _parquet(root / f"task_data/cais--mmlu/all/{split}/00000.parquet", mmlu)
    files = {
        "identity_conversations.jsonl": json.dumps(MESSAGES) + "\n",
        "words_alpha.txt": "user\nwords\n", "words_alpha.txt.lock": "",
        "tokenizer/tokenizer.pkl": "a user's tokenizer", "tokenizer/token_bytes.pt": "a user's token bytes",
        "base_data_climbmix/shard_00000.parquet": "pretraining text", "eval_bundle/core.yaml": "tasks: []",
        "base_checkpoints/d2/model_000005.pt": "base weights", "base_checkpoints/d2/meta_000005.json": "{}",
        "base_checkpoints/d2/optim_000005_rank0.pt": "base optimizer",
        # another SFT run with the tag the demo trains by default (d2)
        "chatsft_checkpoints/d2/model_000010.pt": "a user's SFT weights", "chatsft_checkpoints/d2/meta_000010.json": "{}",
        "chatsft_checkpoints/d2/optim_000010_rank0.pt": "a user's SFT optimizer",
        "chatsft_checkpoints/d2/metrics.jsonl": '{"step": 1, "loss": 2.0}\n', "chatsft_checkpoints/d2/loss.png": "png",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under root: (sha256, mtime_ns), by relative path."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_build_and_train_leave_a_nanochat_base_dir_byte_identical(tmp_path, capsys, monkeypatch):
    nc = tmp_path / "nanochat"
    fill_nanochat_base_dir(nc)
    before = tree(nc)
    recipe = write_recipe(tmp_path / "recipe", name="demo", filename="demo.toml")

    # the README's main-job command with a nanochat base dir, demo recipe
    assert prep.main(["--recipe", str(recipe), "--data-dir", str(nc), "--workers", "1"]) == 0
    snap = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert snap.parent == snapshots_dir(nc.resolve()) and data_dir_of(snap) == nc.resolve()
    assert latest_snapshot(nc, "demo") == snap
    inputs = [i["path"] for i in load_manifest(snap)["inputs"]]
    assert any(p.startswith("nanosft/demo/task_data/") for p in inputs), inputs  # read from its own folder

    for k in ("NANOCHAT_BASE_DIR", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    train = ["--recipe", "demo", "--data-dir", str(nc), "--device-type", "cpu", "--init", "scratch", "--depth", "2",
             "--num-iterations", "2", "--device-batch-size", "2", "--eval-every", "0", "--chatcore-every", "0"]
    built = tree(nc)
    assert train_mod.main(train) == 2  # its tag d2 already holds the user's SFT run
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(nc / "chatsft_checkpoints" / "d2") in err and all(f in err for f in ("--resume", "--out-tag", "--overwrite"))
    assert tree(nc) == built  # refused before writing anything

    assert train_mod.main([*train, "--out-tag", "demo-run"]) == 0
    out = capsys.readouterr().out
    assert f"base dir {nc} (--data-dir; NANOCHAT_BASE_DIR is not set)" in out
    assert f"output: {nc / 'chatsft_checkpoints' / 'demo-run'}" in out

    after = tree(nc)
    for rel, stamp in before.items():
        assert after.get(rel) == stamp, f"{rel} was changed or removed"
    new = sorted(set(after) - set(before))
    outside = [r for r in new if not r.startswith("nanosft/") and not r.startswith("chatsft_checkpoints/demo-run/")]
    assert not outside, outside
    assert {"chatsft_checkpoints/demo-run/model_000002.pt", "chatsft_checkpoints/demo-run/metrics.jsonl",
            "chatsft_checkpoints/demo-run/loss.png"} <= set(new)
    assert any(r.startswith("nanosft/demo/task_data/openai--gsm8k/main/test/") for r in new)


def test_overwrite_replaces_only_the_previous_runs_files(tmp_path, capsys):
    from trainer.train import TrainError, claim_output
    from types import SimpleNamespace
    out = tmp_path / "chatsft_checkpoints" / "d2"
    out.mkdir(parents=True)
    theirs = ["model_000010.pt", "meta_000010.json", "optim_000010_rank0.pt", "metrics.jsonl", "loss.png"]
    for name in theirs + ["notes.txt"]:
        (out / name).write_text("x")
    fresh = SimpleNamespace(resume=False, overwrite=False)
    with pytest.raises(TrainError, match="already holds a run"):
        claim_output(out, fresh, master=True, ddp=False)
    with pytest.raises(TrainError, match="pass one of them"):
        claim_output(out, SimpleNamespace(resume=True, overwrite=True), master=True, ddp=False)
    claim_output(out, SimpleNamespace(resume=True, overwrite=False), master=True, ddp=False)  # continues it
    assert sorted(p.name for p in out.iterdir()) == sorted(theirs + ["notes.txt"])
    claim_output(out, SimpleNamespace(resume=False, overwrite=True), master=True, ddp=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]  # only a run's own file names go
    claim_output(out, fresh, master=True, ddp=False)  # now free
    claim_output(tmp_path / "nowhere", fresh, master=True, ddp=False)


def _claim_worker(rank: int, tmp: str, case: str) -> None:
    """Two gloo ranks claim one output folder. "late": rank 1 looks 0.5 s after rank 0, who writes its
    metrics.jsonl as soon as its claim returns. "split": each rank has its own folder (nodes without a shared
    file system) and only rank 1's holds a run."""
    import datetime
    import time
    from types import SimpleNamespace
    import torch.distributed as dist
    from trainer.train import TrainError, claim_output
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    out = Path(tmp) / (f"rank{rank}" if case == "split" else "shared")
    try:
        if case == "late" and rank == 1:
            time.sleep(0.5)
        claim_output(out, SimpleNamespace(resume=False, overwrite=False), master=rank == 0, ddp=True)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.jsonl").write_text("{}\n")
        verdict = "claimed"
    except TrainError as e:
        verdict = f"refused: {e}"
    finally:
        dist.destroy_process_group()
    Path(tmp, f"verdict{rank}").write_text(verdict)


@pytest.mark.parametrize("case", ["late", "split"])
def test_ranks_claim_the_output_together(tmp_path, case):
    import torch.multiprocessing as mp
    if case == "split":
        (tmp_path / "rank1").mkdir()
        (tmp_path / "rank1" / "model_000003.pt").write_text("x")
    mp.spawn(_claim_worker, args=(str(tmp_path), case), nprocs=2, join=True)
    verdicts = [(tmp_path / f"verdict{r}").read_text() for r in (0, 1)]
    if case == "late":  # rank 0's own new metrics file is no other run
        assert verdicts == ["claimed", "claimed"]
    else:  # both stop, neither waits for the other at the next collective
        assert verdicts[0].startswith("refused") and "files that another rank sees" in verdicts[0]
        assert verdicts[1].startswith("refused") and "1 files, e.g. model_000003.pt" in verdicts[1]


def test_layout_paths_and_stale_temps(tmp_path):
    assert owned_dir(tmp_path) == tmp_path / "nanosft" and demo_dir(tmp_path) == tmp_path / "nanosft" / "demo"
    assert data_dir_of(tmp_path / "x" / "snap") is None
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert is_stale_temp(Path(f".demo-abc.tmp-{int(dead.stdout)}"))  # its process is gone
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not is_stale_temp(Path(f".demo-abc.tmp-{live.pid}"))  # another prepare, running now
    finally:
        live.kill()
        live.wait()
    assert not is_stale_temp(Path("demo-abc"))


def test_a_snapshot_in_the_old_layout_is_pointed_at(tmp_path):
    old = tmp_path / "snapshots" / "demo-0123456789abcdef"
    old.mkdir(parents=True)
    (old / "manifest.json").write_text("{}")
    with pytest.raises(SnapshotError, match="old layout") as e:
        latest_snapshot(tmp_path, "demo")
    assert str(snapshots_dir(tmp_path)) in str(e.value)


def test_the_trainer_says_which_base_dir_it_uses_and_why(tmp_path, monkeypatch):
    from types import SimpleNamespace
    from trainer.train import describe_base_dir
    data, nc = tmp_path / "data", tmp_path / "nc"
    monkeypatch.delenv("NANOCHAT_BASE_DIR", raising=False)
    line = describe_base_dir(SimpleNamespace(data_dir=data, data_dir_given=True))
    assert line.startswith(f"base dir {data} (--data-dir; NANOCHAT_BASE_DIR is not set)")
    assert f"base checkpoints from {data / 'base_checkpoints'}" in line
    assert f"SFT checkpoints to {data / 'chatsft_checkpoints'}" in line
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(nc))
    line = describe_base_dir(SimpleNamespace(data_dir=data, data_dir_given=True))
    assert line.startswith(f"base dir {nc} (NANOCHAT_BASE_DIR is set and overrides --data-dir {data}")
    assert f"SFT checkpoints to {nc / 'chatsft_checkpoints'}" in line
    assert describe_base_dir(SimpleNamespace(data_dir=nc, data_dir_given=False)).startswith(
        f"base dir {nc} (NANOCHAT_BASE_DIR)")
    assert "the same folder as --data-dir" in describe_base_dir(SimpleNamespace(data_dir=nc, data_dir_given=True))


@pytest.mark.parametrize("hard_links", [True, False])
def test_link_into_place_never_replaces_a_file(tmp_path, monkeypatch, hard_links):
    """fetch and export publish through it: a finished temp takes a free name, and an existing file stays."""
    from pipeline.tempfiles import link_into_place
    if not hard_links:  # a file system without them (os.link raises PermissionError there)
        monkeypatch.setattr(os, "link", lambda src, dst: (_ for _ in ()).throw(PermissionError(1, "no links")))
    src, dst = tmp_path / ".a.tmp-1", tmp_path / "a"
    src.write_bytes(b"new")
    link_into_place(src, dst)
    assert dst.read_bytes() == b"new" and not src.exists()
    src.write_bytes(b"newer")
    with pytest.raises(FileExistsError):
        link_into_place(src, dst)
    assert dst.read_bytes() == b"new" and src.read_bytes() == b"newer"
