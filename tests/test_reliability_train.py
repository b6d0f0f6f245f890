"""The trainer's side of issue 9: Ctrl-C, a full disk at a checkpoint save, an unwritable checkpoint folder,
damaged snapshot and checkpoint files, a resume with another batch size, leftovers of a killed save.
Each ends in one line (`error: …` exit 2 or `interrupted; …` exit 130), never a traceback."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.shard_format import ShardReader, ShardRows, write_shard
from trainer import train as train_mod
from trainer.checkpoint import PHASE_DIRS, save_checkpoint

from tests.test_train import args, base, one_thread, snap  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def trained(snap, tmp_path_factory) -> Path:
    """A base dir holding a 2-step checkpoint of the d2 model (model, optim, meta of step 2)."""
    root = tmp_path_factory.mktemp("trained")
    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = str(root)
    try:
        assert train_mod.main(args(snap, "--num-iterations", 2)) == 0
    finally:
        os.environ.pop("NANOCHAT_BASE_DIR") if old is None else os.environ.__setitem__("NANOCHAT_BASE_DIR", old)
    return root


def ckpt_dir(base_dir: Path) -> Path:
    return base_dir / PHASE_DIRS["sft"] / "d2"


def with_checkpoint(trained: Path, base: Path) -> Path:
    shutil.copytree(trained / PHASE_DIRS["sft"], base / PHASE_DIRS["sft"])
    return ckpt_dir(base)


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("error: "), err
    return lines[-1]


def copy_snapshot(snap, tmp_path: Path) -> tuple[Path, Path]:
    data, snapshot = snap
    dst = tmp_path / "snap" / snapshot.name
    shutil.copytree(snapshot, dst)
    return data, dst


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------- Ctrl-C, disk, folders

def test_ctrl_c_during_training_is_one_line_and_exit_130(snap, base, monkeypatch, capsys):
    real, calls = train_mod.forward_backward, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(train_mod, "forward_backward", interrupted)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # keep pytest's own SIGINT handler
    try:
        code = train_mod.main(args(snap, "--num-iterations", 4))
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main() as a traceback")
    assert code == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "interrupted; nothing was published after the last saved checkpoint", err
    assert "Traceback" not in err
    assert not list(ckpt_dir(base).glob("model_*.pt"))


def test_disk_full_at_a_checkpoint_save_is_one_line(snap, base, monkeypatch, capsys):
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full (Linux)")
    real = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real(obj, "/dev/full", *a, **k))  # a real ENOSPC
    assert train_mod.main(args(snap, "--num-iterations", 1)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(ckpt_dir(base)) in line and "disk full" in line, line
    assert not list(ckpt_dir(base).glob(".*tmp-*")) and not list(ckpt_dir(base).glob("*.pt"))


def test_unwritable_checkpoint_folder_is_refused_before_training(snap, base, monkeypatch, capsys):
    blocker = base / "blocked"
    blocker.write_text("a file where the checkpoint folders would go")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(blocker))
    assert train_mod.main(args(snap, "--num-iterations", 2)) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert "not writable" in line and str(blocker) in line, line
    assert "step 00001" not in captured.out  # said before the first step, not at the first save


# ----------------------------------------------------------------------------- damaged snapshot files

@pytest.mark.parametrize("damage", ["hostile", "truncated"])
def test_damaged_tokenizer_in_the_snapshot_is_one_line(snap, base, tmp_path, capsys, damage):
    data, snapshot = copy_snapshot(snap, tmp_path)
    tok = snapshot / "tokenizer.pkl"
    raw = tok.read_bytes()
    bad = pickle.dumps(os.system) if damage == "hostile" else raw[: len(raw) // 2]
    tok.write_bytes(bad + b"\0" * (len(raw) - len(bad)))  # same size: the quick check passes it on
    assert train_mod.main(args((data, snapshot), "--num-iterations", 1)) == 2
    assert str(tok) in one_error_line(capsys.readouterr().err)


def test_damaged_arrow_footer_names_the_shard(snap, base, tmp_path, capsys):
    data, snapshot = copy_snapshot(snap, tmp_path)
    shard = sorted(snapshot.glob("train-*.arrow"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-40:-10] = b"\xff" * 30
    shard.write_bytes(bytes(raw))
    assert train_mod.main(args((data, snapshot), "--num-iterations", 1)) == 2
    assert str(shard) in one_error_line(capsys.readouterr().err)


def test_edited_max_seq_len_in_the_manifest_is_refused(snap, base, tmp_path, capsys):
    data, snapshot = copy_snapshot(snap, tmp_path)
    m = json.loads((snapshot / "manifest.json").read_text())
    m["max_seq_len"] //= 2
    (snapshot / "manifest.json").write_text(json.dumps(m))
    assert train_mod.main(args((data, snapshot), "--num-iterations", 1)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "schema metadata disagrees with the manifest" in line and ".arrow" in line, line


def test_token_id_outside_the_vocabulary_is_refused_naming_shard_and_row(snap, base, tmp_path, capsys):
    data, snapshot = copy_snapshot(snap, tmp_path)
    path = sorted(snapshot.glob("train-*.arrow"))[0]
    shard = ShardReader(path)
    tokens = shard.tokens.copy()
    tokens[3, 2] = shard.meta.vocab_size  # one id just past the table: same size, same metadata
    rows = ShardRows(tokens=tokens, mask=shard.mask.copy(), doc_offsets=shard.doc_offsets.copy(),
                     doc_lens=shard.doc_lens.copy(), doc_ids=shard.doc_ids.copy(), doc_tasks=shard.doc_tasks.copy())
    meta, size = shard.meta, path.stat().st_size
    del shard
    write_shard(path, rows, meta)
    assert path.stat().st_size == size
    assert train_mod.main(args((data, snapshot), "--num-iterations", 2)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(path) in line and "row 3" in line and f"token id {meta.vocab_size}" in line, line


# ----------------------------------------------------------------------------- damaged checkpoints on --resume

@pytest.mark.parametrize("damage", ["hostile-model", "truncated-model", "truncated-meta"])
def test_damaged_checkpoint_on_resume_names_the_file(snap, trained, base, capsys, damage):
    ckpt = with_checkpoint(trained, base)
    target = ckpt / ("meta_000002.json" if damage.endswith("meta") else "model_000002.pt")
    raw = target.read_bytes()
    target.write_bytes(pickle.dumps(os.system, protocol=2) if damage.startswith("hostile") else raw[: len(raw) // 2])
    assert train_mod.main(args(snap, "--num-iterations", 4, "--resume")) == 2
    assert str(target) in one_error_line(capsys.readouterr().err)


def test_resume_with_another_device_batch_size_needs_a_flag(snap, trained, base, capsys):
    ckpt = with_checkpoint(trained, base)
    argv = [a if a != "4" else "2" for a in args(snap)]  # --device-batch-size 2 instead of 4
    assert train_mod.main(argv + ["--num-iterations", "4", "--resume"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--device-batch-size 4" in line and "--resume-new-batch" in line, line
    assert train_mod.main(argv + ["--num-iterations", "3", "--resume", "--resume-new-batch"]) == 0
    assert "WARNING: --resume: the checkpoint ran --device-batch-size 4" in capsys.readouterr().out
    assert (ckpt / "model_000003.pt").is_file()


def test_stale_checkpoint_temps_of_dead_processes_are_removed(tmp_path):
    pid = dead_pid()
    stale = [tmp_path / f".model_000001.pt.tmp-{pid}", tmp_path / f".optim_000001_rank0.pt.tmp-{pid}",
             tmp_path / f".meta_000001.json.tmp-{pid}"]
    for p in stale:
        p.write_bytes(b"half")
    train_mod.check_writable(tmp_path)  # what a run does first
    save_checkpoint(tmp_path, 2, {"w": torch.zeros(1)}, {"s": torch.zeros(1)}, {"step": 2}, rank=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta_000002.json", "model_000002.pt",
                                                          "optim_000002_rank0.pt"]
