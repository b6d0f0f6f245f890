"""The Task base class: a sliceable, lazily converted list of nanochat conversations.

A subclass provides `num_examples()`, `get_example(p)` and `locate_example(p)` over *physical* indices
(its own deterministic order); the base class adds nanochat's start/stop/step view (reference §3.1) and
stamps the file, row and task name onto any DataError raised while converting a row.

Row numbers in errors: 0-based row index within a parquet file; 1-based line number in text files
(JSONL, word lists).
"""
from __future__ import annotations

import operator
from pathlib import Path
from typing import Any

from pipeline.errors import DataError, RecipeError
from pipeline.tasks.source import ParquetRows, seed_permutation


class Task:
    """A list of conversations; `task[i]` is the dict nanochat's task returns for view index i."""

    def __init__(self, name: str):
        self.name = name
        self._start, self._step = 0, 1
        self._len: int | None = None

    # --- what a subclass provides (physical indices) ---
    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, p: int) -> dict[str, Any]:
        raise NotImplementedError

    def locate_example(self, p: int) -> tuple[str, int]:
        raise NotImplementedError

    def inputs(self) -> list[Path]:
        """The files this task read, for the manifest."""
        raise NotImplementedError

    # --- the view ---
    def set_view(self, start: int = 0, stop: int | None = None, step: int = 1) -> "Task":
        """Apply nanochat's view: len = ceil((stop - start) / step), view index k -> start + k*step.

        A stop past the end is capped at the number of examples (as nanochat's later Task does), so a
        recipe's `stop = 5200` works on a smaller local sample; a start past the end is an error.
        """
        field = f"tasks.{self.name}"
        for key, value in (("start", start), ("step", step)) + ((("stop", stop),) if stop is not None else ()):
            if not isinstance(value, int) or isinstance(value, bool):
                raise RecipeError(f"must be an integer, got {value!r}", field=f"{field}.{key}")
        if start < 0:
            raise RecipeError(f"must be >= 0, got {start}", field=f"{field}.start")
        if step < 1:
            raise RecipeError(f"must be >= 1, got {step}", field=f"{field}.step")
        if stop is not None and stop < start:
            raise RecipeError(f"must be >= start ({start}), got {stop}", field=f"{field}.stop")
        n = self.num_examples()
        if start > n:
            raise RecipeError(f"start {start} is past the end of the task ({n} examples)", field=f"{field}.start")
        end = n if stop is None else min(stop, n)
        self._start, self._step = start, step
        self._len = (end - start + step - 1) // step
        return self

    def __len__(self) -> int:
        if self._len is None:
            self._len = self.num_examples()
        return self._len

    def _physical(self, i: int) -> int:
        i = operator.index(i)  # numpy ints welcome; floats are not
        if not 0 <= i < len(self):
            raise IndexError(f"task {self.name}: index {i} out of range for {len(self)} examples")
        return self._start + i * self._step

    def __getitem__(self, i: int) -> dict[str, Any]:
        p = self._physical(i)
        try:
            return self.get_example(p)
        except DataError as e:
            file, row = self.locate_example(p)
            raise e.located(file=file, row=row, task=self.name) from None

    def locate(self, i: int) -> tuple[str, int]:
        """(file, row) of view index i, for error reports."""
        return self.locate_example(self._physical(i))


# --- conversation checks shared by tasks (each raises DataError with the field) ---

def _message_fields(messages: list, i: int) -> tuple[Any, Any]:
    m = messages[i]
    if not isinstance(m, dict):
        raise DataError(f"message must be an object with role and content, got {type(m).__name__}",
                        field=f"messages[{i}]")
    for key in ("role", "content"):
        if key not in m:
            raise DataError(f"message is missing {key!r}", field=f"messages[{i}].{key}")
    return m["role"], m["content"]


def check_alternating(messages: Any, first: int, min_messages: int) -> None:
    """messages[first:] must be >= min_messages messages alternating user/assistant, string contents."""
    if not isinstance(messages, list):
        raise DataError(f"messages must be a list, got {type(messages).__name__}", field="messages")
    if len(messages) - first < min_messages:
        raise DataError(f"need at least {min_messages} user/assistant messages, got {len(messages) - first}",
                        field="messages")
    for i in range(first, len(messages)):
        role, content = _message_fields(messages, i)
        expected = "user" if (i - first) % 2 == 0 else "assistant"
        if role != expected:
            raise DataError(f"role is {role!r} but should be {expected!r} (user and assistant alternate, "
                            "starting with user)", field=f"messages[{i}].role")
        if not isinstance(content, str):
            raise DataError(f"content must be a string, got {type(content).__name__}", field=f"messages[{i}].content")


def check_smoltalk_messages(messages: Any) -> None:
    """SmolTalk's rule: an optional leading system message, then >= 2 alternating user/assistant strings."""
    if not isinstance(messages, list) or not messages:
        raise DataError("messages must be a non-empty list", field="messages")
    role, content = _message_fields(messages, 0)
    first = 0
    if role == "system":
        if not isinstance(content, str):  # nanochat fails at render time; we say so here
            raise DataError(f"content must be a string, got {type(content).__name__}", field="messages[0].content")
        first = 1
    check_alternating(messages, first, 2)


class ParquetTask(Task):
    """A task over parquet rows in the seed-42 order: view index -> physical p -> row perm[p]."""

    def __init__(self, name: str, files: list[Path], columns: dict[str, str], shuffle: bool = True,
                 wrapped_in: str | None = None):
        super().__init__(name)
        self.rows = ParquetRows(files, columns, wrapped_in)
        self.perm = seed_permutation(self.rows.n).tolist() if shuffle else None

    def num_examples(self) -> int:
        return self.rows.n

    def _global_row(self, p: int) -> int:
        return self.perm[p] if self.perm is not None else p

    def row(self, p: int) -> dict[str, Any]:
        return self.rows.row(self._global_row(p))

    def locate_example(self, p: int) -> tuple[str, int]:
        return self.rows.locate(self._global_row(p))

    def inputs(self) -> list[Path]:
        return [f.path for f in self.rows.files]
