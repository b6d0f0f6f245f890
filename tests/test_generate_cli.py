"""trainer.eval, trainer.chat and bench/bench_generate.py --smoke on the CPU: a tiny checkpoint with the
tokenizer it records in its meta, the JSON eval report, the chat's kept conversation and streaming."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

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


def test_bench_generate_smoke(tmp_path):
    """The GPU benchmark's --smoke mode on the CPU: every section runs and the JSON has the table's numbers."""
    out = tmp_path / "gen.json"
    r = subprocess.run([sys.executable, "bench/bench_generate.py", "--smoke", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                         "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    d2 = report["configs"]["d2"]
    assert d2["single"]["new_tokens"] > 0 and d2["single"]["tok_s"] > 0
    assert [b["batch"] for b in d2["batched"]] == [1, 4] and all(b["tok_s"] > 0 for b in d2["batched"])
    full, sft = d2["chatcore"]["full"], d2["chatcore"]["sft"]
    assert set(full["tasks"]) == {"ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"}
    assert set(sft["tasks"]) == set(full["tasks"]) and sft["seconds"] > 0
    assert full["tasks"]["MMLU"]["problems"] == 6 and full["tasks"]["GSM8K"]["problems"] == 3
    assert all(v.startswith("synthetic") for v in report["chatcore_tasks"].values())
    assert "| d2 |" in r.stdout and "baseline: 20.4 tok/s" in r.stdout
    assert report["decode_checks"]["ok"] and "check static/pad8: PASS" in r.stdout


def test_bench_synthetic_tasks_have_the_real_sizes():
    sys.path.insert(0, str(REPO / "bench"))
    import bench_generate as bg
    tok = bg.synthetic_tokenizer(32768)
    assert tok.vocab_size == 32768 and all(len(tok.encode(s)) == 1 for s in "ABCD")
    from pipeline.render import render_for_completion
    for name, (n, median, sigma, kind) in bg.TASKS.items():
        task = bg.synthetic_task(name, n, median, sigma)
        assert len(task) == n and task.eval_type == kind
        lengths = sorted(len(render_for_completion(task[i], tok)) for i in range(0, n, max(1, n // 50)))
        assert 0.6 * median < lengths[len(lengths) // 2] < 1.6 * median, (name, lengths[len(lengths) // 2])
        conv = task[0]
        assert task.evaluate(conv, conv["messages"][-1]["content"])  # the reference answer passes


def test_inference_copy_casts_parameters_not_the_model(monkeypatch):
    from trainer.inference import inference_copy
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    assert inference_copy(model) is model  # fp32 on the CPU: nothing to do
    model.dtype = torch.bfloat16  # as on CUDA: fp32 masters, bf16 compute
    copy = inference_copy(model)
    assert copy is not model and all(p.dtype == torch.bfloat16 for p in copy.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters()) and model.cos.dtype == copy.cos.dtype
    for (name, a), (_, b) in zip(model.named_parameters(), copy.named_parameters()):
        assert torch.equal(a.to(torch.bfloat16), b), name
        assert a.data_ptr() != b.data_ptr()
