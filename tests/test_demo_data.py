"""The demo sources: exact source schemas, determinism, and content that is right where it can be checked.

Files are read back with pyarrow/json directly (not through pipeline.tasks), and every correctness check
recomputes the answer here with its own parser, independent of the generator's code.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.demo_data import (DEFAULT_SIZES, DEMO_SOURCES_VERSION, RECORD_NAME, demo_tokenizer_texts,
                                write_demo_sources)
from pipeline.errors import DataError, SourceMissingError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

SMOL = "task_data/HuggingFaceTB--smol-smoltalk/default/{split}/00000.parquet"
MMLU = "task_data/cais--mmlu/all/{split}/00000.parquet"
GSM = "task_data/openai--gsm8k/main/{split}/00000.parquet"
IDENTITY = "identity_conversations.jsonl"

MESSAGES = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
SCHEMAS = {
    SMOL: [("messages", MESSAGES)],
    MMLU: [("question", pa.string()), ("subject", pa.string()), ("choices", pa.list_(pa.string())),
           ("answer", pa.int64())],
    GSM: [("question", pa.string()), ("answer", pa.string())],
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The default-size demo sources, written once for the module."""
    d = tmp_path_factory.mktemp("demo")
    write_demo_sources(d, seed=0)
    return d


def rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def all_files(d: Path) -> dict[str, bytes]:
    """The demo files under d (the writer's own record apart)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()
            and p.name != RECORD_NAME}


# ---------------------------------------------------------------------------------------------------------
# layout, schemas, sizes


def test_layout_schemas_and_row_counts(demo):
    expected = {
        SMOL.format(split="train"): DEFAULT_SIZES["smoltalk_train"],
        SMOL.format(split="test"): DEFAULT_SIZES["smoltalk_test"],
        MMLU.format(split="auxiliary_train"): DEFAULT_SIZES["mmlu_auxiliary_train"],
        MMLU.format(split="test"): DEFAULT_SIZES["mmlu_test"],
        GSM.format(split="train"): DEFAULT_SIZES["gsm8k_train"],
        GSM.format(split="test"): DEFAULT_SIZES["gsm8k_test"],
    }
    assert DEFAULT_SIZES["smoltalk_train"] >= 1000 and DEFAULT_SIZES["identity"] >= 50
    for rel, n in expected.items():
        f = pq.ParquetFile(demo / rel)
        assert f.metadata.num_rows == n, rel
        template = next(t for t in SCHEMAS if t.split("{")[0] in rel)
        got = [(field.name, field.type) for field in f.schema_arrow]
        assert got == SCHEMAS[template], rel
    lines = (demo / IDENTITY).read_text(encoding="utf-8").splitlines()
    assert len(lines) == DEFAULT_SIZES["identity"]
    # nothing else is written (no temp files left behind) but the writer's record of what it wrote
    assert sorted(all_files(demo)) == sorted([*expected, IDENTITY])
    assert sorted(str(p.relative_to(demo)) for p in demo.rglob("*") if p.is_file()) == sorted(
        [*expected, IDENTITY, RECORD_NAME])
    record = json.loads((demo / RECORD_NAME).read_text())["files"]
    assert record == {rel: [hashlib.sha256(data).hexdigest()] for rel, data in all_files(demo).items()}


def test_returned_paths_and_custom_sizes(tmp_path):
    sizes = {"smoltalk_train": 7, "smoltalk_test": 0, "mmlu_auxiliary_train": 5, "mmlu_test": 3,
             "gsm8k_train": 4, "gsm8k_test": 2, "identity": 6}
    paths = write_demo_sources(tmp_path, seed=3, sizes=sizes)
    assert all(p.is_file() and p.is_relative_to(tmp_path) for p in paths)
    assert len(paths) == 7 and len(set(paths)) == 7
    counts = {str(p.relative_to(tmp_path)): (pq.ParquetFile(p).metadata.num_rows if p.suffix == ".parquet"
                                             else len(p.read_text().splitlines())) for p in paths}
    assert counts == {SMOL.format(split="train"): 7, SMOL.format(split="test"): 0,
                      MMLU.format(split="auxiliary_train"): 5, MMLU.format(split="test"): 3,
                      GSM.format(split="train"): 4, GSM.format(split="test"): 2, IDENTITY: 6}
    # an empty split still has the full schema
    assert [f.name for f in pq.read_schema(tmp_path / SMOL.format(split="test"))] == ["messages"]


@pytest.mark.parametrize("sizes, field", [({"smoltalk": 5}, "sizes.smoltalk"),
                                          ({"gsm8k_train": -1}, "sizes.gsm8k_train"),
                                          ({"identity": 2.5}, "sizes.identity")])
def test_bad_sizes_name_the_field(tmp_path, sizes, field):
    with pytest.raises(DataError) as e:
        write_demo_sources(tmp_path, sizes=sizes)
    assert e.value.field == field
    assert not any(tmp_path.iterdir())


def test_schemas_match_the_real_exports():
    """Our GSM8K files read like the real parquet; the identity lines have the real file's shape."""
    real = SHARED_DATA / GSM.format(split="train")
    if not real.is_file():
        pytest.skip("no ../shared/data")
    assert [(f.name, f.type) for f in pq.read_schema(real)] == SCHEMAS[GSM]
    with open(SHARED_DATA / IDENTITY, encoding="utf-8") as f:
        first = json.loads(f.readline())
    assert isinstance(first, list) and [list(m) for m in first[:2]] == [["role", "content"]] * 2


# ---------------------------------------------------------------------------------------------------------
# determinism and idempotent writes


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    sizes = {"smoltalk_train": 50, "mmlu_auxiliary_train": 50, "gsm8k_train": 50, "identity": 20}
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_demo_sources(a, seed=5, sizes=sizes)
    write_demo_sources(b, seed=5, sizes=sizes)
    write_demo_sources(c, seed=6, sizes=sizes)
    fa, fb, fc = all_files(a), all_files(b), all_files(c)
    assert fa == fb
    assert fa.keys() == fc.keys()
    assert all(fa[k] != fc[k] for k in fa)
    # train and test are independent streams, not one the prefix of the other
    assert rows(a / GSM.format(split="test"))[0] != rows(a / GSM.format(split="train"))[0]


def test_one_size_does_not_change_the_other_files(tmp_path):
    write_demo_sources(tmp_path / "a", sizes={"smoltalk_train": 20})
    write_demo_sources(tmp_path / "b", sizes={"smoltalk_train": 30})
    fa, fb = all_files(tmp_path / "a"), all_files(tmp_path / "b")
    changed = {k for k in fa if fa[k] != fb[k]}
    assert changed == {SMOL.format(split="train")}
    # a prefix: the first rows are the same conversations
    assert rows(tmp_path / "b" / SMOL.format(split="train"))[:20] == rows(tmp_path / "a" / SMOL.format(split="train"))


def test_rerun_keeps_identical_files_and_replaces_only_its_own(tmp_path):
    sizes = {"smoltalk_train": 10, "identity": 5}
    paths = write_demo_sources(tmp_path, sizes=sizes)
    old = 1_000_000_000
    for p in paths:
        os.utime(p, (old, old))
    write_demo_sources(tmp_path, sizes=sizes)
    assert all(p.stat().st_mtime == old for p in paths)  # identical files are not rewritten
    # other sizes: the files it wrote itself are replaced, the rest left alone
    write_demo_sources(tmp_path, sizes={**sizes, "smoltalk_train": 12})
    smol = tmp_path / SMOL.format(split="train")
    assert pq.ParquetFile(smol).metadata.num_rows == 12 and smol.stat().st_mtime != old
    assert all(p.stat().st_mtime == old for p in paths if p != smol)
    write_demo_sources(tmp_path, sizes=sizes)  # and back
    assert pq.ParquetFile(smol).metadata.num_rows == 10


@pytest.mark.parametrize("how", ["edited", "foreign"])
def test_a_file_it_did_not_write_is_never_replaced(tmp_path, how):
    """An edited demo file, or a user's file at a demo path with no record of it: refused, nothing written."""
    sizes = {"smoltalk_train": 10, "identity": 5}
    gsm = tmp_path / GSM.format(split="test")
    if how == "edited":
        write_demo_sources(tmp_path, sizes=sizes)
    else:
        gsm.parent.mkdir(parents=True)
    gsm.write_bytes(b"a user's real GSM8K test split")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(DataError) as e:
        write_demo_sources(tmp_path, sizes=sizes)
    assert e.value.file == str(gsm) and "not written by the demo writer" in str(e.value)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written


def test_version_is_an_int():
    assert isinstance(DEMO_SOURCES_VERSION, int) and DEMO_SOURCES_VERSION >= 1


# ---------------------------------------------------------------------------------------------------------
# GSM8K: calculator annotations are correct and the final answer is the last computation

_BIN = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}


def safe_eval(expr: str) -> float:
    def ev(n):
        if isinstance(n, ast.BinOp) and type(n.op) in _BIN:
            return _BIN[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.Constant) and type(n.value) in (int, float):
            return n.value
        raise ValueError(f"not arithmetic: {expr!r}")
    return ev(ast.parse(expr, mode="eval").body)


@pytest.mark.parametrize("split", ["train", "test"])
def test_gsm8k_annotations_evaluate_and_final_answer_matches(demo, split):
    data = rows(demo / GSM.format(split=split))
    steps = 0
    for i, row in enumerate(data):
        answer = row["answer"]
        assert row["question"].strip().endswith("?"), i
        calls = re.findall(r"<<([^>]+)>>", answer)
        assert len(calls) >= 2, i  # multi-step
        for inner in calls:
            expr, result = inner.rsplit("=", 1)
            assert safe_eval(expr) == pytest.approx(float(result), abs=1e-9), (i, inner)
            steps += 1
        # like real GSM8K: the result is repeated as text right after the annotation
        for m in re.finditer(r"<<[^>]+=([^>=]+)>>", answer):
            assert answer[m.end():].startswith(m.group(1)), (i, m.group(0))
        last_line = answer.splitlines()[-1]
        final = re.fullmatch(r"#### (\-?[0-9\.\,]+)", last_line)
        assert final, (i, last_line)
        assert final.group(1) == calls[-1].rsplit("=", 1)[1], i
    assert steps >= 2 * len(data)
    assert len({r["question"] for r in data}) > 0.9 * len(data)


def test_gsm8k_checker_accepts_real_data():
    """The checker above is not vacuous: it parses real GSM8K annotations (those that are plain arithmetic)."""
    real = SHARED_DATA / GSM.format(split="test")
    if not real.is_file():
        pytest.skip("no ../shared/data")
    ok = 0
    for row in rows(real)[:200]:
        for inner in re.findall(r"<<([^>]+)>>", row["answer"]):
            expr, result = inner.rsplit("=", 1)
            try:
                ok += safe_eval(expr) == pytest.approx(float(result), rel=1e-3, abs=1e-2)
            except (ValueError, SyntaxError, ZeroDivisionError):
                pass
    assert ok > 300


# ---------------------------------------------------------------------------------------------------------
# MMLU: 4 distinct choices, answer index in range, and correct wherever this test can recompute it

UNITS = {("meters", "centimeters"): 100, ("kilometers", "meters"): 1000, ("hours", "minutes"): 60,
         ("minutes", "seconds"): 60, ("days", "hours"): 24, ("kilograms", "grams"): 1000,
         ("liters", "milliliters"): 1000, ("feet", "inches"): 12, ("yards", "feet"): 3, ("weeks", "days"): 7}


def is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def expected_choice(question: str, choices: list[str]) -> str | None:
    """The right choice recomputed from the question, or None for questions this test cannot judge."""
    if m := re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", question):
        return str(int(safe_eval(f"{m[1]}{m[2]}{m[3]}")))
    if m := re.fullmatch(r"How many times does the letter '(\w)' appear in the word '(\w+)'\?", question):
        return str(m[2].count(m[1]))
    if m := re.fullmatch(r"How many (\w+) are in ([\d.]+) (\w+)\?", question):
        value = float(m[2]) * UNITS[(m[3], m[1])]
        return next(c for c in choices if float(c) == value)
    if m := re.fullmatch(r"Which of the following numbers is the (largest|smallest)\?", question):
        return str((max if m[1] == "largest" else min)(int(c) for c in choices))
    if question == "Which of the following numbers is prime?":
        primes = [c for c in choices if is_prime(int(c))]
        assert len(primes) == 1, choices
        return primes[0]
    if question == "Which of the following words comes first in alphabetical order?":
        return min(choices)
    return None


@pytest.mark.parametrize("split", ["auxiliary_train", "test"])
def test_mmlu_answers_are_correct(demo, split):
    data = rows(demo / MMLU.format(split=split))
    checked = 0
    for i, row in enumerate(data):
        choices, answer = row["choices"], row["answer"]
        assert len(choices) == 4 and len(set(choices)) == 4, i
        assert all(isinstance(c, str) and c for c in choices), i
        assert 0 <= answer <= 3, i
        assert row["subject"] and row["question"].endswith("?"), i
        want = expected_choice(row["question"], choices)
        if want is not None:
            assert choices[answer] == want, (i, row)
            checked += 1
    assert checked > 0.5 * len(data)
    positions = [r["answer"] for r in data]
    assert min(positions.count(k) for k in range(4)) > len(data) // 10  # the correct letter moves around


# ---------------------------------------------------------------------------------------------------------
# SmolTalk: alternating roles, system message only first, varied lengths with some long ones


@pytest.mark.parametrize("split", ["train", "test"])
def test_smoltalk_structure(demo, split):
    data = rows(demo / SMOL.format(split=split))
    with_system = 0
    lengths = []
    for i, row in enumerate(data):
        msgs = row["messages"]
        if msgs[0]["role"] == "system":
            with_system += 1
            msgs = msgs[1:]
        assert 2 <= len(msgs) <= 8 and len(msgs) % 2 == 0, i
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2), i
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in msgs), i
        lengths.append(max(len(m["content"]) for m in msgs))
    assert 0.05 * len(data) < with_system < 0.5 * len(data)
    assert sum(n >= 3000 for n in lengths) >= 3  # exceed 512 tokens: truncation paths run
    assert sum(n < 200 for n in lengths) > 0.03 * len(data)  # and short ones
    assert len({json.dumps(r["messages"]) for r in data}) > 0.98 * len(data)


def test_smoltalk_has_non_ascii_text(demo):
    text = "".join(m["content"] for r in rows(demo / SMOL.format(split="train")) for m in r["messages"])
    assert any(ord(ch) > 127 for ch in text)


# ---------------------------------------------------------------------------------------------------------
# identity conversations


def test_identity_lines_parse_and_alternate(demo):
    lines = (demo / IDENTITY).read_text(encoding="utf-8").splitlines()
    convs = [json.loads(line) for line in lines]
    for i, conv in enumerate(convs):
        assert isinstance(conv, list) and len(conv) >= 2 and len(conv) % 2 == 0, i
        assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in conv), i
        assert [m["role"] for m in conv] == ["user", "assistant"] * (len(conv) // 2), i
    assert len(set(lines)) > 0.8 * len(lines)
    assert any("nanosft" in m["content"] for c in convs for m in c)


# ---------------------------------------------------------------------------------------------------------
# tokenizer texts


def test_tokenizer_texts_cover_every_string_in_order(demo):
    texts = list(demo_tokenizer_texts(demo))
    assert texts == list(demo_tokenizer_texts(demo))
    assert all(isinstance(t, str) for t in texts)
    expected = []
    for split in ("train", "test"):
        expected += [m["content"] for r in rows(demo / SMOL.format(split=split)) for m in r["messages"]]
    for split in ("auxiliary_train", "test"):
        for r in rows(demo / MMLU.format(split=split)):
            expected += [r["question"], *r["choices"]]
    for split in ("train", "test"):
        for r in rows(demo / GSM.format(split=split)):
            expected += [r["question"], r["answer"]]
    for line in (demo / IDENTITY).read_text(encoding="utf-8").splitlines():
        expected += [m["content"] for m in json.loads(line)]
    assert texts == expected


def test_tokenizer_texts_without_sources_is_a_clear_error(tmp_path):
    with pytest.raises(SourceMissingError) as e:
        next(demo_tokenizer_texts(tmp_path))
    assert "write_demo_sources" in str(e.value) and str(tmp_path) in str(e.value)
