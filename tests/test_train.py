"""trainer/train.py end to end on the CPU: a small demo-like snapshot built once per module, tiny models,
exact resume, refusals with a fix in the message, loss normalisation, document masks, the base warm start
(nanochat-reference §10.2, §10.3) and a CLI smoke test."""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.manifest import load_manifest, shard_paths
from pipeline.prepare import prepare
from pipeline.shard_format import SplitReader
from trainer import train as train_mod
from trainer.checkpoint import save_checkpoint
from trainer.config import GPTConfig
from trainer.data import RowSchedule
from trainer.model import GPT
from trainer.optim import MuonAdamW
from trainer.plot import plot_losses

REPO = Path(__file__).resolve().parents[1]
SIZES = ("{smoltalk_train=150, smoltalk_test=30, mmlu_auxiliary_train=60, mmlu_test=30, gsm8k_train=60, "
         "gsm8k_test=30, identity=20}")
TIMING = ("dt", "tok_per_s", "mfu")


def mini_recipe(folder: Path, demo_seed: int = 0) -> Path:
    """The shipped demo recipe, scaled down (rows of 129 tokens, vocab 400, ~100 spelling rows per task)."""
    text = (REPO / "data_manifests" / "demo.toml").read_text(encoding="utf-8")
    edits = (("max_seq_len = 512", "max_seq_len = 128"), ("rows_per_shard = 512", "rows_per_shard = 128"),
             ("vocab_size = 2048", "vocab_size = 400"), ("size = 2000", "size = 100"), ("size = 800", "size = 100"),
             ("[demo]\nseed = 0", f"[demo]\nseed = {demo_seed}\nsizes = {SIZES}"))
    for old, new in edits:
        assert old in text, f"demo.toml changed: {old!r} not found; update this test's recipe"
        text = text.replace(old, new)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "demo.toml"  # prepare writes demo.lock.json next to it: inside tmp, never the repo
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def snap(tmp_path_factory) -> tuple[Path, Path]:
    """(data dir, snapshot folder) of the mini recipe."""
    root = tmp_path_factory.mktemp("snap")
    snapshot = prepare(mini_recipe(root / "recipe"), root / "data", workers=1, out=io.StringIO())
    return root / "data", snapshot


@pytest.fixture(scope="module")
def other_snap(tmp_path_factory) -> Path:
    """A second snapshot of the same recipe from other demo data (another seed): another snapshot id."""
    root = tmp_path_factory.mktemp("other")
    return prepare(mini_recipe(root / "recipe", demo_seed=1), root / "data", workers=1, out=io.StringIO())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the threads' spin-waits
    make a step ten times slower; the runs compared below all use the same setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def base(tmp_path, monkeypatch) -> Path:
    """Checkpoints (and base checkpoints) of each test live in its own tmp folder."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NANOCHAT_DTYPE"):
        monkeypatch.delenv(k, raising=False)
    return tmp_path


def args(snap, *extra) -> list[str]:
    data, snapshot = snap
    return ["--snapshot", str(snapshot), "--data-dir", str(data), "--device-type", "cpu", "--depth", "2",
            "--device-batch-size", "4", "--eval-every", "0", "--chatcore-every", "0", *map(str, extra)]


def records(ckpt: Path) -> list[dict]:
    return [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]


def train_losses(ckpt: Path) -> dict[int, float]:
    recs = [r for r in records(ckpt) if "loss" in r]
    steps = [r["step"] for r in recs]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["loss"] for r in recs}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def train_reader(snapshot: Path) -> SplitReader:
    return SplitReader(shard_paths(snapshot, load_manifest(snapshot), "train"))


# --- exact resume -----------------------------------------------------------------------------

def test_resume_is_exact(snap, base, monkeypatch):
    run = ["--num-iterations", 6, "--eval-every", 3, "--eval-tokens", 2 * 4 * 128]
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base / "straight"))
    assert train_mod.main(args(snap, *run, "--save-every", 3)) == 0
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base / "resumed"))
    assert train_mod.main(args(snap, *run, "--stop-at", 3)) == 0
    stopped = base / "resumed" / "chatsft_checkpoints" / "d2"
    assert sorted(p.name for p in stopped.glob("model_*.pt")) == ["model_000003.pt"]
    assert train_mod.main(args(snap, *run, "--resume")) == 0

    a, b = base / "straight" / "chatsft_checkpoints" / "d2", stopped
    la, lb = train_losses(a), train_losses(b)
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4, 5, 6]  # one record per step, across the resume
    for s in (4, 5, 6):
        assert lb[s] == pytest.approx(la[s], abs=1e-6, rel=0)
    assert la[6] < la[1]  # it learns
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    assert strip(records(a)) == strip(records(b))  # val bpb and the smoothed loss continue exactly too
    for name in ("model_000003.pt", "optim_000003_rank0.pt", "model_000006.pt", "optim_000006_rank0.pt"):
        assert_same_state(weights(a / name), weights(b / name), name)
    meta = json.loads((b / "meta_000006.json").read_text())
    assert meta["step"] == 6 and meta["nanosft"]["world_size"] == 1 and meta["model_config"]["n_layer"] == 2


def test_resume_refuses_another_snapshot_or_world_size(snap, other_snap, base, capsys):
    assert train_mod.main(args(snap, "--num-iterations", 4, "--stop-at", 2)) == 0
    ckpt = base / "chatsft_checkpoints" / "d2"
    capsys.readouterr()
    ours = load_manifest(snap[1])["snapshot_id"]
    theirs = load_manifest(other_snap)["snapshot_id"]
    assert ours != theirs

    other = args(snap, "--num-iterations", 4, "--resume")
    other[1] = str(other_snap)
    assert train_mod.main(other) == 2
    err = capsys.readouterr().err
    assert ours in err and theirs in err and "--out-tag" in err

    meta_path = ckpt / "meta_000002.json"
    meta = json.loads(meta_path.read_text())
    meta["nanosft"]["world_size"] = 2
    meta_path.write_text(json.dumps(meta))
    assert train_mod.main(args(snap, "--num-iterations", 4, "--resume")) == 2
    err = capsys.readouterr().err
    assert "2 ranks" in err and "has 1" in err

    assert train_mod.main(args(snap, "--num-iterations", 4, "--resume", "--out-tag", "fresh")) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert not (ckpt / "model_000004.pt").exists()


# --- loss normalisation and document masks ---------------------------------------------------

def test_loss_norm_mean_changes_the_update_not_the_logged_loss(snap, base, monkeypatch):
    """With 2 micro-batches of unequal supervised counts, the original mean-of-means weights tokens
    differently: same logged loss on the first step (same weights, same rows), different weights after it."""
    data, snapshot = snap
    reader = train_reader(snapshot)
    sched = RowSchedule(reader.num_rows, 8)
    counts = [reader.n_supervised(sched.micro_rows(0, 0, 1, m, 4)) for m in range(2)]
    assert counts[0] != counts[1], "test precondition: step 0's micro-batches need different supervised counts"
    common = ["--num-iterations", 2, "--total-batch-size", 8 * 128]  # grad_accum = 2 at 4 rows of 128
    final = {}
    for norm in ("token", "mean"):
        monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base / norm))
        assert train_mod.main(args(snap, *common, "--loss-norm", norm)) == 0
        ckpt = base / norm / "chatsft_checkpoints" / "d2"
        final[norm] = (train_losses(ckpt), weights(ckpt / "model_000002.pt"))
        assert records(ckpt)[0]["supervised"] == sum(counts)
    (lt, wt), (lm, wm) = final["token"], final["mean"]
    assert lt[1] == pytest.approx(lm[1], abs=1e-6)
    assert all(np.isfinite(list(lm.values())))
    assert not torch.equal(wt["transformer.h.0.attn.c_q.weight"], wm["transformer.h.0.attn.c_q.weight"])


def _seed_with_packed_rows(reader: SplitReader, batch: int) -> int:
    """A --shuffle-rows seed whose first step holds a row with a supervised target in its second conversation."""
    for seed in range(100):
        for r in RowSchedule(reader.num_rows, batch, seed).step_rows(0):
            lens = reader.row_docs(int(r))[0]
            shard, local = reader.locate(int(r))
            if len(lens) > 1 and shard.mask[local, lens[0]:].any():
                return seed
    raise AssertionError("no packed row with a supervised later conversation in the snapshot")


def test_doc_mask_runs_and_changes_the_loss(snap, base, monkeypatch):
    reader = train_reader(snap[1])
    seed = _seed_with_packed_rows(reader, 4)
    losses, final = {}, {}
    for flag in ((), ("--doc-mask",)):
        out = base / (flag[0] if flag else "plain")
        monkeypatch.setenv("NANOCHAT_BASE_DIR", str(out))
        assert train_mod.main(args(snap, "--num-iterations", 2, "--shuffle-rows", seed, *flag)) == 0
        ckpt = out / "chatsft_checkpoints" / "d2"
        losses[flag], final[flag] = train_losses(ckpt), weights(ckpt / "model_000002.pt")
    assert np.isfinite(list(losses[("--doc-mask",)].values())).all()
    # init zeroes every output projection, so the first forward is blind to attention and the first losses
    # agree; the attention output, and so c_proj's gradient, already differ: the second conversation of a
    # packed row no longer sees the first
    assert losses[("--doc-mask",)][1] == pytest.approx(losses[()][1], abs=1e-6)
    key = "transformer.h.1.attn.c_proj.weight"
    assert not torch.allclose(final[("--doc-mask",)][key], final[()][key], rtol=0, atol=1e-6)
    assert losses[("--doc-mask",)][2] != pytest.approx(losses[()][2], abs=1e-6)


# --- refusals -----------------------------------------------------------------------------------

def test_max_seq_len_mismatch_exits_2_with_the_fix(snap, base, capsys):
    assert train_mod.main(args(snap, "--num-iterations", 1, "--max-seq-len", 64)) == 2
    err = capsys.readouterr().err
    assert "--max-seq-len 64" in err and "128" in err and "rebuild the snapshot" in err and "drop the flag" in err
    assert not (base / "chatsft_checkpoints").exists()


def test_vocab_mismatch_with_the_base_model_exits_2(snap, base, capsys):
    _save_base(base, GPTConfig(sequence_len=128, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=64), {})
    assert train_mod.main(args(snap, "--num-iterations", 1, "--init", "base")) == 2
    err = capsys.readouterr().err
    assert "400 tokens, the model 512" in err and "tokenizer.pkl" in err


def test_missing_snapshot_is_a_clear_error(snap, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train_mod.main(["--data-dir", str(empty), "--device-type", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no snapshot of recipe 'demo'" in err and "prepare-data" in err

    assert train_mod.main(["--snapshot", str(tmp_path / "nowhere"), "--device-type", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "manifest.json" in err

    broken = tmp_path / "broken"
    shutil.copytree(snap[1], broken)
    shard = sorted(broken.glob("train-*.arrow"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    assert train_mod.main(args((snap[0], broken), "--num-iterations", 1)) == 2
    assert shard.name in capsys.readouterr().err


def test_non_finite_loss_stops_with_step_and_rows(snap, base, monkeypatch, capsys):
    real_forward = GPT.forward
    calls = []

    def forward(self, idx, targets=None, **kw):
        out = real_forward(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls.append(1)
            if len(calls) >= 2:  # the second step goes bad
                return out * float("nan")
        return out

    monkeypatch.setattr(GPT, "forward", forward)
    assert train_mod.main(args(snap, "--num-iterations", 4, "--save-every", 1, "--shuffle-rows", 3)) == 2
    err = capsys.readouterr().err
    rows = RowSchedule(train_reader(snap[1]).num_rows, 4, 3).step_rows(1)
    assert "loss is nan at step 2" in err and str([rows.tolist()]) in err
    ckpt = base / "chatsft_checkpoints" / "d2"
    assert (ckpt / "model_000001.pt").is_file() and (ckpt / "meta_000001.json").is_file()
    assert not list(ckpt.glob("*_000002*")) and not list(ckpt.glob("*_000004*"))
    assert sorted(train_losses(ckpt)) == [1]


# --- warm start from a base checkpoint --------------------------------------------------------

def _save_base(base: Path, config: GPTConfig, meta_extra: dict, tag: str = "d2", step: int = 5):
    """A nanochat-layout base checkpoint: model, meta with model_config, and an optimizer shard with state."""
    torch.manual_seed(3)
    model = GPT(config)
    model.init_weights()
    opt = MuonAdamW(model.setup_optimizer())
    idx = torch.randint(0, config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    model(idx[:, :-1], idx[:, 1:]).backward()
    opt.step()
    for g in opt.param_groups:  # end-of-pretraining hyperparameters the warm start must adopt (§10.3)
        if g["kind"] == "muon":
            g["weight_decay"] = 0.0123
        g["initial_lr"] = 99.0
    meta = {"step": step, "val_bpb": 1.5, "model_config": asdict(config), **meta_extra}
    save_checkpoint(base / "base_checkpoints" / tag, step, model.state_dict(), opt.state_dict(), meta, rank=0)
    return model


BASE_META = {"user_config": {"embedding_lr": 0.25, "unembedding_lr": 0.006, "matrix_lr": 0.03, "total_batch_size": -1},
             "max_seq_len": 256, "device_batch_size": 2, "total_batch_size": 512}
BASE_CONFIG = GPTConfig(sequence_len=256, vocab_size=400, n_layer=2, n_head=2, n_kv_head=1, n_embd=96,
                        window_pattern="SL")


def test_base_warm_start(snap, tmp_path, monkeypatch, capsys):
    """Base checkpoint under <data_dir>/base_checkpoints/d2 (NANOCHAT_BASE_DIR unset): weights, architecture,
    inherited hyperparameters (printed, one line each), and the optimizer warm start with lr x init_lr_frac."""
    monkeypatch.delenv("NANOCHAT_BASE_DIR")
    snapshot = snap[1]
    data = base = tmp_path / "data"
    config = BASE_CONFIG
    base_model = _save_base(base, config, BASE_META)
    (base / "base_checkpoints" / "d1").mkdir()  # a smaller tag: the largest dN wins
    (base / "tokenizer").mkdir()
    shutil.copy(snapshot / "tokenizer.pkl", base / "tokenizer" / "tokenizer.pkl")  # same fingerprint: accepted

    argv = ["--snapshot", str(snapshot), "--data-dir", str(data), "--device-type", "cpu", "--init", "base",
            "--embedding-lr", "0.1", "--init-lr-frac", "0.5", "--num-iterations", "1", "--eval-every", "0",
            "--chatcore-every", "0"]
    assert train_mod.main(argv) == 0
    out = capsys.readouterr().out
    assert f"init: base checkpoint {base / 'base_checkpoints' / 'd2'}/model_000005.pt" in out
    for line in ("max_seq_len = 128 (the snapshot's rows)", "device_batch_size = 2 (inherited from the base",
                 "total_batch_size = 512 (inherited from the base", "embedding_lr = 0.1 (flag)",
                 "unembedding_lr = 0.006 (inherited from the base", "matrix_lr = 0.03 (inherited from the base",
                 "4 rows/step = 2 x 1 ranks x 2 accum", "warm start"):
        assert line in out, line
    assert "max_seq_len = 256" not in out  # the base's row length does not apply to this snapshot

    ckpt = base / "chatsft_checkpoints" / "d2"
    meta = json.loads((ckpt / "meta_000001.json").read_text())
    assert meta["model_config"] == asdict(config)  # the architecture comes from the base
    shard = weights(ckpt / "optim_000001_rank0.pt")
    with torch.device("meta"):
        fresh = GPT(config).setup_optimizer(unembedding_lr=0.006, embedding_lr=0.1, matrix_lr=0.03)
    assert len(shard["param_groups"]) == len(fresh)
    for saved, new in zip(shard["param_groups"], fresh):
        assert saved["initial_lr"] == pytest.approx(new["lr"] * 0.5, rel=1e-12)  # fresh lr x init_lr_frac
        if saved["kind"] == "muon":
            assert saved["weight_decay"] == 0.0123  # everything else as loaded from the base shard
    steps = {s["step"] for s in shard["state"].values() if "step" in s}
    assert steps == {2}  # AdamW state continued from the base's one step

    # the first logged loss is the base model's loss on step 0's rows: the weights were loaded
    reader = train_reader(snapshot)
    sched = RowSchedule(reader.num_rows, 4)
    base_model.eval()
    total = 0.0
    with torch.no_grad():
        for m in range(2):
            rows = sched.micro_rows(0, 0, 1, m, 2)
            tok = np.stack([reader.locate(int(r))[0].tokens[reader.locate(int(r))[1]] for r in rows]).astype(np.int64)
            mask = np.stack([reader.locate(int(r))[0].mask[reader.locate(int(r))[1]] for r in rows])
            x, y = torch.from_numpy(tok[:, :-1]), torch.from_numpy(np.where(mask[:, 1:] == 1, tok[:, 1:], -1))
            total += base_model(x, y, loss_reduction="sum").item()
    assert train_losses(ckpt)[1] == pytest.approx(total / reader.n_supervised(sched.step_rows(0)), rel=1e-5)


# --- the CLI, end to end ----------------------------------------------------------------------

def _check_png(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks, idat = 8, [], b""
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks.append(kind)
        idat += body if kind == b"IDAT" else b""
        if kind == b"IHDR":
            w, h, depth, color = struct.unpack(">IIBB", body[:10])
        pos += 12 + n
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND" and b"IDAT" in chunks
    assert (depth, color) == (8, 2) and len(zlib.decompress(idat)) == h * (1 + 3 * w)
    return w, h


def test_cli_end_to_end(tmp_path):
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k not in ("NANOCHAT_BASE_DIR", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"

    def cli(*argv):
        r = subprocess.run([sys.executable, "-m", *map(str, argv)], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    cli("pipeline.prepare", "--recipe", mini_recipe(tmp_path / "recipe"), "--data-dir", data, "--workers", 1)
    common = ["trainer.train", "--data-dir", data, "--device-type", "cpu", "--depth", 2, "--device-batch-size", 4,
              "--num-iterations", 5, "--save-every", 2, "--eval-every", 2, "--chatcore-every", 0]
    first = cli(*common, "--stop-at", 3)
    assert "initialising a d2 model from scratch" in first  # the demo recipe needs no base checkpoint
    ckpt = data / "chatsft_checkpoints" / "d2"
    assert sorted(p.name for p in ckpt.glob("model_*.pt")) == ["model_000002.pt", "model_000003.pt"]
    second = cli(*common, "--resume")
    assert "resume: step 3" in second
    assert sorted(p.name for p in ckpt.glob("model_*.pt")) == ["model_000002.pt", "model_000003.pt",
                                                                "model_000004.pt", "model_000005.pt"]
    assert not [p for p in ckpt.iterdir() if ".tmp" in p.name]
    losses = train_losses(ckpt)
    assert sorted(losses) == [1, 2, 3, 4, 5] and losses[5] < losses[1]
    assert [r["step"] for r in records(ckpt) if "val_bpb" in r] == [0, 2, 4, 5]
    assert _check_png(ckpt / "loss.png") == (640, 360)
    # the curve after the resume covers the whole run, not only the resumed steps
    plot_losses(sorted(losses.items()), tmp_path / "expected.png")
    assert (ckpt / "loss.png").read_bytes() == (tmp_path / "expected.png").read_bytes()
    # the checkpoint records the snapshot's tokenizer; trainer.eval finds both from the data dir
    meta = json.loads((ckpt / "meta_000005.json").read_text())
    assert Path(meta["nanosft"]["tokenizer"]["file"]).is_file()
    report = tmp_path / "eval.json"
    out = cli("trainer.eval", "--data-dir", data, "--device-type", "cpu", "-a", "SpellingBee", "-x", 2, "-m", 4,
              "--json", report)
    assert f"model {ckpt / 'model_000005.pt'}" in out and meta["nanosft"]["tokenizer"]["file"] in out
    assert json.loads(report.read_text())["tasks"]["SpellingBee"]["problems"] == 2


def test_base_without_optimizer_shard_warns_and_starts_fresh(snap, base, capsys):
    _save_base(base, BASE_CONFIG, BASE_META)
    (base / "base_checkpoints" / "d2" / "optim_000005_rank0.pt").unlink()
    assert train_mod.main(args(snap, "--init", "base", "--num-iterations", 1, "--init-lr-frac", 0.5)) == 0
    out = capsys.readouterr().out
    assert "WARNING: no optim_000005_rank0.pt" in out and "warm start" not in out
    shard = weights(base / "chatsft_checkpoints" / "d2" / "optim_000001_rank0.pt")
    with torch.device("meta"):
        fresh = GPT(BASE_CONFIG).setup_optimizer(unembedding_lr=0.006, embedding_lr=0.25, matrix_lr=0.03)
    for saved, new in zip(shard["param_groups"], fresh):
        assert saved["initial_lr"] == pytest.approx(new["lr"] * 0.5, rel=1e-12)
        assert saved["weight_decay"] == new["weight_decay"]  # fresh hyperparameters, not the base's
    assert {s["step"] for s in shard["state"].values() if "step" in s} == {1}


def test_rewrite_metrics_keeps_one_record_per_step(tmp_path):
    """A run that crashed at step 5 after a checkpoint at 3 is resumed at 3: its records after 3, and its
    evaluation at 3 (run again before step 4), go; a torn last line goes; a fresh run starts empty."""
    path = tmp_path / "metrics.jsonl"
    recs = [{"step": 0, "val_bpb": 3.0}] + [{"step": s, "loss": 5.0 - s} for s in (1, 2, 3)] + \
        [{"step": 3, "val_bpb": 2.0}, {"step": 4, "loss": 0.9}, {"step": 5, "loss": 0.8}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 6, "lo')
    kept = train_mod.rewrite_metrics(path, 3)
    assert kept == recs[:4]
    assert [json.loads(line) for line in path.read_text().splitlines()] == recs[:4]
    assert train_mod.rewrite_metrics(path, 0) == [] and path.read_text() == ""


# --- target-free steps (overlong = "nanochat" snapshots) -------------------------------------

def _target_free_copy(snapshot: Path, dest: Path, rows: int) -> Path:
    """A copy of the snapshot as `overlong = "nanochat"` could write it: its first `rows` train rows hold no
    supervised target (upstream keeps conversations whose targets were cut away)."""
    from pipeline.manifest import manifest_identity, sha256_file, snapshot_id, verify_snapshot, write_json_atomic
    from pipeline.shard_format import ShardReader, ShardRows, write_shard
    copy = dest / snapshot.name
    shutil.copytree(snapshot, copy)
    m = load_manifest(copy)
    entry = next(s for s in m["shards"] if s["split"] == "train")
    path = copy / entry["file"]
    r = ShardReader(path)
    new = ShardRows(tokens=np.array(r.tokens), mask=np.array(r.mask), doc_offsets=np.array(r.doc_offsets),
                    doc_lens=np.array(r.doc_lens), doc_ids=np.array(r.doc_ids), doc_tasks=np.array(r.doc_tasks))
    meta = r.meta
    del r
    new.mask[:rows] = 0
    with pytest.raises(ValueError, match="has no supervised target"):
        write_shard(path, new, meta)  # refused by default
    write_shard(path, new, meta, allow_unsupervised=True)
    entry.update(bytes=path.stat().st_size, sha256=sha256_file(path), supervised=int(new.n_supervised.sum()))
    m["recipe"]["overlong"] = "nanochat"
    m["snapshot_id"] = snapshot_id(manifest_identity(m))  # as a build of that recipe would name it
    write_json_atomic(copy / "manifest.json", m)
    verify_snapshot(copy, full=True)
    return copy


def test_step_without_a_supervised_target_is_skipped(snap, base, tmp_path, monkeypatch, capsys):
    """Step 1's rows hold no target: no forward, no optimizer step, no NaN; the run goes on and the schedule
    (LR of step 2 onward) is unchanged."""
    data, snapshot = snap
    copy = _target_free_copy(snapshot, tmp_path / "copy", rows=4)
    steps, forwards = [], []
    real_step, real_forward = train_mod.optimizer_step, GPT.forward
    monkeypatch.setattr(train_mod, "optimizer_step", lambda *a: (steps.append(a[2]), real_step(*a)))

    def forward(self, idx, targets=None, **kw):
        if targets is not None and self.training:
            forwards.append(int((targets >= 0).sum()))
        return real_forward(self, idx, targets, **kw)

    monkeypatch.setattr(GPT, "forward", forward)
    assert train_mod.main(args((data, copy), "--num-iterations", 3)) == 0
    assert "step 00001/3 | skipped: its rows hold no supervised target" in capsys.readouterr().out
    assert len(steps) == 2 and len(forwards) == 2 and min(forwards) > 0
    recs = records(base / "chatsft_checkpoints" / "d2")
    assert recs[0] == {"step": 1, "skipped": "no supervised target", "supervised": 0}
    assert sorted(train_losses(base / "chatsft_checkpoints" / "d2")) == [2, 3]
    assert all(np.isfinite(list(train_losses(base / "chatsft_checkpoints" / "d2").values())))


# --- two ranks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_two_ranks_match_one_rank_with_accumulation(snap, base, device):
    """torchrun with 2 ranks x accumulation 1 trains as 1 rank x accumulation 2 at the same total batch: the
    rows are world-size independent (design §7), the loss is normalised over the whole step's targets, and
    the optimizer's reduce-scatter / all-gather shards give back the single-process update. On a machine with
    one GPU the two ranks share it over gloo (NANOSFT_SHARE_GPUS): the CUDA kernels run, NCCL does not."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", NANOCHAT_BASE_DIR=str(base))
    if device == "cuda" and torch.cuda.device_count() < 2:
        env["NANOSFT_SHARE_GPUS"] = "1"
    common = [a if a != "cpu" else device for a in args(snap, "--num-iterations", 4, "--total-batch-size", 8 * 128,
                                                        "--eval-every", 4, "--eval-tokens", 2 * 4 * 128)]

    def run(*launcher, tag):
        r = subprocess.run([sys.executable, *launcher, "-m", "trainer.train", *common, "--out-tag", tag], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    one = run(tag="w1")
    two = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", tag="w2")
    assert "8 rows/step = 4 x 1 ranks x 2 accum" in one and "8 rows/step = 4 x 2 ranks x 1 accum" in two
    a, b = (base / "chatsft_checkpoints" / t for t in ("w1", "w2"))
    la, lb = train_losses(a), train_losses(b)
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4] and la[4] < la[1]
    rel = 1e-5 if device == "cpu" else 2e-2  # CPU: the same fp32 sums (bitwise equal here); GPU: bf16
    for s in la:
        assert lb[s] == pytest.approx(la[s], rel=rel), f"step {s}"
    bpb = [[r["val_bpb"] for r in records(c) if "val_bpb" in r] for c in (a, b)]
    assert len(bpb[0]) == len(bpb[1]) == 2 and bpb[1] == pytest.approx(bpb[0], rel=rel)
    wa, wb = weights(a / "model_000004.pt"), weights(b / "model_000004.pt")
    assert wa.keys() == wb.keys()
    if device == "cpu":  # on the GPU, AdamW's per-element step turns bf16 noise on rarely seen embedding rows into
        for k in wa:    # whole-lr differences; the losses and val bpb above are the check there, as in ddp_parity
            torch.testing.assert_close(wb[k], wa[k], rtol=rel, atol=rel * 1e-2, msg=k)
    assert sorted(p.name for p in b.glob("optim_000004_rank*.pt")) == ["optim_000004_rank0.pt",
                                                                       "optim_000004_rank1.pt"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no CUDA device is visible")
def test_cuda_without_a_visible_gpu_exits_2(snap, base, capsys):
    argv = [a if a != "cpu" else "cuda" for a in args(snap, "--num-iterations", 1)]
    assert train_mod.main(argv) == 2
    assert "error: --device-type cuda, but no CUDA device is visible" in capsys.readouterr().err
    assert not (base / "chatsft_checkpoints").exists()
