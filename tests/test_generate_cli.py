"""trainer.eval, trainer.chat and bench/bench_generate.py --smoke on the CPU: a tiny checkpoint with the
tokenizer it records in its meta, the JSON eval report, the chat's kept conversation and streaming."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.tokenizer import save_tokenizer
from trainer import chat as chat_mod
from trainer import eval as eval_mod
from trainer.checkpoint import save_checkpoint
from trainer.config import GPTConfig
from trainer.model import GPT

REPO = Path(__file__).resolve().parents[1]
ARC = [{"question": f"Question {i}?", "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]},
        "answerKey": "ABCD"[i % 4]} for i in range(6)]


@pytest.fixture
def ckpt(tmp_path, tiny_tokenizer, monkeypatch):
    """(data dir, checkpoint folder): chatsft_checkpoints/d2/model_000007.pt, the tokenizer in a 'snapshot'."""
    for k in ("NANOCHAT_BASE_DIR", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NANOCHAT_DTYPE"):
        monkeypatch.delenv(k, raising=False)
    data = tmp_path / "data"
    tok_file = data / "snapshots" / "x" / "tokenizer.pkl"
    save_tokenizer(tiny_tokenizer, tok_file)
    config = GPTConfig(sequence_len=64, vocab_size=tiny_tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=2,
                       n_embd=32)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    meta = {"step": 7, "model_config": asdict(config),
            "nanosft": {"tokenizer": {"file": str(tok_file), "fingerprint": tiny_tokenizer.fingerprint}}}
    folder = data / "chatsft_checkpoints" / "d2"
    save_checkpoint(folder, 7, model.state_dict(), None, meta, rank=0)
    arc = data / "task_data" / "allenai--ai2_arc" / "ARC-Easy" / "test"
    arc.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ARC), arc / "00000.parquet")
    return data, folder


def test_eval_cli_table_and_json(ckpt, capsys):
    data, folder = ckpt
    out = data / "eval.json"
    rc = eval_mod.main(["--data-dir", str(data), "--device-type", "cpu", "-a", "ARC-Easy|ARC-Challenge|SpellingBee",
                        "-x", "3", "-m", "4", "-b", "2", "--json", str(out)])
    assert rc == 0
    log = capsys.readouterr().out
    assert "ChatCORE: ARC-Challenge skipped" in log and "over 2 task(s)" in log
    assert f"{data / 'task_data/allenai--ai2_arc/ARC-Easy/test/00000.parquet'} (6 rows)" in log
    report = json.loads(out.read_text())
    assert report["checkpoint"] == str(folder / "model_000007.pt") and report["step"] == 7
    assert report["tokenizer"] == str(data / "snapshots" / "x" / "tokenizer.pkl")
    assert set(report["tasks"]) == {"ARC-Easy", "SpellingBee"} and "ARC-Challenge" in report["skipped"]
    arc = report["tasks"]["ARC-Easy"]
    assert arc["problems"] == 3 and arc["files"][0]["rows"] == 6
    assert [r["index"] for r in arc["results"]] == [0, 1, 2]
    assert arc["accuracy"] == sum(r["passed"] for r in arc["results"]) / 3
    assert all(r["completion"] in "ABCD" for r in arc["results"])
    sb = report["tasks"]["SpellingBee"]
    assert sb["problems"] == 3 and len(sb["results"]) == 3 and sb["files"][0]["rows"] > 1000
    # the checkpoint named directly gives the same numbers
    out2 = data / "eval2.json"
    assert eval_mod.main(["--checkpoint", str(folder), "--data-dir", str(data), "--device-type", "cpu",
                          "-a", "ARC-Easy", "-x", "3", "--json", str(out2)]) == 0
    assert json.loads(out2.read_text())["tasks"]["ARC-Easy"]["results"] == arc["results"]


def test_eval_cli_errors(ckpt, tmp_path, capsys, tiny_tokenizer):
    data, folder = ckpt
    assert eval_mod.main(["--data-dir", str(data), "--device-type", "cpu", "-a", "ARC-Medium"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert eval_mod.main(["--data-dir", str(tmp_path / "nothing"), "--device-type", "cpu"]) == 2
    assert "no checkpoints in" in capsys.readouterr().err
    # the recorded tokenizer is gone and the base dir has none: say what was tried
    (data / "snapshots" / "x" / "tokenizer.pkl").unlink()
    assert eval_mod.main(["--data-dir", str(data), "--device-type", "cpu", "-a", "ARC-Easy"]) == 2
    err = capsys.readouterr().err
    assert "no tokenizer for this checkpoint" in err and "tokenizer.pkl (absent)" in err
    # a tokenizer with another fingerprint is refused
    from pipeline.tokenizer import train_tokenizer
    other = train_tokenizer(["some other text entirely, to train another tokenizer"] * 3, vocab_size=300)
    save_tokenizer(other, tmp_path / "other.pkl")
    assert eval_mod.main(["--data-dir", str(data), "--device-type", "cpu", "--tokenizer",
                          str(tmp_path / "other.pkl")]) == 2
    assert "the checkpoint was trained with" in capsys.readouterr().err


def test_chat_keeps_the_conversation_and_streams(ckpt, tiny_tokenizer):
    data, _ = ckpt
    args = chat_mod.parse_args(["--data-dir", str(data), "--device-type", "cpu", "-t", "0", "-m", "5"])
    stdin = io.StringIO("hello\n\nclear\nhello\nwhat next?\nquit\n")
    out = io.StringIO()
    assert chat_mod.run(args, stdin=stdin, out=out) == 0
    text = out.getvalue()
    assert text.count("Assistant: ") == 3 and "(new conversation)" in text
    replies = [line.split("Assistant: ", 1)[1] for line in text.splitlines() if "Assistant: " in line]
    assert replies[0] == replies[1]  # same conversation state after 'clear', greedy
    # one-shot mode prints the same first reply
    one = io.StringIO()
    args_p = chat_mod.parse_args(["--data-dir", str(data), "--device-type", "cpu", "-t", "0", "-m", "5", "-p", "hello"])
    assert chat_mod.run(args_p, out=one) == 0
    assert one.getvalue().rstrip("\n") == replies[0]


def test_conversation_renders_as_nanochat(tiny_tokenizer):
    from pipeline.render import render_conversation, render_for_completion
    tok = tiny_tokenizer
    conv = chat_mod.Conversation(tok)
    first = conv.prompt("Hi")
    assert first == render_for_completion({"messages": [{"role": "user", "content": "Hi"},
                                                        {"role": "assistant", "content": ""}]}, tok)
    conv.reply(tok.encode("Hello!"))
    conv.prompt("2+2?")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": ""}]
    assert conv.ids == render_for_completion({"messages": msgs}, tok)
    assert render_conversation({"messages": msgs[:2]}, tok)[0] == conv.ids[:len(render_conversation(
        {"messages": msgs[:2]}, tok)[0])]


def test_stream_text_holds_back_split_characters(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok.encode("café 日本語 ok")
    pieces = []
    out = chat_mod.stream_text(tok, iter(ids), pieces.append)
    assert out == ids and "".join(pieces) == "café 日本語 ok"
    assert not any("\ufffd" in p for p in pieces)
