"""pipeline.fetch against a fake Hub on 127.0.0.1 (tests/fakehub.py): no test touches the network.

Each fetch runs as a subprocess, as a user runs it, with HF_ENDPOINT pointing at the fake Hub and HF_HOME in a
temporary folder (huggingface_hub reads both when it is imported).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("huggingface_hub", reason="huggingface_hub is not installed")

from pipeline.fetch import STAGING, local_names, plan_fetch  # noqa: E402
from pipeline.prepare import main as prepare_main, prepare  # noqa: E402
from pipeline.recipe import load_recipe, resolve_recipe_path  # noqa: E402
from pipeline.tasks.source import find_source_files, fetch_record_path  # noqa: E402
from pipeline.errors import SourceMissingError  # noqa: E402
from pipeline.tokenizer import save_tokenizer  # noqa: E402
from tests.fakehub import FakeHub  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def gsm8k(lo: int, hi: int) -> bytes:
    return parquet(pa.table({"question": [f"How much is {i} + {i}?" for i in range(lo, hi)],
                             "answer": [f"It is <<{i}+{i}={2 * i}>>{2 * i}.\n#### {2 * i}" for i in range(lo, hi)]}))


def smoltalk(lo: int, hi: int) -> bytes:
    return parquet(pa.table({"messages": [[{"role": "user", "content": f"hello {i}"},
                                            {"role": "assistant", "content": f"hi there, number {i}"}]
                                           for i in range(lo, hi)]}))


def mmlu(lo: int, hi: int) -> bytes:
    return parquet(pa.table({"question": [f"Which is {i}?" for i in range(lo, hi)],
                             "choices": [[str(i), str(i + 1), str(i + 2), str(i + 3)] for i in range(lo, hi)],
                             "answer": [i % 4 for i in range(lo, hi)], "subject": ["maths"] * (hi - lo)}))


def arc(lo: int, hi: int) -> bytes:
    return parquet(pa.table({"question": [f"Pick {i}" for i in range(lo, hi)],
                             "choices": [{"text": [str(i), "x"], "label": ["A", "B"]} for i in range(lo, hi)],
                             "answerKey": ["A"] * (hi - lo)}))


DATASETS = {
    # two shards, and a partial conversion (`partial-train`), as the export has them for big splits
    "HuggingFaceTB/smol-smoltalk": {"default/partial-train/0000.parquet": smoltalk(0, 30),
                                    "default/partial-train/0001.parquet": smoltalk(30, 50),
                                    "default/test/0000.parquet": smoltalk(100, 110)},
    "cais/mmlu": {"all/auxiliary_train/0000.parquet": mmlu(0, 20), "all/test/0000.parquet": mmlu(100, 112)},
    "openai/gsm8k": {"main/train/0000.parquet": gsm8k(0, 25), "main/train/0001.parquet": gsm8k(25, 40),
                     "main/test/0000.parquet": gsm8k(100, 115)},
    "allenai/ai2_arc": {"ARC-Easy/test/0000.parquet": arc(0, 8), "ARC-Challenge/test/0000.parquet": arc(10, 15)},
}
IDENTITY = "".join(json.dumps([{"role": "user", "content": f"who are you {i}?"},
                               {"role": "assistant", "content": "I am nanochat."}]) + "\n" for i in range(6)).encode()
WORDS = b"apple\nbanana\ncherry\n"
FILES = {"identity_conversations.jsonl": IDENTITY, "words_alpha.txt": WORDS}

RECIPE = """
name = "fetchtest"
max_seq_len = 256
rows_per_shard = 64

[tokenizer]
source = "file"
path = "tokenizer/tokenizer.pkl"

[packing]
method = "bestfit"
window = 64

[[train]]
kind = "smoltalk"
params = { split = "train" }

[[train]]
kind = "customjson"
name = "identity"
params = { path = "identity_conversations.jsonl" }

[[train]]
kind = "mmlu"
params = { split = "auxiliary_train" }

[[train]]
kind = "gsm8k"
params = { split = "train" }

[[val]]
kind = "smoltalk"
params = { split = "test" }

[[val]]
kind = "gsm8k"
params = { split = "test" }
"""
SPLITS = ["HuggingFaceTB--smol-smoltalk/default/train", "HuggingFaceTB--smol-smoltalk/default/test",
          "cais--mmlu/all/auxiliary_train", "openai--gsm8k/main/train", "openai--gsm8k/main/test"]


@pytest.fixture
def hub():
    with FakeHub({k: dict(v) for k, v in DATASETS.items()}, dict(FILES)) as h:
        yield h


@pytest.fixture
def setup(tmp_path, tiny_tokenizer):
    """(recipe path, data dir holding only the tokenizer)."""
    recipe = tmp_path / "fetchtest.toml"
    recipe.write_text(RECIPE)
    data = tmp_path / "data"
    save_tokenizer(tiny_tokenizer, data / "tokenizer" / "tokenizer.pkl")
    return recipe, data


def env_for(url: str, tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HF_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(HF_ENDPOINT=url, HF_HOME=str(tmp / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1",
               NO_PROXY="127.0.0.1,localhost", NANOSFT_IDENTITY_URL=f"{url}/files/identity_conversations.jsonl",
               NANOSFT_WORDS_URL=f"{url}/files/words_alpha.txt",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    env.update(extra)
    return env


def fetch_cmd(recipe: Path | str, data: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.fetch", "--recipe", str(recipe), "--data-dir", str(data), *args]


def run_fetch(url: str, recipe: Path | str, data: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(fetch_cmd(recipe, data, *args), env=env_for(url, data.parent, **env), cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def downloads(hub: FakeHub) -> list[str]:
    return [p for m, p, _ in hub.requests if m == "GET" and ("/resolve/" in p or p.startswith("/files/"))]


# --- pure parts ---

def test_export_files_map_to_nanochat_names_by_number():
    got = local_names(["c/s/0010.parquet", "c/s/0002.parquet", "c/s/9.parquet", "c/s/0000.parquet", "c/s/x.parquet"])
    assert got == [("c/s/0000.parquet", "00000.parquet"), ("c/s/0002.parquet", "00001.parquet"),
                   ("c/s/9.parquet", "00002.parquet"), ("c/s/0010.parquet", "00003.parquet"),
                   ("c/s/x.parquet", "00004.parquet")]


def test_plan_of_the_nanochat_mixture(tmp_path):
    recipe = load_recipe(resolve_recipe_path("nanochat-sft"))
    plan = plan_fetch(recipe, tmp_path, eval_sets=True, words=True)
    assert [str(s) for s in plan.splits] == [
        "HuggingFaceTB/smol-smoltalk default/train", "cais/mmlu all/auxiliary_train", "openai/gsm8k main/train",
        "HuggingFaceTB/smol-smoltalk default/test", "cais/mmlu all/test", "openai/gsm8k main/test",
        "allenai/ai2_arc ARC-Easy/test", "allenai/ai2_arc ARC-Challenge/test"]
    assert [f.name for f in plan.files] == ["identity_conversations.jsonl", "words_alpha.txt"]
    assert any("tokenizer.pkl" in n for n in plan.notes)  # what fetch cannot get is said
    demo = plan_fetch(load_recipe(resolve_recipe_path("demo")), tmp_path)
    assert not demo.splits and not demo.files  # the demo generates its own sources


# --- against the fake Hub ---

def test_fetch_then_prepare_then_rerun_fetches_nothing(hub, setup):
    recipe, data = setup
    proc = run_fetch(hub.url, recipe, data, "--eval", "--words")
    assert proc.returncode == 0, proc.stderr
    task_data = data / "task_data"
    for split in SPLITS:
        folder = task_data / split
        record = json.loads(fetch_record_path(data, f"task_data/{split}").read_text())
        names = [e["name"] for e in record["files"]]
        assert (folder / "manifest.json").read_text() == json.dumps(names)  # nanochat's manifest, byte for byte
        assert sorted(p.name for p in folder.glob("*.parquet")) == names
        assert record["complete"] and record["commit"] == hub.commit and record["revision"] == "refs/convert/parquet"
        exported = DATASETS[record["repo"]]
        for e in record["files"]:
            assert (folder / e["name"]).read_bytes() == exported[e["export_path"]]
            assert e["sha256"] == sha256(exported[e["export_path"]]) and e["size"] == len(exported[e["export_path"]])
        assert not (folder / STAGING).exists()
    smol = json.loads(fetch_record_path(data, "task_data/HuggingFaceTB--smol-smoltalk/default/train").read_text())
    assert smol["export_dir"] == "default/partial-train"
    assert [(e["export_path"], e["name"]) for e in smol["files"]] == [
        ("default/partial-train/0000.parquet", "00000.parquet"),
        ("default/partial-train/0001.parquet", "00001.parquet")]
    for arc_split in ("ARC-Easy", "ARC-Challenge"):
        assert (task_data / "allenai--ai2_arc" / arc_split / "test" / "00000.parquet").is_file()
    assert (data / "words_alpha.txt").read_bytes() == WORDS
    assert (data / "identity_conversations.jsonl").read_bytes() == IDENTITY

    # the split's rows, read as the tasks read them, are the export's rows in order
    files = find_source_files(data, "openai/gsm8k", "main", "train")
    questions = [q for f in files for q in pq.read_table(f).column("question").to_pylist()]
    assert questions == [f"How much is {i} + {i}?" for i in range(40)]

    snapshot = prepare(recipe, data, workers=1)
    assert (snapshot / "manifest.json").is_file()

    before = tree(data)
    hub.requests.clear()
    again = run_fetch(hub.url, recipe, data, "--eval", "--words")
    assert again.returncode == 0, again.stderr
    assert hub.requests == []  # everything verified locally: not one request
    assert again.stdout.count("up to date") == len(SPLITS) + 3 + 2  # + ARC x2, MMLU test; identity, words
    assert tree(data) == before


def test_a_deleted_file_is_fetched_again_and_a_changed_one_is_left(hub, setup):
    recipe, data = setup
    assert run_fetch(hub.url, recipe, data).returncode == 0
    folder = data / "task_data" / "openai--gsm8k" / "main" / "train"
    (folder / "00001.parquet").unlink()
    hub.requests.clear()
    proc = run_fetch(hub.url, recipe, data)
    assert proc.returncode == 0, proc.stderr
    assert downloads(hub) == [f"/datasets/openai/gsm8k/resolve/{hub.commit}/main/train/0001.parquet"]
    assert (folder / "00001.parquet").read_bytes() == DATASETS["openai/gsm8k"]["main/train/0001.parquet"]

    changed = folder / "00000.parquet"
    changed.write_bytes(changed.read_bytes() + b"edited")
    edited = changed.read_bytes()
    proc = run_fetch(hub.url, recipe, data)
    assert proc.returncode == 2
    assert len(error_lines(proc)) == 1 and "changed since fetch wrote it" in error_lines(proc)[0]
    assert changed.read_bytes() == edited


def test_dropped_connection_is_retried_in_the_same_run(hub, setup):
    recipe, data = setup
    path = "main/train/0000.parquet"
    hub.drop_after[path] = 300
    proc = run_fetch(hub.url, recipe, data)
    assert proc.returncode == 0, proc.stderr
    # huggingface_hub retries at once, asking for the rest with a Range header when it had written some of the file
    # already (here the 300 bytes were still in its 10 MB read buffer, so it asks from the start)
    gets = [p for m, p, _ in hub.requests if m == "GET" and p.endswith("/main/train/0000.parquet")]
    assert len(gets) == 2 and "resume" in proc.stderr
    got = data / "task_data" / "openai--gsm8k" / "main" / "train" / "00000.parquet"
    assert sha256(got.read_bytes()) == sha256(DATASETS["openai/gsm8k"][path])


def test_killed_download_then_rerun(hub, setup):
    recipe, data = setup
    hub.stall_after["main/train/0001.parquet"] = 200
    p = subprocess.Popen(fetch_cmd(recipe, data), env=env_for(hub.url, data.parent), cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert hub.stalled.wait(60), "the download never reached the stall"
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
    folder = data / "task_data" / "openai--gsm8k" / "main" / "train"
    assert (folder / STAGING).exists()  # killed mid-file: its partial download is still there
    assert not (folder / "manifest.json").exists() and not (folder / "00001.parquet").exists()
    with pytest.raises(SourceMissingError, match="not finished.*make fetch-data"):
        find_source_files(data, "openai/gsm8k", "main", "train")  # prepare does not read half a split
    hub.release.set()

    proc = run_fetch(hub.url, recipe, data)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(fetch_record_path(data, "task_data/openai--gsm8k/main/train").read_text())
    for e in record["files"]:
        assert sha256((folder / e["name"]).read_bytes()) == e["sha256"] == sha256(
            DATASETS["openai/gsm8k"][e["export_path"]])
    leftovers = [p for p in data.rglob("*") if STAGING in p.parts or p.name.endswith((".incomplete", ".tmp"))]
    assert leftovers == []


def test_a_users_files_are_left_untouched_and_reported(hub, setup):
    recipe, data = setup
    folder = data / "task_data" / "openai--gsm8k" / "main" / "train"
    folder.mkdir(parents=True)
    (folder / "00000.parquet").write_bytes(gsm8k(500, 510))  # e.g. downloaded by nanochat itself
    (folder / "manifest.json").write_text(json.dumps(["00000.parquet"]))
    (data / "identity_conversations.jsonl").write_bytes(b'[{"role": "user", "content": "mine"}]\n')
    before = {p: p.read_bytes() for p in [*folder.iterdir(), data / "identity_conversations.jsonl"]}
    mtimes = {p: p.stat().st_mtime_ns for p in before}
    proc = run_fetch(hub.url, recipe, data)
    assert proc.returncode == 0, proc.stderr
    assert {p: p.read_bytes() for p in before} == before
    assert {p: p.stat().st_mtime_ns for p in before} == mtimes
    assert sorted(p.name for p in folder.iterdir()) == ["00000.parquet", "manifest.json"]  # nothing added there
    kept = [line for line in proc.stdout.splitlines() if line.startswith("kept")]
    assert len(kept) == 2 and str(folder) in kept[0] and "identity_conversations.jsonl" in kept[1]
    assert (data / "task_data" / "openai--gsm8k" / "main" / "test" / "00000.parquet").is_file()  # the rest: fetched


@pytest.mark.parametrize("case", ["missing repo", "HTTP 500", "HTTP 401 on a file", "connection refused", "offline"])
def test_refusals_give_one_line_and_leave_nothing(hub, setup, case):
    recipe, data = setup
    url, env = hub.url, {}
    if case == "missing repo":
        del hub.datasets["HuggingFaceTB/smol-smoltalk"]
    elif case == "HTTP 500":
        hub.status["/api/datasets/HuggingFaceTB/smol-smoltalk/revision"] = 500
    elif case == "HTTP 401 on a file":
        hub.status["/datasets/HuggingFaceTB/smol-smoltalk/resolve"] = 401
    elif case == "connection refused":
        url = "http://127.0.0.1:9"
    else:
        env = {"HF_HUB_OFFLINE": "1"}
    before = tree(data)
    proc = run_fetch(url, recipe, data, **env)
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr
    expect = {"missing repo": "not found at", "HTTP 500": "refused (HTTP 500)", "HTTP 401 on a file": "HF_TOKEN",
              "connection refused": "cannot reach the Hub", "offline": "HF_HUB_OFFLINE"}[case]
    assert expect in lines[0]
    assert tree(data) == before and sorted(p.relative_to(data) for p in data.rglob("*")) == [
        Path("tokenizer"), Path("tokenizer/tokenizer.pkl")]


def test_words_list(hub, tmp_path):
    data = tmp_path / "data"
    proc = run_fetch(hub.url, "demo", data, "--words")
    assert proc.returncode == 0, proc.stderr
    assert (data / "words_alpha.txt").read_bytes() == WORDS and not (data / "task_data").exists()
    hub.status["/files/"] = 404
    proc = run_fetch(hub.url, "demo", data, "--words")  # already there: no download
    assert proc.returncode == 0 and "up to date" in proc.stdout
    (data / "words_alpha.txt").unlink()
    proc = run_fetch(hub.url, "demo", data, "--words")
    assert proc.returncode == 2 and "HTTP 404" in error_lines(proc)[0]
    assert sorted(p.name for p in data.iterdir()) == ["nanosft"]  # no temporary file left


def test_prepare_names_the_fetch_command(setup, capsys):
    recipe, data = setup
    (data / "identity_conversations.jsonl").write_bytes(IDENTITY)
    assert prepare_main(["--recipe", str(recipe), "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"make fetch-data RECIPE={recipe} DATA_DIR={data}" in err


def test_the_readme_set_up_for_the_real_mixture(hub, setup):
    """`make fetch-data prepare-data RECIPE=nanochat-sft DATA_DIR=D`: the fetch with the real recipe, then prepare
    on a copy of it with small spelling tasks (the copy keeps its lock file out of data_manifests/)."""
    _, data = setup
    proc = run_fetch(hub.url, "nanochat-sft", data)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("fetched") == 7 and "tokenizer" not in proc.stderr  # 6 splits + identity
    text = resolve_recipe_path("nanochat-sft").read_text()
    small = text.replace("size = 200000", "size = 200").replace("size = 80000", "size = 80")
    assert small != text
    copy = data.parent / "nanochat-sft.toml"
    copy.write_text(small)
    assert (prepare(copy, data, workers=1) / "manifest.json").is_file()
