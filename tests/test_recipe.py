"""Recipes: the shipped ones load; every bad value is reported with its dotted field path."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from pipeline.errors import RecipeError
from pipeline.recipe import load_recipe, parse_recipe, resolve_recipe_path

ROOT = Path(__file__).resolve().parents[1]

BASE = {
    "name": "t",
    "max_seq_len": 256,
    "tokenizer": {"source": "file", "path": "tok.pkl"},
    "train": [{"kind": "gsm8k", "params": {"split": "train"}, "repeat": 2}],
    "val": [{"kind": "gsm8k", "name": "gsm8k_val", "params": {"split": "test"}, "stop": 10}],
}


def with_change(path: str, value) -> dict:
    """BASE with one dotted path set (list indices as numbers); value None deletes the key."""
    data = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    if value is None:
        del node[last]
    else:
        node[last] = value
    return data


def test_shipped_recipes_load():
    demo = load_recipe(ROOT / "data_manifests" / "demo.toml")
    assert demo.demo is not None and demo.tokenizer.source == "train"
    sft = load_recipe(ROOT / "data_manifests" / "nanochat-sft.toml")
    assert [(t.kind, t.repeat) for t in sft.train] == [
        ("smoltalk", 1), ("customjson", 2), ("mmlu", 3), ("gsm8k", 4), ("simplespelling", 1), ("spellingbee", 1)]
    assert [(t.kind, t.stop) for t in sft.val] == [("smoltalk", None), ("mmlu", 5200), ("gsm8k", 420)]
    assert sft.train[4].params["size"] == 200_000 and sft.train[5].params["size"] == 80_000
    assert sft.max_seq_len == 2048 and sft.row_capacity == 2049


def test_defaults_and_plain_dict():
    r = parse_recipe(BASE)
    assert (r.mask_policy, r.overlong, r.bad_rows, r.mixture_seed, r.packing.method) == (
        "assistant", "truncate", "fail", 42, "bfd-blocks")
    d = r.to_dict()
    assert d["train"][0]["repeat"] == 2 and d["val"][0]["stop"] == 10
    with pytest.raises(AttributeError):  # frozen
        r.max_seq_len = 3  # type: ignore[misc]


@pytest.mark.parametrize("path,value,field,words", [
    ("max_seq_len", None, "max_seq_len", "required"),
    ("max_seq_len", "long", "max_seq_len", "must be int"),
    ("max_seq_len", 0, "max_seq_len", "> 0"),
    ("max_seq_len", True, "max_seq_len", "must be int"),
    ("mask_policy", "everything", "mask_policy", "one of assistant, all"),
    ("overlong", "crop", "overlong", "one of truncate, drop"),
    ("bad_rows", "ignore", "bad_rows", "one of fail, skip"),
    ("tokenizer.source", "web", "tokenizer.source", "one of file, train"),
    ("tokenizer.color", "red", "tokenizer", "unknown key"),
    ("packing.method", "greedy", "packing.method", "one of"),
    ("train.0.kind", "wiki", "train[0].kind", "one of"),
    ("train.0.repeat", 0, "train[0].repeat", "> 0"),
    ("train.0.step", -1, "train[0].step", "> 0"),
    ("train.0.params", "split=train", "train[0].params", "must be dict"),
    ("train.0.epochs", 3, "train[0]", "unknown key(s) epochs"),
    ("val.0.start", 20, "val[0]", "start <= stop"),
    ("rows_per_shard", -5, "rows_per_shard", "> 0"),
    ("surprise", 1, None, "unknown key(s) surprise"),
])
def test_bad_values_name_their_field(path, value, field, words):
    with pytest.raises(RecipeError) as e:
        parse_recipe(with_change(path, value), "r.toml")
    assert e.value.field == field
    assert words in e.value.reason
    assert "r.toml" in str(e.value)


def test_train_tokenizer_needs_vocab_and_tasks_need_distinct_names():
    with pytest.raises(RecipeError) as e:
        parse_recipe(with_change("tokenizer", {"source": "train"}))
    assert e.value.field == "tokenizer.vocab_size"
    data = copy.deepcopy(BASE)
    data["train"].append(dict(data["train"][0]))
    with pytest.raises(RecipeError) as e:
        parse_recipe(data)
    assert e.value.field == "train[1].name" and "repeat" in e.value.reason
    with pytest.raises(RecipeError) as e:
        parse_recipe(with_change("val", []))
    assert e.value.field == "val"


def test_toml_errors_and_paths(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\nmax_seq_len = = 3\n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "missing.toml")
    assert resolve_recipe_path("demo") == ROOT / "data_manifests" / "demo.toml"
    assert resolve_recipe_path(str(bad)) == bad
