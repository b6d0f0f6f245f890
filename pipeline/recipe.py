"""Recipes: TOML files in data_manifests/ validated into frozen dataclasses.

A recipe fixes everything that determines a snapshot's bytes except the input files
themselves (those are hashed into the manifest). Every error names the TOML field.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from pipeline.errors import RecipeError

TASK_KINDS = ("smoltalk", "mmlu", "gsm8k", "customjson", "simplespelling", "spellingbee", "chat")


@dataclass(frozen=True)
class TaskSpec:
    """One task of a mixture. `params` are kind-specific (see pipeline/tasks)."""

    kind: str
    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    start: int = 0
    stop: int | None = None
    step: int = 1
    repeat: int = 1


MASK_POLICIES = ("assistant", "all")
# What happens to a conversation longer than a row (max_seq_len + 1 tokens), or left with no supervised target:
# - truncate (the default): cut it to the row; drop it if no target is left (design §3: every row has a target).
# - drop: drop it if longer than a row; drop it if it has no target.
# - nanochat (the default with packing.method = "bestfit-seed"): exactly upstream's loader, for parity. Cut to
#   render_conversation's max_tokens=2048 whatever the row size, then to the row (upstream's crop fix 68894d6),
#   and keep every conversation, even one left with no target. Rows without a target are then allowed in the
#   shards (counted in the manifest); the trainer skips a step that has no target at all.
OVERLONG_POLICIES = ("truncate", "drop", "nanochat")
BAD_ROW_POLICIES = ("fail", "skip")
PACKERS = ("bestfit-seed", "bestfit", "bfd-shuffle", "bfd-blocks")
TOKENIZER_SOURCES = ("file", "train")
RECIPE_NAME = re.compile(r"[A-Za-z0-9._-]+")  # a folder name on any system


def is_safe_name(name: str) -> bool:
    """A recipe (and snapshot folder) name: RECIPE_NAME, not hidden. pipeline.import checks the same."""
    return bool(RECIPE_NAME.fullmatch(name)) and not name.startswith(".")


@dataclass(frozen=True)
class TokenizerSpec:
    """Where the tokenizer comes from: an existing nanochat `tokenizer.pkl`, or trained on the demo text."""

    source: str                    # "file" | "train"
    path: str = "tokenizer/tokenizer.pkl"   # relative to the data dir (source = "file")
    vocab_size: int | None = None  # source = "train"


@dataclass(frozen=True)
class PackingSpec:
    method: str = "bfd-blocks"
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DemoSpec:
    """The demo recipe generates its own sources (pipeline.demo_data) before reading them."""

    seed: int = 0
    sizes: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    name: str
    max_seq_len: int
    tokenizer: TokenizerSpec
    train: tuple[TaskSpec, ...]
    val: tuple[TaskSpec, ...]
    description: str = ""
    mask_policy: str = "assistant"
    overlong: str = "truncate"
    bad_rows: str = "fail"
    mixture_seed: int = 42
    packing: PackingSpec = field(default_factory=PackingSpec)
    rows_per_shard: int = 8192
    demo: DemoSpec | None = None

    @property
    def row_capacity(self) -> int:
        return self.max_seq_len + 1

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready form (for the manifest and the snapshot id)."""
        return _plain(self)


def _plain(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return {k: _plain(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _Fields:
    """Reads one TOML table; every error names the dotted field path."""

    def __init__(self, table: Any, path: str, file: str):
        if not isinstance(table, dict):
            raise RecipeError(f"expected a table, found {type(table).__name__}", file=file, field=path or None)
        self.table, self.path, self.file = dict(table), path, file
        self.used: set[str] = set()

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., choices: tuple | None = None) -> Any:
        self.used.add(key)
        if key not in self.table:
            if default is ...:
                raise RecipeError("is required", file=self.file, field=self._name(key))
            return default
        value = self.table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise RecipeError(f"must be {names}, found {type(value).__name__} {value!r}",
                              file=self.file, field=self._name(key))
        if choices is not None and value not in choices:
            raise RecipeError(f"must be one of {', '.join(map(str, choices))}; found {value!r}",
                              file=self.file, field=self._name(key))
        return value

    def positive(self, key: str, default: Any = ...) -> int:
        value = self.get(key, int, default)
        if value is not None and value <= 0:
            raise RecipeError(f"must be > 0, found {value}", file=self.file, field=self._name(key))
        return value

    def sub(self, key: str, required: bool = False) -> "_Fields":
        value = self.get(key, dict, ... if required else {})
        return _Fields(value, self._name(key), self.file)

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise RecipeError(f"unknown key(s) {', '.join(unknown)}", file=self.file,
                              field=self.path or None)


def _task_spec(table: Any, where: str, file: str) -> TaskSpec:
    f = _Fields(table, where, file)
    kind = f.get("kind", str, choices=TASK_KINDS)
    name = f.get("name", str, kind)
    params = f.get("params", dict, {})
    start = f.get("start", int, 0)
    stop = f.get("stop", int, None)
    step = f.positive("step", 1)
    repeat = f.positive("repeat", 1)
    f.done()
    if start < 0 or (stop is not None and stop < start):
        raise RecipeError(f"needs 0 <= start <= stop, found start={start} stop={stop}", file=file, field=where)
    from pipeline.tasks import resolve_params  # here, not at the top: pipeline.tasks imports this module
    try:
        resolve_params(kind, name, params, where)  # a wrong parameter is a recipe error: say so at load
    except RecipeError as e:
        raise RecipeError(e.reason, file=file, field=e.field) from None
    return TaskSpec(kind=kind, name=name, params=params, start=start, stop=stop, step=step, repeat=repeat)


def _task_list(tables: Any, split: str, file: str) -> tuple[TaskSpec, ...]:
    if not isinstance(tables, list) or not tables:
        raise RecipeError("needs at least one [[%s]] task" % split, file=file, field=split)
    specs = tuple(_task_spec(t, f"{split}[{i}]", file) for i, t in enumerate(tables))
    names = [s.name for s in specs]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise RecipeError(f"task name {n!r} is used twice; give each entry a distinct `name` "
                              "(use `repeat` to oversample)", file=file, field=f"{split}[{i}].name")
    return specs


def parse_recipe(data: Mapping[str, Any], file: str = "<recipe>") -> Recipe:
    f = _Fields(data, "", file)
    name = f.get("name", str)
    if not is_safe_name(name):
        raise RecipeError(f"must be letters, digits, '.', '_' or '-' and not start with '.', found {name!r} "
                          "(it names the snapshot folder)", file=file, field="name")
    description = f.get("description", str, "")
    max_seq_len = f.positive("max_seq_len")
    mask_policy = f.get("mask_policy", str, "assistant", MASK_POLICIES)
    bad_rows = f.get("bad_rows", str, "fail", BAD_ROW_POLICIES)
    mixture_seed = f.get("mixture_seed", int, 42)
    rows_per_shard = f.positive("rows_per_shard", 8192)

    t = f.sub("tokenizer", required=True)
    source = t.get("source", str, choices=TOKENIZER_SOURCES)
    tokenizer = TokenizerSpec(source=source, path=t.get("path", str, "tokenizer/tokenizer.pkl"),
                              vocab_size=t.positive("vocab_size", None))
    if source == "train" and tokenizer.vocab_size is None:
        raise RecipeError("is required when source = 'train'", file=file, field="tokenizer.vocab_size")
    if tokenizer.vocab_size is not None and tokenizer.vocab_size < 256 + 9:
        raise RecipeError("must be >= 265 (256 bytes + 9 special tokens)", file=file, field="tokenizer.vocab_size")
    t.done()

    p = f.sub("packing")
    method = p.get("method", str, "bfd-blocks", PACKERS)
    packing = PackingSpec(method=method, options={k: v for k, v in p.table.items() if k != "method"})
    p.used.update(p.table)
    # bestfit-seed exists for parity with upstream, so it cuts and keeps conversations as upstream does unless
    # the recipe says otherwise; every other packer gets the better default
    overlong = f.get("overlong", str, "nanochat" if method == "bestfit-seed" else "truncate", OVERLONG_POLICIES)

    demo = None
    if "demo" in f.table:
        d = f.sub("demo")
        sizes = d.get("sizes", dict, {})
        for k, v in sizes.items():
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise RecipeError(f"must be a positive integer, found {v!r}", file=file, field=f"demo.sizes.{k}")
        demo = DemoSpec(seed=d.get("seed", int, 0), sizes=sizes)
        d.done()

    train = _task_list(f.get("train", list), "train", file)
    val = _task_list(f.get("val", list), "val", file)
    f.done()
    return Recipe(name=name, description=description, max_seq_len=max_seq_len, tokenizer=tokenizer, train=train,
                  val=val, mask_policy=mask_policy, overlong=overlong, bad_rows=bad_rows, mixture_seed=mixture_seed,
                  packing=packing, rows_per_shard=rows_per_shard, demo=demo)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe TOML file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found (looked at {path.resolve()}); recipes live in data_manifests/",
                          file=path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"not valid TOML: {e}", file=path) from None
    return parse_recipe(data, str(path))


def resolve_recipe_path(name_or_path: str) -> Path:
    """`demo` → data_manifests/demo.toml; a path is taken as is."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        return p
    return Path(__file__).resolve().parents[1] / "data_manifests" / f"{name_or_path}.toml"
