"""Tasks on hand-written parquet/JSONL rows: nanochat's conversations, seed-42 order, slicing, bad inputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline.errors import DataError, RecipeError, SourceMissingError
from pipeline.recipe import TaskSpec
from pipeline.tasks import build_task
from pipeline.tasks.mmlu import render_mc
from pipeline.tasks.source import find_source_files, seed_permutation

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def spec(kind, name="t", start=0, stop=None, step=1, **params):
    return TaskSpec(kind=kind, name=name, params=params, start=start, stop=stop, step=step)


def perm(n):
    return np.random.default_rng(42).permutation(n).tolist()


def write_parquet(path: Path, columns: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(columns).write_parquet(path)
    return path


def msg(role, content):
    return {"role": role, "content": content}


def cache(tmp_path, repo, subset, split, name="00000.parquet"):
    return tmp_path / "task_data" / repo.replace("/", "--") / subset / split / name


# ------------------------------------------------------------------------------------------ SmolTalk
SMOL_A = [
    [msg("system", "You are terse."), msg("user", "hi"), msg("assistant", "hello")],
    [msg("user", "2+2?"), msg("assistant", "4"), msg("user", "and 3+3?"), msg("assistant", "6")],
    [msg("user", "q0"), msg("assistant", "a0")],
    [msg("user", "q1"), msg("assistant", "")],
    [msg("system", ""), msg("user", "q2"), msg("assistant", "a2"), msg("user", "q3"), msg("assistant", "a3")],
]
SMOL_B = [[msg("user", f"b{i}"), msg("assistant", f"B{i}")] for i in range(3)]


def test_smoltalk_order_and_conversations(tmp_path):
    repo = "HuggingFaceTB/smol-smoltalk"
    f0 = write_parquet(cache(tmp_path, repo, "default", "train", "00000.parquet"), {"messages": SMOL_A})
    f1 = write_parquet(cache(tmp_path, repo, "default", "train", "00001.parquet"), {"messages": SMOL_B})
    task = build_task(spec("smoltalk", split="train"), tmp_path)
    rows = SMOL_A + SMOL_B
    assert len(task) == 8 and task.inputs() == [f0, f1]
    p = perm(8)
    for k in range(8):
        assert task[k] == {"messages": rows[p[k]]}
        assert task.locate(k) == ((str(f0), p[k]) if p[k] < 5 else (str(f1), p[k] - 5))
    system_row = [k for k in range(8) if p[k] == 0][0]
    assert task[system_row]["messages"][0] == {"role": "system", "content": "You are terse."}  # kept, merged at render
    # explicit paths (a glob, relative to data_dir) give the same task
    again = build_task(spec("smoltalk", split="ignored", paths="task_data/*smol*/default/train/*.parquet"), tmp_path)
    assert [again[k] for k in range(8)] == [task[k] for k in range(8)]


@pytest.mark.parametrize("bad, field", [
    ([msg("assistant", "x"), msg("user", "y")], "messages[0].role"),
    ([msg("system", "s"), msg("assistant", "x"), msg("user", "y")], "messages[1].role"),
    ([msg("user", "x"), msg("assistant", "y"), msg("assistant", "z")], "messages[2].role"),
    ([msg("user", "x"), msg("assistant", None)], "messages[1].content"),
    ([msg("system", "s"), msg("user", "only one")], "messages"),
    ([msg("user", "only one")], "messages"),
    ([], "messages"),
    ([msg("system", "s"), msg("system", "t"), msg("user", "u")], "messages[1].role"),
])
def test_smoltalk_bad_rows(tmp_path, bad, field):
    good = [msg("user", "q"), msg("assistant", "a")]
    rows = [good, good, bad, good]
    f = write_parquet(cache(tmp_path, "HuggingFaceTB/smol-smoltalk", "default", "test"), {"messages": rows})
    task = build_task(spec("smoltalk", name="smol", split="test"), tmp_path)
    k = perm(4).index(2)
    with pytest.raises(DataError) as e:
        task[k]
    assert (e.value.file, e.value.row, e.value.field, e.value.task) == (str(f), 2, field, "smol")
    assert str(f) in str(e.value) and "row 2" in str(e.value)
    task[perm(4).index(0)]  # good rows still fine


def test_smoltalk_schema_errors(tmp_path):
    f = write_parquet(cache(tmp_path, "HuggingFaceTB/smol-smoltalk", "default", "train"), {"conversation": ["x"]})
    with pytest.raises(DataError) as e:
        build_task(spec("smoltalk", split="train"), tmp_path)
    assert (e.value.file, e.value.field) == (str(f), "messages") and "missing column" in e.value.reason
    write_parquet(f, {"messages": [[{"role": "user", "content": 3}]]})
    with pytest.raises(DataError) as e:
        build_task(spec("smoltalk", split="train"), tmp_path)
    assert (e.value.file, e.value.field) == (str(f), "messages") and "type" in e.value.reason
    f.write_bytes(b"not a parquet file")
    with pytest.raises(DataError) as e:
        build_task(spec("smoltalk", split="train"), tmp_path)
    assert e.value.file == str(f)


# ------------------------------------------------------------------------------------------ MMLU
MMLU_ROWS = {
    "question": ["What is 2+2?", "Capital of France?", "Pick one"],
    "subject": ["elementary_mathematics", "geography", "misc"],
    "choices": [["3", "4", "5", "6"], ["Paris", "London", "Berlin", "Madrid"], ["a=b", " x ", "", "é"]],
    "answer": [1, 0, 3],
}


def test_mmlu_render_mc_exact(tmp_path):
    write_parquet(cache(tmp_path, "cais/mmlu", "all", "auxiliary_train"), MMLU_ROWS)
    task = build_task(spec("mmlu", split="auxiliary_train"), tmp_path)
    p = perm(3)
    conv = task[p.index(0)]
    assert conv == {
        "messages": [
            {"role": "user", "content": "Multiple Choice question: What is 2+2?\n- 3=A\n- 4=B\n- 5=C\n- 6=D\n\n"
                                        "Respond only with the letter of the correct answer."},
            {"role": "assistant", "content": "B"},
        ],
        "subject": "elementary_mathematics",
        "letters": ("A", "B", "C", "D"),
    }
    assert isinstance(conv["letters"], tuple)  # nanochat's class attribute is a tuple
    odd = task[p.index(2)]
    assert odd["messages"][0]["content"] == ("Multiple Choice question: Pick one\n- a=b=A\n-  x =B\n- =C\n- é=D\n\n"
                                             "Respond only with the letter of the correct answer.")
    assert odd["messages"][1]["content"] == "D"
    assert render_mc("Q", ["1", "2"], ["x", "y"]) == "Multiple Choice question: Q\n- x=1\n- y=2\n\nRespond only with the letter of the correct answer."


def test_mmlu_wrapped_auxiliary_train(tmp_path):
    # the old `auxiliary_train` config nests each row in a struct column named "train"
    rows = [{k: MMLU_ROWS[k][i] for k in MMLU_ROWS} for i in range(3)]
    write_parquet(cache(tmp_path, "cais/mmlu", "auxiliary_train", "train"), {"train": rows})
    write_parquet(cache(tmp_path, "cais/mmlu", "all", "auxiliary_train"), MMLU_ROWS)
    wrapped = build_task(spec("mmlu", subset="auxiliary_train", split="train"), tmp_path)
    flat = build_task(spec("mmlu", split="auxiliary_train"), tmp_path)
    assert [wrapped[k] for k in range(3)] == [flat[k] for k in range(3)]


@pytest.mark.parametrize("choices, answer, field", [
    ([["a", "b", "c", "d"], ["a", "b", "c"]], [0, 0], "choices"),
    ([["a", "b", "c", "d"], ["a", "b", "c", "d", "e"]], [0, 0], "choices"),
    ([["a", "b", "c", "d"], ["a", None, "c", "d"]], [0, 0], "choices[1]"),
    ([["a", "b", "c", "d"], ["a", "b", "c", "d"]], [0, 4], "answer"),
    ([["a", "b", "c", "d"], ["a", "b", "c", "d"]], [0, -1], "answer"),
])
def test_mmlu_bad_rows(tmp_path, choices, answer, field):
    f = write_parquet(cache(tmp_path, "cais/mmlu", "all", "test"),
                      {"question": ["q", "q"], "subject": ["s", "s"], "choices": choices, "answer": answer})
    task = build_task(spec("mmlu", split="test"), tmp_path)
    with pytest.raises(DataError) as e:
        task[perm(2).index(1)]
    assert (e.value.file, e.value.row, e.value.field) == (str(f), 1, field)


def test_mmlu_schema_errors(tmp_path):
    f = cache(tmp_path, "cais/mmlu", "all", "test")
    write_parquet(f, {"question": ["q"], "choices": [["a", "b", "c", "d"]], "answer": [0]})
    with pytest.raises(DataError) as e:
        build_task(spec("mmlu", split="test"), tmp_path)
    assert (e.value.file, e.value.field) == (str(f), "subject")
    write_parquet(f, {"question": ["q"], "subject": ["s"], "choices": [["a", "b", "c", "d"]], "answer": ["A"]})
    with pytest.raises(DataError) as e:
        build_task(spec("mmlu", split="test"), tmp_path)
    assert (e.value.file, e.value.field) == (str(f), "answer") and "integer" in e.value.reason
    write_parquet(f, {"question": ["q"], "subject": ["s"], "choices": ["a,b,c,d"], "answer": [0]})
    with pytest.raises(DataError) as e:
        build_task(spec("mmlu", split="test"), tmp_path)
    assert e.value.field == "choices"


# ------------------------------------------------------------------------------------------ GSM8K
def T(s):
    return {"type": "text", "text": s}


def P(s):
    return {"type": "python", "text": s}


def O(s):
    return {"type": "python_output", "text": s}


GSM = [
    ("Q0", "She has 48/2 = <<48/2=24>>24 clips.\n#### 24",
     [T("She has 48/2 = "), P("48/2"), O("24"), T("24 clips.\n#### 24")]),
    ("Q1", "<<7*2=14>>14 first", [T(""), P("7*2"), O("14"), T("14 first")]),
    ("Q2", "x <<1+1=2>><<2*3=6>>", [T("x "), P("1+1"), O("2"), T(""), P("2*3"), O("6"), T("")]),
    ("Q3", "sum <<3+4>> is 7\n#### 7", [T("sum "), P("3+4"), O(""), T(" is 7\n#### 7")]),
    ("Q4", "chain <<a=b=3>>3 and <<5-1=>>", [T("chain "), P("a=b"), O("3"), T("3 and "), P("5-1"), O(""), T("")]),
    ("Q5", "no calls at all\n#### 0", [T("no calls at all\n#### 0")]),
    ("Q6", "a <<>> b << 1>2 >>", [T("a <<>> b << 1>2 >>")]),
]


def test_gsm8k_parts(tmp_path):
    f = write_parquet(cache(tmp_path, "openai/gsm8k", "main", "train"),
                      {"question": [g[0] for g in GSM], "answer": [g[1] for g in GSM]})
    task = build_task(spec("gsm8k", split="train"), tmp_path)
    assert len(task) == len(GSM) and task.inputs() == [f]
    for k, row in enumerate(perm(len(GSM))):
        q, _, parts = GSM[row]
        assert task[k] == {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": parts}]}


def test_gsm8k_bad_rows(tmp_path):
    f = write_parquet(cache(tmp_path, "openai/gsm8k", "main", "test"), {"question": ["a", None], "answer": ["x", "y"]})
    task = build_task(spec("gsm8k", split="test"), tmp_path)
    with pytest.raises(DataError) as e:
        task[perm(2).index(1)]
    assert (e.value.file, e.value.row, e.value.field) == (str(f), 1, "question")
    write_parquet(f, {"question": ["a"], "answer": [42]})
    with pytest.raises(DataError) as e:
        build_task(spec("gsm8k", split="test"), tmp_path)
    assert (e.value.file, e.value.field) == (str(f), "answer")


# ------------------------------------------------------------------------------------------ slicing
@pytest.mark.parametrize("start, stop, step, physical", [
    (0, None, 1, list(range(10))),
    (2, 9, 3, [2, 5, 8]),
    (1, None, 4, [1, 5, 9]),
    (3, 4, 1, [3]),
    (0, 100, 2, [0, 2, 4, 6, 8]),  # stop past the end is capped
    (10, None, 1, []),
    (4, 4, 1, []),
])
def test_slicing(tmp_path, start, stop, step, physical):
    write_parquet(cache(tmp_path, "openai/gsm8k", "main", "train"),
                  {"question": [f"q{i}" for i in range(10)], "answer": [f"a{i}" for i in range(10)]})
    full = build_task(spec("gsm8k", split="train"), tmp_path)
    view = build_task(spec("gsm8k", split="train", start=start, stop=stop, step=step), tmp_path)
    assert len(view) == len(physical)
    assert [view[k] for k in range(len(view))] == [full[p] for p in physical]
    assert [view.locate(k) for k in range(len(view))] == [full.locate(p) for p in physical]
    if physical:
        assert view[np.int64(0)] == full[physical[0]]
    with pytest.raises(IndexError):
        view[len(physical)]


@pytest.mark.parametrize("start, stop, step, field", [(11, None, 1, "start"), (-1, None, 1, "start"),
                                                     (0, None, 0, "step"), (5, 3, 1, "stop")])
def test_bad_slices(tmp_path, start, stop, step, field):
    write_parquet(cache(tmp_path, "openai/gsm8k", "main", "train"), {"question": ["q"] * 10, "answer": ["a"] * 10})
    with pytest.raises(RecipeError) as e:
        build_task(spec("gsm8k", name="g", split="train", start=start, stop=stop, step=step), tmp_path)
    assert e.value.field == f"tasks.g.{field}"


def test_seed_permutation():
    assert seed_permutation(1000).tolist() == np.random.default_rng(42).permutation(1000).tolist()
    assert seed_permutation(0).tolist() == []


# ------------------------------------------------------------------------------------------ CustomJSON
def test_customjson(tmp_path):
    convs = [[msg("user", "who are you?"), msg("assistant", "nanochat")],
             [msg("user", "a"), msg("assistant", "b"), msg("user", "c")],  # may end on a user turn
             [{"role": "user", "content": "x", "extra": 1}, msg("assistant", "y")]]
    path = tmp_path / "identity_conversations.jsonl"
    path.write_text("\n" + json.dumps(convs[0]) + "\n   \n  " + json.dumps(convs[1]) + "  \r\n" + json.dumps(convs[2]))
    task = build_task(spec("customjson"), tmp_path)  # default path, relative to data_dir
    assert len(task) == 3 and task.inputs() == [path]
    assert [task[k] for k in range(3)] == [{"messages": c} for c in convs]  # file order, no shuffle
    assert [task.locate(k) for k in range(3)] == [(str(path), 2), (str(path), 4), (str(path), 5)]
    task[0]["messages"][0]["content"] = "mutated"
    assert task[0]["messages"][0]["content"] == "who are you?"


@pytest.mark.parametrize("line, field, words", [
    ('[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"', None, "not valid JSON"),
    ("[]", "messages", "at least 2"),
    ('[{"role": "user", "content": "a"}]', "messages", "at least 2"),
    ('[{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]', "messages[0].role", "should be"),
    ('[{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]',
     "messages[0].role", "should be"),
    ('[{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]', "messages[1].content", "string"),
    ('[{"role": "user", "content": "a"}, {"content": "b"}]', "messages[1].role", "missing"),
    ('[{"role": "user", "content": "a"}, {"role": "assistant"}]', "messages[1].content", "missing"),
    ('[{"role": "user", "content": "a"}, "assistant: b"]', "messages[1]", "object"),
    ('{"messages": []}', None, "JSON array"),
])
def test_customjson_bad_lines(tmp_path, line, field, words):
    good = json.dumps([msg("user", "q"), msg("assistant", "a")])
    path = tmp_path / "convs.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    task = build_task(spec("customjson", name="ident", path=str(path)), tmp_path)
    assert len(task) == 3 and task[0] == task[2]  # a bad line fails when read: the bad-row policy decides
    with pytest.raises(DataError) as e:
        task[1]
    assert (e.value.file, e.value.row, e.value.field, e.value.task) == (str(path), 3, field, "ident")
    assert words in str(e.value)
    if field is None:
        assert "line 3 (1-based)" in str(e.value)


def test_customjson_missing_file(tmp_path):
    with pytest.raises(SourceMissingError) as e:
        build_task(spec("customjson"), tmp_path)
    text = str(e.value)
    assert str(tmp_path / "identity_conversations.jsonl") in text
    assert f"make fetch-data RECIPE=<recipe> DATA_DIR={tmp_path}" in text


# ------------------------------------------------------------------------------------------ generic chat
def test_chat_parquet_and_jsonl(tmp_path):
    pq_rows = [[msg("user", f"p{i}"), msg("assistant", f"P{i}")] for i in range(4)]
    write_parquet(tmp_path / "mine" / "a.parquet", {"messages": pq_rows, "source": ["x"] * 4})
    js_rows = [[msg("system", "sys"), msg("user", "j0"), msg("assistant", "J0")],
               [msg("user", "j1"), msg("assistant", "J1"), msg("user", "j2"), msg("assistant", "J2")]]
    jl = tmp_path / "mine" / "b.jsonl"
    jl.write_text(json.dumps({"messages": js_rows[0], "id": 7}) + "\n\n" + json.dumps({"messages": js_rows[1]}) + "\n")
    rows = pq_rows + js_rows
    plain = build_task(spec("chat", paths=["mine/a.parquet", "mine/*.jsonl"], shuffle=False), tmp_path)
    assert [plain[k] for k in range(6)] == [{"messages": r} for r in rows]
    assert plain.locate(5) == (str(jl), 3) and plain.locate(1) == (str(tmp_path / "mine" / "a.parquet"), 1)
    assert plain.inputs() == [tmp_path / "mine" / "a.parquet", jl]
    shuffled = build_task(spec("chat", paths="mine/*"), tmp_path)  # sorted glob: a.parquet, b.jsonl
    assert [shuffled[k] for k in range(6)] == [{"messages": rows[p]} for p in perm(6)]


def test_chat_bad_inputs(tmp_path):
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"messages": [msg("user", "a"), msg("assistant", "b")]}) + "\n" +
                  json.dumps({"messages": [msg("user", "a"), msg("user", "b")]}) + "\n")
    task = build_task(spec("chat", name="c", paths="c.jsonl", shuffle=False), tmp_path)
    with pytest.raises(DataError) as e:
        task[1]
    assert (e.value.file, e.value.row, e.value.field) == (str(jl), 2, "messages[1].role")
    jl.write_text(json.dumps({"conversation": []}) + "\n")
    task = build_task(spec("chat", paths="c.jsonl"), tmp_path)
    with pytest.raises(DataError) as e:
        task[0]
    assert (e.value.file, e.value.row, e.value.field) == (str(jl), 1, "messages")
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(RecipeError) as e:
        build_task(spec("chat", name="c", paths="c.csv"), tmp_path)
    assert e.value.field == "tasks.c.params.paths"
    with pytest.raises(SourceMissingError, match="nothing"):
        build_task(spec("chat", paths="nothing*.jsonl"), tmp_path)


# ------------------------------------------------------------------------------------------ params, sources
@pytest.mark.parametrize("kind, params, field", [
    ("smoltalk", {}, "tasks.t.params.split"),
    ("smoltalk", {"split": 3}, "tasks.t.params.split"),
    ("smoltalk", {"split": "train", "shuffle": True}, "tasks.t.params.shuffle"),
    ("mmlu", {"split": "test", "paths": [1]}, "tasks.t.params.paths"),
    ("gsm8k", {"split": "train", "subset": None}, "tasks.t.params.subset"),
    ("customjson", {"path": ["a", "b"]}, "tasks.t.params.path"),
    ("simplespelling", {"size": True}, "tasks.t.params.size"),
    ("spellingbee", {"size": -1}, "tasks.t.params.size"),
    ("chat", {}, "tasks.t.params.paths"),
    ("chat", {"paths": []}, "tasks.t.params.paths"),
    ("chat", {"paths": "x.jsonl", "shuffle": "yes"}, "tasks.t.params.shuffle"),
    ("arc", {}, "tasks.t.kind"),
])
def test_bad_params(tmp_path, kind, params, field):
    with pytest.raises(RecipeError) as e:
        build_task(spec(kind, **params), tmp_path)
    assert e.value.field == field


def test_source_missing_message(tmp_path):
    with pytest.raises(SourceMissingError) as e:
        build_task(spec("mmlu", split="auxiliary_train"), tmp_path)
    text = str(e.value)
    folder = tmp_path / "task_data" / "cais--mmlu" / "all" / "auxiliary_train"
    assert "cais/mmlu" in text and str(folder) in text and "00000.parquet" in text
    assert f"make fetch-data RECIPE=<recipe> DATA_DIR={tmp_path}" in text  # prepare fills in the recipe
    with pytest.raises(SourceMissingError) as e:
        find_source_files(tmp_path, "openai/gsm8k", "main", "train", paths=["gsm/*.parquet"])
    assert "openai/gsm8k" in str(e.value) and "gsm/*.parquet" in str(e.value)


# ------------------------------------------------------------------------------------------ real data
def test_real_gsm8k():
    if not (SHARED / "task_data" / "openai--gsm8k").is_dir():
        pytest.skip("../shared/data is absent")
    task = build_task(spec("gsm8k", split="train"), SHARED)
    assert len(task) == 7473
    raw = pl.read_parquet(SHARED / "task_data/openai--gsm8k/main/train/00000.parquet")
    row = raw.row(perm(7473)[0], named=True)
    conv = task[0]
    assert conv["messages"][0] == {"role": "user", "content": row["question"]}
    parts = conv["messages"][1]["content"]
    rebuilt = ""
    for part in parts:  # text verbatim; python + python_output pairs are the <<expr=result>> calls
        if part["type"] == "text":
            rebuilt += part["text"]
        elif part["type"] == "python":
            rebuilt += "<<" + part["text"] + "="
        else:
            rebuilt += part["text"] + ">>"
    assert rebuilt == row["answer"]
    assert parts[-1]["type"] == "text" and parts[-1]["text"].endswith("#### " + row["answer"].split("#### ")[-1])
    n_calls = sum(a.count("<<") for a in raw["answer"].to_list())
    assert sum(sum(p["type"] == "python" for p in task[k]["messages"][1]["content"]) for k in range(7473)) == n_calls
    val = build_task(spec("gsm8k", split="test", stop=420), SHARED)
    assert len(val) == 420


def test_real_identity():
    path = SHARED / "identity_conversations.jsonl"
    if not path.is_file():
        pytest.skip("../shared/data is absent")
    task = build_task(spec("customjson", path=str(path)), SHARED)
    assert len(task) == 1000
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert [task[k] for k in range(1000)] == [{"messages": m} for m in lines]
