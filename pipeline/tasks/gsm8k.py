"""GSM8K (openai/gsm8k): grade-school maths with calculator calls turned into python parts (reference §3.6)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pipeline.errors import DataError
from pipeline.tasks.base import ParquetTask
from pipeline.tasks.source import find_source_files

PARAMS = {"split": ("str", None), "subset": ("str", "main"), "repo": ("str", "openai/gsm8k"), "paths": ("paths?", None)}

_CALL = re.compile(r"(<<[^>]+>>)")


def answer_parts(answer: str) -> list[dict[str, str]]:
    """Split an answer at `<<expr=result>>` calls: text, then python(expr) + python_output(result), ...

    Empty text segments from the split are kept (nanochat keeps them; they render to no tokens).
    """
    parts = []
    for segment in _CALL.split(answer):
        if segment.startswith("<<") and segment.endswith(">>"):
            inner = segment[2:-2]
            expr, result = inner.rsplit("=", 1) if "=" in inner else (inner, "")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        else:
            parts.append({"type": "text", "text": segment})
    return parts


class GSM8K(ParquetTask):
    def __init__(self, name: str, data_dir: Path, split: str, subset: str, repo: str, paths=None):
        files = find_source_files(data_dir, repo, subset, split, paths)
        super().__init__(name, files, {"question": "string", "answer": "string"})

    def get_example(self, p: int) -> dict[str, Any]:
        row = self.row(p)
        for key in ("question", "answer"):
            if not isinstance(row[key], str):
                raise DataError(f"{key} is null", field=key)
        return {"messages": [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": answer_parts(row["answer"])},
        ]}
