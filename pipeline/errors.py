"""Errors for bad inputs: every one says what is wrong and where (file, row, field)."""
from __future__ import annotations

from pathlib import Path


class DataError(Exception):
    """A bad input row, file or recipe value.

    `where` is filled in as the error travels outward: a renderer knows only the
    field, a task knows the file and row, the orchestrator knows the task.
    """

    def __init__(self, reason: str, *, file: str | Path | None = None, row: int | None = None,
                 field: str | None = None, task: str | None = None):
        self.reason = reason
        self.file = str(file) if file is not None else None
        self.row = row
        self.field = field
        self.task = task
        super().__init__(self.describe())

    def located(self, *, file: str | Path | None = None, row: int | None = None,
                field: str | None = None, task: str | None = None) -> "DataError":
        """A copy with the missing location parts filled in (never overwrites known ones)."""
        return type(self)(
            self.reason,
            file=self.file if self.file is not None else file,
            row=self.row if self.row is not None else row,
            field=self.field if self.field is not None else field,
            task=self.task if self.task is not None else task,
        )

    def describe(self) -> str:
        parts = []
        if self.task is not None:
            parts.append(f"task {self.task}")
        if self.file is not None:
            parts.append(f"file {self.file}")
        if self.row is not None:
            parts.append(f"row {self.row}")
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        where = ", ".join(parts)
        return f"{where}: {self.reason}" if where else self.reason


class ConversationError(DataError):
    """A conversation that does not follow the chat template's rules."""


class SourceMissingError(DataError):
    """A dataset file that is not on disk; the reason says where it was looked for and how to get it."""


class RecipeError(DataError):
    """A recipe value that is missing or wrong; `field` is its dotted path in the TOML."""


class SnapshotError(DataError):
    """A snapshot whose files do not match its manifest, or that is incomplete."""
