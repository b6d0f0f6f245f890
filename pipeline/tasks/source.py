"""Finding and reading task source files: nanochat's Hub cache layout, parquet columns, JSONL lines.

Rows stay in Arrow memory and are converted to Python one at a time (a few microseconds each), so a
task over 460K SmolTalk rows costs its Arrow bytes, not millions of Python objects.
"""
from __future__ import annotations

import bisect
import glob
import json
import re
import shlex
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.types as pat

from pipeline.errors import DataError, SourceMissingError
from pipeline.layout import owned_dir

_GLOB_CHARS = set("*?[")


def seed_permutation(n: int, seed: int = 42) -> np.ndarray:
    """The row order of every Hub task: index k of the task is row perm[k] (HF `.shuffle(seed=42)`)."""
    return np.random.default_rng(seed).permutation(n)


def hub_dir(data_dir: Path, repo: str, subset: str, split: str) -> Path:
    """nanochat's cache folder for a Hub dataset split: task_data/<owner>--<name>/<subset>/<split>."""
    return Path(data_dir) / "task_data" / repo.replace("/", "--") / subset / split


def expand_paths(data_dir: Path, paths: str | Sequence[str], what: str) -> list[Path]:
    """Files named by paths/globs (relative ones resolve against data_dir), in the order listed.

    Each glob expands sorted; a file named twice is read once. A pattern matching nothing is an error.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for pattern in paths:
        full = Path(pattern) if Path(pattern).is_absolute() else Path(data_dir) / pattern
        if _GLOB_CHARS & set(str(pattern)):
            matches = sorted(Path(m) for m in glob.glob(str(full), recursive=True) if Path(m).is_file())
        else:
            matches = [full] if full.is_file() else []
        if not matches:
            raise SourceMissingError(f"{what}: {str(pattern)!r} matches no file (looked for {full})", file=full)
        files.extend(m for m in matches if m not in files)
    return files


RECIPE_PLACEHOLDER = "RECIPE=<recipe>"


def fetch_command(data_dir: Path, eval_sets: bool = False) -> str:
    """The command that downloads a recipe's sources (pipeline.fetch); the CLIs fill in the recipe.
    ChatCORE's own test sets need no recipe: `--eval` fetches them."""
    if eval_sets:
        return f"make fetch-data DATA_DIR={shlex.quote(str(data_dir))} ARGS=--eval"
    return f"make fetch-data {RECIPE_PLACEHOLDER} DATA_DIR={shlex.quote(str(data_dir))}"


def with_recipe(message: str, recipe: str) -> str:
    """An error message with the fetch command's recipe filled in (the tasks do not know its name)."""
    return message.replace(RECIPE_PLACEHOLDER, f"RECIPE={shlex.quote(recipe)}")


def fetch_record_path(data_dir: Path, relpath: str | Path) -> Path:
    """Where pipeline.fetch records what it wrote at <data_dir>/<relpath>: inside nanosft's own folder."""
    return owned_dir(data_dir) / "fetch" / f"{relpath}.json"


def _complete(record: Path) -> bool:
    try:
        return json.loads(record.read_text(encoding="utf-8")).get("complete") is True
    except (OSError, ValueError, AttributeError):
        return False


def find_source_files(data_dir: Path, repo: str, subset: str, split: str,
                      paths: str | Sequence[str] | None = None) -> list[Path]:
    """The parquet files of a Hub dataset split, in row order (nanochat concatenates them sorted by name)."""
    what = f"dataset {repo} (subset {subset}, split {split})"
    if paths is not None:
        return expand_paths(data_dir, paths, what)
    folder = hub_dir(data_dir, repo, subset, split)
    command = fetch_command(data_dir, eval_sets=repo == "allenai/ai2_arc")
    record = fetch_record_path(data_dir, folder.relative_to(data_dir))
    if record.is_file() and not _complete(record):
        raise SourceMissingError(f"{what}: the download into {folder} is not finished; to finish it: {command}",
                                 file=folder)
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise SourceMissingError(
            f"{what}: no parquet files (00000.parquet, ...) in {folder}; to download them: {command} "
            f"(or list the files in the task's `paths` param)", file=folder)
    return files


# --- parquet columns ---

def _any(t: pa.DataType, *names: str) -> bool:
    return any(getattr(pat, n, lambda _: False)(t) for n in names)  # view types need pyarrow >= 16


def _is_string(t: pa.DataType) -> bool:
    return _any(t, "is_string", "is_large_string", "is_string_view")


def _is_list(t: pa.DataType) -> bool:
    return _any(t, "is_list", "is_large_list", "is_fixed_size_list", "is_list_view", "is_large_list_view")


def _is_messages(t: pa.DataType) -> bool:
    if not _is_list(t) or not pat.is_struct(t.value_type):
        return False
    fields = {f.name: f.type for f in t.value_type}
    return all(k in fields and (_is_string(fields[k]) or pat.is_null(fields[k])) for k in ("role", "content"))


COLUMN_TYPES = {
    "string": (_is_string, "a string"),
    "int": (pat.is_integer, "an integer"),
    "list<string>": (lambda t: _is_list(t) and _is_string(t.value_type), "a list of strings"),
    "messages": (_is_messages, "a list of {role: string, content: string} structs"),
}


class ParquetFile:
    """Named columns of one parquet file, type-checked, held as Arrow arrays."""

    def __init__(self, path: Path, columns: Mapping[str, str], wrapped_in: str | None = None):
        self.path = Path(path)
        try:
            schema = pq.read_schema(self.path)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise DataError(f"cannot read parquet: {e}", file=self.path) from None
        names = set(schema.names)
        missing = [c for c in columns if c not in names]
        if missing and wrapped_in in names and pat.is_struct(schema.field(wrapped_in).type):
            # MMLU's old auxiliary_train config nests every row in a struct column named "train"
            self._read(columns, schema.field(wrapped_in).type, wrapped_in)
            return
        if missing:
            raise DataError(f"missing column {missing[0]!r} (columns: {', '.join(schema.names)})",
                            file=self.path, field=missing[0])
        self._read(columns, schema, None)

    def _read(self, columns: Mapping[str, str], schema: Any, wrapper: str | None) -> None:
        types = {f.name: f.type for f in schema}
        for col, kind in columns.items():
            if col not in types:
                raise DataError(f"missing field {col!r} in struct column {wrapper!r}", file=self.path, field=col)
            ok, desc = COLUMN_TYPES[kind]
            if not ok(types[col]):
                raise DataError(f"column {col!r} has type {types[col]}, expected {desc}", file=self.path, field=col)
        try:
            table = pq.read_table(self.path, columns=[wrapper] if wrapper else list(columns))
        except Exception as e:
            raise DataError(f"cannot read parquet: {e}", file=self.path) from None
        if wrapper:
            outer = table.column(wrapper).combine_chunks()
            self.arrays = {c: outer.field(c) for c in columns}
        else:
            self.arrays = {c: table.column(c).combine_chunks() for c in columns}
        self.n = table.num_rows

    def value(self, column: str, row: int) -> Any:
        return self.arrays[column][row].as_py()


class ParquetRows:
    """Several parquet files read as one split: global row g -> (file, row within file)."""

    def __init__(self, files: Sequence[Path], columns: Mapping[str, str], wrapped_in: str | None = None):
        self.files = [ParquetFile(f, columns, wrapped_in) for f in files]
        self.offsets = np.cumsum([0] + [f.n for f in self.files]).tolist()
        self.n = self.offsets[-1]
        self._single = len(self.files) == 1

    def find(self, g: int) -> tuple[ParquetFile, int]:
        if self._single:
            return self.files[0], g
        k = bisect.bisect_right(self.offsets, g) - 1
        return self.files[k], g - self.offsets[k]

    def row(self, g: int) -> dict[str, Any]:
        f, r = self.find(g)
        return {c: a[r].as_py() for c, a in f.arrays.items()}

    def locate(self, g: int) -> tuple[str, int]:
        f, r = self.find(g)
        return str(f.path), r


# --- JSONL ---

def jsonl_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(1-based line number, parsed JSON) for each non-blank stripped line, as nanochat reads them.

    A line that is not JSON, or not valid UTF-8, yields a DataError in place of its value, so that the
    bad-row policy (fail or skip) decides when the row is read, not the whole file at once. Lines are
    split as text mode's universal newlines split them (\n, \r\n, \r) and decoded one by one."""
    lineno = 0
    with open(path, "rb") as f:
        for raw in f:
            for piece in _CR_SPLIT.split(raw.rstrip(b"\n").removesuffix(b"\r")) if b"\r" in raw else [raw]:
                lineno += 1
                try:
                    line = piece.decode("utf-8").strip()
                except UnicodeDecodeError as e:
                    yield lineno, DataError(f"line {lineno} (1-based) is not valid UTF-8: {e}", file=path, row=lineno)
                    continue
                if not line:
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:  # handed to the caller, raised when that row is read
                    value = DataError(f"line {lineno} (1-based) is not valid JSON: {e}", file=path, row=lineno)
                yield lineno, value


_CR_SPLIT = re.compile(rb"\r\n?")


def read_lines(path: Path) -> list[str]:
    """Lines with surrounding whitespace stripped, in file order, as nanochat reads its word list."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            return [line.strip() for line in f]
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8: {e}", file=path) from None
