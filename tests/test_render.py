"""pipeline.render: token streams and masks exactly as nanochat's chat template (reference §2)."""
from __future__ import annotations

import copy
import json
import random
import re
from pathlib import Path

import pytest

from pipeline.errors import ConversationError
from pipeline.render import render_conversation, render_for_completion
from pipeline.tokenizer import ChatTokenizer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# --- an independent transcription of reference §2.2 / §2.3, plain loops, straight on tiktoken --------

def reference_render(conversation, enc, max_tokens=10**9):
    ids, mask = [], []

    def add(tokens, m):
        for t in tokens:
            ids.append(t)
            mask.append(m)

    def special(name):
        return enc.encode_single_token(name)

    if conversation["messages"][0]["role"] == "system":
        conversation = copy.deepcopy(conversation)
        messages = conversation["messages"]
        assert messages[1]["role"] == "user"
        messages[1]["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
        messages = messages[1:]
    else:
        messages = conversation["messages"]
    assert len(messages) >= 1
    add([special("<|bos|>")], 0)
    for i, message in enumerate(messages):
        assert message["role"] == ("user" if i % 2 == 0 else "assistant")
        content = message["content"]
        if message["role"] == "user":
            assert isinstance(content, str)
            add([special("<|user_start|>")], 0)
            add(enc.encode_ordinary(content), 0)
            add([special("<|user_end|>")], 0)
        else:
            add([special("<|assistant_start|>")], 0)
            if isinstance(content, str):
                add(enc.encode_ordinary(content), 1)
            elif isinstance(content, list):
                for part in content:
                    tokens = enc.encode_ordinary(part["text"])
                    if part["type"] == "text":
                        add(tokens, 1)
                    elif part["type"] == "python":
                        add([special("<|python_start|>")], 1)
                        add(tokens, 1)
                        add([special("<|python_end|>")], 1)
                    elif part["type"] == "python_output":
                        add([special("<|output_start|>")], 0)
                        add(tokens, 0)
                        add([special("<|output_end|>")], 0)
                    else:
                        raise ValueError(part["type"])
            else:
                raise ValueError(type(content))
            add([special("<|assistant_end|>")], 1)
    return ids[:max_tokens], mask[:max_tokens]


def reference_for_completion(conversation, enc):
    conversation = copy.deepcopy(conversation)
    assert conversation["messages"][-1]["role"] == "assistant"
    conversation["messages"].pop()
    ids, _ = reference_render(conversation, enc)
    return ids + [enc.encode_single_token("<|assistant_start|>")]


def gsm8k_conversation(question: str, answer: str) -> dict:
    """Reference §3.6, transcribed: calculator annotations become python / python_output parts."""
    parts = []
    for seg in re.split(r"(<<[^>]+>>)", answer):
        if seg.startswith("<<") and seg.endswith(">>"):
            inner = seg[2:-2]
            expr, result = inner.rsplit("=", 1) if "=" in inner else (inner, "")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        else:
            parts.append({"type": "text", "text": seg})
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]}


def synthetic_conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = ["hello", " world", "12345", "<|bos|>", "café", "😀", "\n\n", " ", "", "x=3*4", "#### 72", "\t?!"]

    def text():
        return "".join(rng.choice(words) for _ in range(rng.randint(0, 6)))

    convs = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": text()})
        for t in range(rng.randint(1, 6)):
            if t % 2 == 0:
                messages.append({"role": "user", "content": text()})
            elif rng.random() < 0.5:
                messages.append({"role": "assistant", "content": text()})
            else:
                parts = [{"type": rng.choice(["text", "python", "python_output"]), "text": text()}
                         for _ in range(rng.randint(0, 5))]
                messages.append({"role": "assistant", "content": parts})
        convs.append({"messages": messages, "extra": "kept"})
    return convs


# --- helpers -----------------------------------------------------------------------------------

def S(tok: ChatTokenizer, name: str) -> int:
    return tok.special_id(f"<|{name}|>")


def span(tok, text, m):
    t = tok.encode(text)
    return t, [m] * len(t)


# --- exact streams -----------------------------------------------------------------------------

def test_string_assistant_content(tiny_tokenizer):
    tok = tiny_tokenizer
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    ids, mask = render_conversation(conv, tok)
    hi, hello = tok.encode("hi"), tok.encode("hello")
    assert ids == [S(tok, "bos"), S(tok, "user_start"), *hi, S(tok, "user_end"),
                   S(tok, "assistant_start"), *hello, S(tok, "assistant_end")]
    assert mask == [0, 0] + [0] * len(hi) + [0, 0] + [1] * len(hello) + [1]


def test_every_part_type(tiny_tokenizer):
    tok = tiny_tokenizer
    parts = [
        {"type": "text", "text": "Half of 48 is "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24."},
        {"type": "text", "text": " Done"},       # separate encode: boundary at the part edge
        {"type": "python", "text": ""},
        {"type": "python_output", "text": ""},   # empty output still has both delimiters
    ]
    conv = {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": parts}]}
    ids, mask = render_conversation(conv, tok)
    q = tok.encode("Q?")
    exp_ids = [S(tok, "bos"), S(tok, "user_start"), *q, S(tok, "user_end"), S(tok, "assistant_start")]
    exp_mask = [0] * (len(q) + 4)
    t = tok.encode("Half of 48 is "); exp_ids += t; exp_mask += [1] * len(t)
    t = tok.encode("48/2"); exp_ids += [S(tok, "python_start"), *t, S(tok, "python_end")]; exp_mask += [1] * (len(t) + 2)
    t = tok.encode("24"); exp_ids += [S(tok, "output_start"), *t, S(tok, "output_end")]; exp_mask += [0] * (len(t) + 2)
    t = tok.encode("24."); exp_ids += t; exp_mask += [1] * len(t)
    t = tok.encode(" Done"); exp_ids += t; exp_mask += [1] * len(t)
    exp_ids += [S(tok, "python_start"), S(tok, "python_end"), S(tok, "output_start"), S(tok, "output_end")]
    exp_mask += [1, 1, 0, 0]
    exp_ids += [S(tok, "assistant_end")]; exp_mask += [1]
    assert ids == exp_ids and mask == exp_mask
    assert len(ids) == len(mask)


def test_part_boundaries_are_token_boundaries(tiny_tokenizer):
    tok = tiny_tokenizer
    # a learned word token, cut in the middle: encoded whole it is one token, as two parts it is not
    word = next(w for w in (tok.decode([i]) for i in range(256, tok.bos_id)) if w.isalpha() and len(w) >= 4)
    left, right = word[:2], word[2:]
    assert tok.encode(word + word) == [tok.encode(word)[0]] * 2
    conv = {"messages": [{"role": "user", "content": ""},
                         {"role": "assistant", "content": [{"type": "text", "text": word + left},
                                                           {"type": "text", "text": right}]}]}
    ids, _ = render_conversation(conv, tok)
    assert ids[4:-1] == tok.encode(word + left) + tok.encode(right)
    assert ids[4:-1] != tok.encode(word + word)


def test_system_merge_without_mutation(tiny_tokenizer):
    tok = tiny_tokenizer
    conv = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "ok"}], "source": "smoltalk"}
    before = copy.deepcopy(conv)
    merged = {"messages": [{"role": "user", "content": "Be brief.\n\nhi"}, {"role": "assistant", "content": "ok"}]}
    assert render_conversation(conv, tok) == render_conversation(merged, tok)
    ids, _ = render_conversation(conv, tok)
    assert tok.decode(ids[2:ids.index(S(tok, "user_end"))]) == "Be brief.\n\nhi"
    assert conv == before


def test_conversation_ending_on_user(tiny_tokenizer):
    tok = tiny_tokenizer
    conv = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                         {"role": "user", "content": "c"}]}
    ids, mask = render_conversation(conv, tok)
    c = tok.encode("c")
    assert ids[-(len(c) + 2):] == [S(tok, "user_start"), *c, S(tok, "user_end")]
    assert mask[-(len(c) + 2):] == [0] * (len(c) + 2)
    assert ids.count(S(tok, "assistant_end")) == 1


def test_mask_policy_all(tiny_tokenizer):
    conv = synthetic_conversations(1, seed=3)[0]
    ids_a, mask_a = render_conversation(conv, tiny_tokenizer, mask_policy="assistant")
    ids_all, mask_all = render_conversation(conv, tiny_tokenizer, mask_policy="all")
    assert ids_all == ids_a
    assert mask_all == [1] * len(ids_a)
    with pytest.raises(ValueError, match="mask_policy"):
        render_conversation(conv, tiny_tokenizer, mask_policy="user")


def test_no_truncation(tiny_tokenizer):
    long = " ".join(["word"] * 3000)
    conv = {"messages": [{"role": "user", "content": long}, {"role": "assistant", "content": long}]}
    ids, mask = render_conversation(conv, tiny_tokenizer)
    assert len(ids) == len(mask) > 2048
    assert ids[-1] == S(tiny_tokenizer, "assistant_end")


# --- errors ------------------------------------------------------------------------------------

U = {"role": "user", "content": "u"}
A = {"role": "assistant", "content": "a"}
SYS = {"role": "system", "content": "s"}


def _parts(*parts):
    return {"role": "assistant", "content": list(parts)}


ERROR_CASES = [
    ([U, A], None, "found list"),  # the conversation itself is a list
    ({}, "messages", "missing"),
    ({"messages": "hi"}, "messages", "found str"),
    ({"messages": []}, "messages", "empty"),
    ({"messages": ["hi"]}, "messages[0]", "found str"),
    ({"messages": [U, {"content": "x"}]}, "messages[1].role", "missing"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "missing"),
    ({"messages": [A]}, "messages[0].role", "expected 'user'.*found 'assistant'"),
    ({"messages": [U, U]}, "messages[1].role", "expected 'assistant'.*found 'user'"),
    ({"messages": [U, {"role": "tool", "content": "x"}]}, "messages[1].role", "found 'tool'"),
    ({"messages": [U, A, SYS]}, "messages[2].role", "system message is allowed only first"),
    ({"messages": [SYS]}, "messages", "followed by a user message"),
    ({"messages": [SYS, A]}, "messages[1].role", "expected 'user'.*found 'assistant'"),
    ({"messages": [SYS, U, U]}, "messages[2].role", "expected 'assistant'"),
    ({"messages": [{"role": "system", "content": 5}, U]}, "messages[0].content", "found int"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages[0].content", "expected a string, found list"),
    ({"messages": [U, {"role": "assistant", "content": 7}]}, "messages[1].content", "string or a list.*found int"),
    ({"messages": [U, {"role": "assistant", "content": None}]}, "messages[1].content", "found None"),
    ({"messages": [U, _parts("text")]}, "messages[1].content[0]", "part dict.*found str"),
    ({"messages": [U, _parts({"type": "text", "text": "ok"}, {"text": "x"})]}, "messages[1].content[1].type", "missing"),
    ({"messages": [U, A, U, _parts({"type": "text", "text": "x"}, {"type": "image", "text": "x"})]},
     "messages[3].content[1].type", "expected one of 'text', 'python', 'python_output', found 'image'"),
    ({"messages": [U, _parts({"type": "python", "text": 5})]}, "messages[1].content[0].text", "found int"),
    ({"messages": [U, _parts({"type": "python_output"})]}, "messages[1].content[0].text", "missing"),
]


@pytest.mark.parametrize("conv, field, words", ERROR_CASES)
def test_structural_errors(tiny_tokenizer, conv, field, words):
    with pytest.raises(ConversationError) as e:
        render_conversation(conv, tiny_tokenizer)
    assert e.value.field == field
    assert re.search(words, e.value.reason), e.value.reason


class _CountingTokenizer(ChatTokenizer):
    calls = 0

    def encode(self, text):
        type(self).calls += 1
        return super().encode(text)


def test_validates_before_encoding(tiny_tokenizer):
    tok = _CountingTokenizer(tiny_tokenizer.enc)
    conv = {"messages": [U, A, U, _parts({"type": "text", "text": "fine"}, {"type": "video", "text": "x"})]}
    with pytest.raises(ConversationError):
        render_conversation(conv, tok)
    assert _CountingTokenizer.calls == 0
    render_conversation({"messages": [U, A, U, _parts({"type": "text", "text": "fine"}, {"type": "python", "text": ""})]}, tok)
    assert _CountingTokenizer.calls == 5  # each text encoded exactly once


# --- completion --------------------------------------------------------------------------------

def test_render_for_completion(tiny_tokenizer):
    tok = tiny_tokenizer
    # fresh dicts: deepcopy keeps aliasing, so a dict shared by two positions would merge the system text twice
    conv = {"messages": copy.deepcopy([SYS, U, A]) + [{"role": "user", "content": "v"},
                                                     _parts({"type": "text", "text": "answer"})]}
    before = copy.deepcopy(conv)
    ids = render_for_completion(conv, tok)
    prompt_ids, _ = render_conversation({"messages": conv["messages"][:-1]}, tok)
    assert ids == prompt_ids + [S(tok, "assistant_start")]
    assert ids == reference_for_completion(conv, tok.enc)
    assert conv == before


def test_render_for_completion_errors(tiny_tokenizer):
    with pytest.raises(ConversationError) as e:
        render_for_completion({"messages": [U, A, U]}, tiny_tokenizer)
    assert e.value.field == "messages[2].role" and "'user'" in e.value.reason
    with pytest.raises(ConversationError) as e:
        render_for_completion({"messages": [A]}, tiny_tokenizer)
    assert e.value.field == "messages"
    with pytest.raises(ConversationError) as e:
        render_for_completion({"messages": []}, tiny_tokenizer)
    assert e.value.field == "messages"


# --- against the transcription of the spec -----------------------------------------------------

def _compare(convs, tok):
    for n, conv in enumerate(convs):
        before = copy.deepcopy(conv)
        got = render_conversation(conv, tok)
        assert got == reference_render(conv, tok.enc), f"conversation {n} differs"
        assert conv == before
        if conv["messages"][-1]["role"] == "assistant":
            assert render_for_completion(conv, tok) == reference_for_completion(conv, tok.enc)


def test_matches_reference_synthetic(tiny_tokenizer):
    convs = synthetic_conversations(300)
    assert any(m["role"] == "system" for c in convs for m in c["messages"])
    assert any(p["type"] == "python_output" and p["text"] == "" for c in convs for m in c["messages"]
               if isinstance(m["content"], list) for p in m["content"])
    _compare(convs, tiny_tokenizer)


def test_matches_reference_identity_file(tiny_tokenizer):
    path = DATA / "identity_conversations.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    convs = [{"messages": json.loads(line)} for line in path.read_text().splitlines() if line.strip()]
    assert len(convs) > 100
    _compare(convs, tiny_tokenizer)


def test_matches_reference_gsm8k(tiny_tokenizer):
    path = DATA / "task_data" / "openai--gsm8k" / "main" / "test" / "00000.parquet"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    import pyarrow.parquet as pq

    rows = pq.read_table(path).slice(0, 300).to_pylist()
    convs = [gsm8k_conversation(r["question"], r["answer"]) for r in rows]
    _compare(convs, tiny_tokenizer)
    # tool calls really occur, and their outputs are never supervised
    ids, mask = render_conversation(convs[0], tiny_tokenizer)
    os_, oe = S(tiny_tokenizer, "output_start"), S(tiny_tokenizer, "output_end")
    assert os_ in ids
    inside = False
    for t, m in zip(ids, mask):
        inside = inside or t == os_
        if inside:
            assert m == 0
        inside = inside and t != oe
