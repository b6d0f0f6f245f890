"""`bestfit-seed` + `overlong = "nanochat"` against a literal transcription of upstream's SFT loader.

The reference below is nanochat's `sft_data_generator_bos_bestfit` at world size 1 written out from
nanochat-reference §2.2 and §4 (list buffer of 100, linear scan, pop), with upstream's crop fix 68894d6:
`render_conversation` cuts every conversation at its `max_tokens=2048` default whatever the row size, the
refill then crops it to the row capacity, and nothing is dropped. Variant A (moe3/master) masks the targets
with the render mask; variant B (the original seed loader) supervises every real token. Padding targets
are masked from `max(content_len - 1, 0)` on. Snapshots are compared row by row (tokens, targets, which
conversations) against it at 2048 and 512, under both mask policies, on conversations longer than 2048
tokens and on conversations left with no supervised target once cut (kept by upstream).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.manifest import load_manifest, shard_paths, verify_snapshot
from pipeline.mixture import mixture_order
from pipeline.prepare import prepare
from pipeline.recipe import load_recipe
from pipeline.render import render_conversation
from pipeline.shard_format import SplitReader
from pipeline.tasks import build_task
from pipeline.tokenizer import save_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GSM8K_TRAIN = SHARED / "task_data" / "openai--gsm8k" / "main" / "train" / "00000.parquet"
IDENTITY = SHARED / "identity_conversations.jsonl"


# ----------------------------------------------------------------------------- the reference

BUFFER_SIZE = 100
MAX_TOKENS = 2048  # render_conversation(conversation, max_tokens=2048)


def upstream_render(conversation, tok):
    ids, mask = render_conversation(conversation, tok, "assistant")  # nanochat's template (tests/test_render.py)
    return ids[:MAX_TOKENS], mask[:MAX_TOKENS]


def upstream_loader(dataset, tok, B, T, use_mask):
    """Micro-batches (inputs, targets, docs) as upstream yields them; docs[i] = [(index, epoch), ...] of row i."""
    bos = tok.bos_id
    row_capacity = T + 1
    conv_buffer = []
    cursor, epoch, N = 0, 1, len(dataset)

    def refill_buffer():
        nonlocal cursor, epoch
        while len(conv_buffer) < BUFFER_SIZE:
            ids, mask = upstream_render(dataset[cursor], tok)
            ids, mask = ids[:row_capacity], mask[:row_capacity]  # the crop fix (68894d6)
            conv_buffer.append((ids, mask, (cursor, epoch)))
            cursor += 1
            if cursor >= N:
                cursor = cursor % N
                epoch += 1

    while True:
        rows, mask_rows, row_lengths, docs = [], [], [], []
        for _ in range(B):
            row, mask_row, row_docs = [], [], []
            padded = False
            while len(row) < row_capacity:
                refill_buffer()
                remaining = row_capacity - len(row)
                best_idx, best_len = -1, 0
                for i, (ids, _, _) in enumerate(conv_buffer):
                    if len(ids) <= remaining and len(ids) > best_len:
                        best_idx, best_len = i, len(ids)
                if best_idx >= 0:
                    ids, mask, doc = conv_buffer.pop(best_idx)
                    row.extend(ids)
                    mask_row.extend(mask)
                    row_docs.append(doc)
                else:
                    content_len = len(row)
                    row.extend([bos] * remaining)
                    mask_row.extend([0] * remaining)
                    padded = True
                    break
            rows.append(row)
            mask_rows.append(mask_row)
            row_lengths.append(content_len if padded else row_capacity)
            docs.append(row_docs)
        batch = np.array(rows, dtype=np.int64)
        inputs, targets = batch[:, :-1], batch[:, 1:].copy()
        if use_mask:  # variant A
            targets[np.array(mask_rows)[:, 1:] == 0] = -1
        for i, content_len in enumerate(row_lengths):
            if content_len < row_capacity:
                targets[i, max(content_len - 1, 0):] = -1
        yield inputs, targets, docs


def reference_rows(dataset, tok, T, use_mask, max_rows, B=3):
    """Upstream's rows, micro-batch after micro-batch, up to the first one that holds a conversation of its
    second pass (where our one-pass stream ends and the last buffer drains instead):
    [(inputs (T,), targets (T,), [conversation indices])]. The rows do not depend on B."""
    out = []
    for inputs, targets, docs in upstream_loader(dataset, tok, B, T, use_mask):
        for x, y, d in zip(inputs, targets, docs):
            if any(e > 1 for _, e in d) or len(out) == max_rows:
                return out
            out.append((x, y, [i for i, _ in d]))


# ----------------------------------------------------------------------------- builds

def write_parity_recipe(folder: Path, *, max_seq_len: int, mask_policy: str, overlong: str, train: str,
                        val: str, name: str = "parity") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{max_seq_len}-{mask_policy}-{overlong}.toml"
    path.write_text(f"""
name = "{name}"
max_seq_len = {max_seq_len}
mask_policy = "{mask_policy}"
overlong = "{overlong}"
rows_per_shard = 64

[tokenizer]
source = "file"

[packing]
method = "bestfit-seed"
{train}
{val}
""")
    return path


def build(recipe: Path, data: Path) -> Path:
    return prepare(recipe, data, workers=1, out=io.StringIO())


def mixture_conversations(recipe_path: Path, data: Path, split: str = "train") -> list[dict]:
    """The split's conversations in mixture order: what upstream's loader indexes."""
    recipe = load_recipe(recipe_path)
    specs = getattr(recipe, split)
    entries = [s for s in specs for _ in range(s.repeat)]
    tasks = {s.name: build_task(s, data) for s in specs}
    order = mixture_order([len(tasks[s.name]) for s in entries], seed=recipe.mixture_seed)
    return [tasks[entries[e].name][local] for e, local in order.tolist()]


def snapshot_rows(snap: Path, split: str = "train"):
    """[(inputs, targets, doc_ids)] of a snapshot, targets -1 where not supervised (as the trainer builds them)."""
    manifest = verify_snapshot(snap, full=True)
    reader = SplitReader(shard_paths(snap, manifest, split))
    out = []
    for g in range(reader.num_rows):
        shard, local = reader.locate(g)
        tokens = shard.tokens[local].astype(np.int64)
        mask = shard.mask[local]
        targets = np.where(mask[1:] == 1, tokens[1:], -1)
        out.append((tokens[:-1], targets, shard.row_docs(local)[1].tolist()))
    return out


def first_difference(ours, ref) -> int | None:
    for k, ((xa, ya, da), (xb, yb, db)) in enumerate(zip(ours, ref)):
        if da != db or not np.array_equal(xa, xb) or not np.array_equal(ya, yb):
            return k
    return None


def assert_parity(snap: Path, dataset, tok, T: int, mask_policy: str, min_rows: int, split: str = "train") -> list:
    ours = snapshot_rows(snap, split)
    ref = reference_rows(dataset, tok, T, mask_policy == "assistant", len(ours))
    assert len(ref) >= min_rows, f"only {len(ref)} rows before upstream's buffer reads its second pass"
    assert len(ours) >= len(ref)
    k = first_difference(ours, ref)
    assert k is None, f"row {k} differs from upstream (docs {ours[k][2]} vs {ref[k][2]})"
    return ours


# ----------------------------------------------------------------------------- synthetic conversations

def words(rng, n: int) -> str:
    return " ".join(f"w{int(x)}" for x in rng.integers(0, 5000, n))


def synthetic_conversations(tok, seed: int = 0, n: int = 360) -> list[dict]:
    """Mostly ordinary chats, plus: longer than 2048 tokens (answer cut), long prompts that leave no target
    at 512 or at 2048, multi-turn chats cut inside a later turn, and one of exactly 2049 tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = i % 12
        if kind == 0:    # long answer: > 2048 tokens
            msgs = [("user", words(rng, 20)), ("assistant", words(rng, int(rng.integers(700, 1100))))]
        elif kind == 1:  # long prompt: nothing supervised left at 512
            msgs = [("user", words(rng, int(rng.integers(200, 600)))), ("assistant", words(rng, 30))]
        elif kind == 2 and i % 24 == 2:  # very long prompt: nothing supervised left at 2048 either
            msgs = [("user", words(rng, int(rng.integers(750, 1000)))), ("assistant", words(rng, 10))]
        elif kind == 3:  # multi-turn, cut in a later turn
            msgs = [(r, words(rng, int(rng.integers(20, 250)))) for r in ["user", "assistant"] * 6]
        else:
            msgs = [("user", words(rng, int(rng.integers(3, 60)))),
                    ("assistant", words(rng, int(rng.integers(3, 120))))]
        out.append({"messages": [{"role": r, "content": c} for r, c in msgs]})
    out[5] = exactly(tok, 2049, rng)
    out[17] = exactly(tok, 2048, rng)
    return out


def exactly(tok, n: int, rng) -> dict:
    """A chat that renders to exactly n tokens: words up to a few tokens short, then " a" (one token each)."""
    def conv(answer: str) -> dict:
        return {"messages": [{"role": "user", "content": words(rng, 40)}, {"role": "assistant", "content": answer}]}
    user = conv("")["messages"][0]
    answer = ""
    while True:
        c = {"messages": [user, {"role": "assistant", "content": answer}]}
        length = len(render_conversation(c, tok)[0])
        if length == n:
            return c
        assert length < n, f"overshot {n} tokens"
        answer += f" w{int(rng.integers(0, 5000))}" if length < n - 8 else " a"


SYN_TRAIN = """
[[train]]
kind = "chat"
name = "syn"
params = {{ paths = "{path}", shuffle = false }}
"""
SYN_VAL = """
[[val]]
kind = "chat"
name = "synval"
params = {{ paths = "{path}", shuffle = false }}
stop = 40
"""


@pytest.fixture(scope="module")
def syn(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("parity")
    data = root / "data"
    save_tokenizer(tiny_tokenizer, data / "tokenizer" / "tokenizer.pkl")
    convs = synthetic_conversations(tiny_tokenizer)
    src = data / "syn.jsonl"
    src.write_text("".join(json.dumps(c) + "\n" for c in convs))
    return root, data, SYN_TRAIN.format(path=src.name), SYN_VAL.format(path=src.name)


def test_synthetic_set_has_the_cases(syn, tiny_tokenizer):
    _, data, _, _ = syn
    dataset = [json.loads(line) for line in (data / "syn.jsonl").read_text().splitlines()]
    rendered = [render_conversation(c, tiny_tokenizer) for c in dataset]
    lengths = np.array([len(ids) for ids, _ in rendered])
    sup_at = lambda cut: np.array([sum(m[1:cut]) for _, m in rendered])  # noqa: E731
    assert (lengths > 2049).sum() >= 20 and (lengths == 2049).sum() >= 1 and (lengths == 2048).sum() >= 1
    assert (sup_at(513) == 0).sum() >= 30 and (sup_at(2048) == 0).sum() >= 5
    assert ((lengths > 513) & (sup_at(513) > 0)).sum() >= 30  # cut but still supervised


@pytest.mark.parametrize("mask_policy", ["all", "assistant"])
@pytest.mark.parametrize("T", [2048, 512, 4096])  # 4096: upstream still cuts at 2048
def test_bestfit_seed_reproduces_upstream(syn, tiny_tokenizer, T, mask_policy):
    root, data, train, val = syn
    recipe = write_parity_recipe(root / "r", max_seq_len=T, mask_policy=mask_policy, overlong="nanochat",
                                 train=train, val=val)
    snap = build(recipe, data)
    dataset = mixture_conversations(recipe, data)
    ours = assert_parity(snap, dataset, tiny_tokenizer, T, mask_policy, min_rows={512: 150, 2048: 60, 4096: 30}[T])

    # the cases are really in the compared rows, and the manifest counts them
    cut = min(T + 1, 2048)
    placed = [d for _, _, docs in ours for d in docs]
    assert len(placed) == len(set(placed))
    assert sum(len(render_conversation(dataset[d], tiny_tokenizer)[0]) > cut for d in placed) >= 20
    task = next(t for t in load_manifest(snap)["stats"]["tasks"] if t["name"] == "syn")
    assert task["dropped_unsupervised"] == 0 and task["dropped_long"] == 0 and task["packed"] == len(dataset)
    summary = next(s for s in load_manifest(snap)["stats"]["splits"] if s["split"] == "train")
    unsupervised = sum(int((y < 0).all()) for _, y, _ in ours)
    if mask_policy == "assistant":
        assert task["kept_unsupervised"] >= (30 if T == 512 else 5)
        assert unsupervised >= 1
        assert summary["unsupervised_rows"] >= unsupervised
        if T == 512:
            assert unsupervised >= 10  # whole rows without a target: allowed here, counted, skipped by the trainer
    else:
        assert task["kept_unsupervised"] == 0 and summary["unsupervised_rows"] == 0 == unsupervised


@pytest.mark.parametrize("mask_policy,T", [("all", 2048), ("assistant", 2048), ("assistant", 512)])
def test_default_policy_is_not_upstream(syn, tiny_tokenizer, T, mask_policy):
    """The better default (cut to the row, drop what has no target) differs where the issue measured it:
    a truncated conversation's last token at 2048, the dropped target-free conversations at 512."""
    root, data, train, val = syn
    recipe = write_parity_recipe(root / "d", max_seq_len=T, mask_policy=mask_policy, overlong="truncate",
                                 train=train, val=val)
    snap = build(recipe, data)
    ours = snapshot_rows(snap)
    ref = reference_rows(mixture_conversations(recipe, data), tiny_tokenizer, T, mask_policy == "assistant",
                         len(ours))
    k = first_difference(ours, ref)
    assert k is not None and k < len(ref)
    assert all((y >= 0).any() for _, y, _ in ours)  # the default never writes a target-free row


# ----------------------------------------------------------------------------- real data

@pytest.mark.skipif(not GSM8K_TRAIN.is_file() or not IDENTITY.is_file(), reason=f"{SHARED} not present")
@pytest.mark.parametrize("mask_policy", ["all", "assistant"])
@pytest.mark.parametrize("T", [2048, 512])
def test_bestfit_seed_reproduces_upstream_on_real_data(tmp_path_factory, tiny_tokenizer, T, mask_policy):
    """GSM8K (tool-call parts), nanochat's identity conversations and multi-problem GSM8K chats (over 2048
    tokens with this small vocabulary, prompts that leave nothing supervised), read from ../shared/data."""
    root = real_data_dir(tmp_path_factory, tiny_tokenizer)
    data = root / "data"
    train = f"""
[[train]]
kind = "gsm8k"
params = {{ split = "train", paths = "{GSM8K_TRAIN}" }}
stop = 600

[[train]]
kind = "customjson"
name = "identity"
params = {{ path = "{IDENTITY}" }}
stop = 300

[[train]]
kind = "chat"
name = "gsm8k-multi"
params = {{ paths = "gsm8k_multi.jsonl" }}
"""
    val = f"""
[[val]]
kind = "gsm8k"
params = {{ split = "train", paths = "{GSM8K_TRAIN}" }}
start = 7000
"""
    recipe = write_parity_recipe(root / "r", max_seq_len=T, mask_policy=mask_policy, overlong="nanochat",
                                 train=train, val=val, name="real")
    snap = build(recipe, data)
    dataset = mixture_conversations(recipe, data)
    assert_parity(snap, dataset, tiny_tokenizer, T, mask_policy, min_rows=200 if T == 2048 else 500)
    assert_parity(snap, mixture_conversations(recipe, data, "val"), tiny_tokenizer, T, mask_policy, min_rows=40,
                  split="val")  # the val loader is the same generator over the val mixture
    tasks = {t["name"]: t for t in load_manifest(snap)["stats"]["tasks"] if t["split"] == "train"}
    assert tasks["gsm8k-multi"]["truncated"] > 0
    if mask_policy == "assistant":
        assert tasks["gsm8k-multi"]["kept_unsupervised"] > 0


_real_root: list[Path] = []


def real_data_dir(tmp_path_factory, tok) -> Path:
    """A data dir with the tokenizer and a JSONL of multi-problem chats built from GSM8K rows (made once)."""
    if _real_root:
        return _real_root[0]
    import pyarrow.parquet as pq
    root = tmp_path_factory.mktemp("real")
    save_tokenizer(tok, root / "data" / "tokenizer" / "tokenizer.pkl")
    table = pq.read_table(GSM8K_TRAIN, columns=["question", "answer"]).to_pydict()
    qa = list(zip(table["question"], table["answer"]))[6000:6400]
    lines = []
    for i in range(0, 200, 8):  # every problem, one after the other, answered in turn: over 2048 tokens
        msgs = [m for q, a in qa[i:i + 8]
                for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        lines.append(json.dumps({"messages": msgs}) + "\n")
    for i in range(200, 400, 16):  # sixteen questions in one prompt, then one answer: no target survives the cut
        msgs = [{"role": "user", "content": "\n\n".join(q for q, _ in qa[i:i + 16])},
                {"role": "assistant", "content": qa[i][1]}]
        lines.append(json.dumps({"messages": msgs}) + "\n")
    (root / "data" / "gsm8k_multi.jsonl").write_text("".join(lines))
    _real_root.append(root)
    return root


def test_target_free_rows_only_in_nanochat_snapshots(syn, tmp_path):
    """The contract's exception is recorded in the manifest: the same rows under another policy fail verify."""
    import shutil

    from pipeline.errors import SnapshotError
    from pipeline.manifest import manifest_identity, snapshot_id, write_json_atomic
    root, data, train, val = syn
    recipe = write_parity_recipe(root / "r", max_seq_len=512, mask_policy="assistant", overlong="nanochat",
                                 train=train, val=val)
    snap = build(recipe, data)
    assert next(s for s in load_manifest(snap)["stats"]["splits"] if s["split"] == "train")["unsupervised_rows"] > 0
    copy = tmp_path / snap.name
    shutil.copytree(snap, copy)
    m = load_manifest(copy)
    m["recipe"]["overlong"] = "truncate"
    m["snapshot_id"] = snapshot_id(manifest_identity(m))  # a consistent id: the row check is what is tested
    write_json_atomic(copy / "manifest.json", m)
    verify_snapshot(copy, full=False)
    with pytest.raises(SnapshotError, match=r"row \d+ has no supervised target \(allowed only in overlong = "
                                            "'nanochat' snapshots\\)"):
        verify_snapshot(copy, full=True)


def test_recipe_field():
    from pipeline.errors import RecipeError
    from pipeline.recipe import parse_recipe
    gsm8k = {"kind": "gsm8k", "params": {"split": "train"}}  # params are checked at load
    base = {"name": "x", "max_seq_len": 8, "tokenizer": {"source": "file"}, "train": [gsm8k], "val": [gsm8k]}
    assert parse_recipe({**base, "overlong": "nanochat"}).overlong == "nanochat"
    assert parse_recipe(base).overlong == "truncate"
    seed = {**base, "packing": {"method": "bestfit-seed"}}
    assert parse_recipe(seed).overlong == "nanochat"  # the parity packer defaults to upstream's cut
    assert parse_recipe({**seed, "overlong": "truncate"}).overlong == "truncate"
    with pytest.raises(RecipeError, match="overlong.*one of truncate, drop, nanochat"):
        parse_recipe({**base, "overlong": "upstream"})
