"""CustomJSON: one JSON array of messages per line, e.g. nanochat's identity conversations (reference §3.8).

Validated whole at construction, as nanochat does. Unlike nanochat, a missing file is an error rather
than a task that silently has no rows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import DataError, SourceMissingError
from pipeline.tasks.base import Task, check_alternating
from pipeline.tasks.source import fetch_command, jsonl_lines

PARAMS = {"path": ("str", "identity_conversations.jsonl")}

IDENTITY_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"


class CustomJSON(Task):
    def __init__(self, name: str, data_dir: Path, path: str):
        super().__init__(name)
        self.path = Path(path) if Path(path).is_absolute() else Path(data_dir) / path
        if not self.path.is_file():
            hint = f" (nanochat's identity file; to download it: {fetch_command(data_dir)})" \
                if path == "identity_conversations.jsonl" else ""
            raise SourceMissingError(f"conversation file {self.path} does not exist{hint}", file=self.path)
        self.conversations: list[list[dict] | DataError] = []  # a bad line keeps its error until it is read
        self.lines: list[int] = []
        for lineno, messages in jsonl_lines(self.path):
            if isinstance(messages, DataError):  # not JSON: raised when the row is read
                ...
            elif not isinstance(messages, list):
                messages = DataError(f"line {lineno} (1-based) must be a JSON array of messages, got "
                                     f"{type(messages).__name__}", file=self.path, row=lineno, task=name)
            else:
                try:
                    check_alternating(messages, 0, 2)
                except DataError as e:
                    messages = e.located(file=self.path, row=lineno, task=name)
            self.conversations.append(messages)
            self.lines.append(lineno)

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, p: int) -> dict[str, Any]:
        messages = self.conversations[p]
        if isinstance(messages, DataError):
            raise messages
        return {"messages": [dict(m) for m in messages]}  # copies: callers may mutate

    def locate_example(self, p: int) -> tuple[str, int]:
        return str(self.path), self.lines[p]

    def inputs(self) -> list[Path]:
        return [self.path]
