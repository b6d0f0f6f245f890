"""Any chat dataset: parquet or JSONL files whose rows carry a `messages` list, checked like SmolTalk.

Files are concatenated in the order listed (globs sorted); with `shuffle` the rows follow the same
seed-42 permutation as the Hub tasks.
"""
from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any

from pipeline.errors import DataError, RecipeError
from pipeline.tasks.base import Task, check_smoltalk_messages
from pipeline.tasks.source import ParquetFile, expand_paths, jsonl_lines, seed_permutation

PARAMS = {"paths": ("paths", None), "shuffle": ("bool", True)}


class _JsonlFile:
    """The `messages` of each non-blank line of a JSONL file, parsed once."""

    def __init__(self, path: Path):
        self.path = path
        self.messages: list[Any] = []
        self.lines: list[int] = []
        for lineno, obj in jsonl_lines(path):
            if isinstance(obj, DataError):  # kept until the row is read: the bad-row policy decides
                self.messages.append(obj)
            elif not isinstance(obj, dict) or "messages" not in obj:
                got = "an object without 'messages'" if isinstance(obj, dict) else type(obj).__name__
                self.messages.append(DataError(f"line {lineno} (1-based) must be a JSON object with a 'messages' "
                                               f"key, got {got}", file=path, row=lineno, field="messages"))
            else:
                self.messages.append(obj["messages"])
            self.lines.append(lineno)
        self.n = len(self.messages)

    def get(self, r: int) -> Any:
        m = self.messages[r]
        if isinstance(m, DataError):
            raise m
        return [dict(x) if isinstance(x, dict) else x for x in m] if isinstance(m, list) else m

    def row_number(self, r: int) -> int:
        return self.lines[r]


class _ParquetMessages:
    def __init__(self, path: Path):
        self.file = ParquetFile(path, {"messages": "messages"})
        self.path, self.n = path, self.file.n

    def get(self, r: int) -> Any:
        return self.file.value("messages", r)

    def row_number(self, r: int) -> int:
        return r


class ChatTask(Task):
    def __init__(self, name: str, data_dir: Path, paths, shuffle: bool):
        super().__init__(name)
        self.files = []
        for path in expand_paths(data_dir, paths, f"chat task {name}"):
            if path.suffix == ".parquet":
                self.files.append(_ParquetMessages(path))
            elif path.suffix == ".jsonl":
                self.files.append(_JsonlFile(path))
            else:
                raise RecipeError(f"{path} is neither .parquet nor .jsonl", field=f"tasks.{name}.params.paths")
        self.offsets = [0]
        for f in self.files:
            self.offsets.append(self.offsets[-1] + f.n)
        self.perm = seed_permutation(self.offsets[-1]).tolist() if shuffle else None

    def num_examples(self) -> int:
        return self.offsets[-1]

    def _find(self, p: int):
        g = self.perm[p] if self.perm is not None else p
        k = bisect.bisect_right(self.offsets, g) - 1
        return self.files[k], g - self.offsets[k]

    def get_example(self, p: int) -> dict[str, Any]:
        f, r = self._find(p)
        messages = f.get(r)
        check_smoltalk_messages(messages)
        return {"messages": messages}

    def locate_example(self, p: int) -> tuple[str, int]:
        f, r = self._find(p)
        return str(f.path), f.row_number(r)

    def inputs(self) -> list[Path]:
        return [f.path for f in self.files]
