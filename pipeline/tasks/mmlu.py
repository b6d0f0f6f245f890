"""MMLU (cais/mmlu): 4-way multiple choice rendered with nanochat's render_mc (reference §3.4)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from pipeline.errors import DataError
from pipeline.tasks.base import ParquetTask
from pipeline.tasks.source import find_source_files

PARAMS = {"split": ("str", None), "subset": ("str", "all"), "repo": ("str", "cais/mmlu"), "paths": ("paths?", None)}

LETTERS = ("A", "B", "C", "D")  # a tuple, as in nanochat's conversation dicts


def render_mc(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    """The letter follows its choice with no space (`- Paris=A`), so it tokenizes like the bare answer."""
    lines = [f"Multiple Choice question: {question}\n"]
    lines += [f"- {choice}={letter}\n" for letter, choice in zip(letters, choices)]
    lines.append("\nRespond only with the letter of the correct answer.")
    return "".join(lines)


class MMLU(ParquetTask):
    def __init__(self, name: str, data_dir: Path, split: str, subset: str, repo: str, paths=None):
        files = find_source_files(data_dir, repo, subset, split, paths)
        columns = {"question": "string", "choices": "list<string>", "answer": "int", "subject": "string"}
        super().__init__(name, files, columns, wrapped_in="train")

    def get_example(self, p: int) -> dict[str, Any]:
        row = self.row(p)
        question, choices, answer = row["question"], row["choices"], row["answer"]
        if not isinstance(question, str):
            raise DataError("question is null", field="question")
        if not isinstance(choices, list) or len(choices) != 4:
            got = len(choices) if isinstance(choices, list) else "none"
            raise DataError(f"MMLU needs exactly 4 choices, got {got}", field="choices")
        for k, choice in enumerate(choices):
            if not isinstance(choice, str):
                raise DataError("choice is null", field=f"choices[{k}]")
        if not isinstance(answer, int) or not 0 <= answer < 4:
            raise DataError(f"answer must be an index 0..3, got {answer!r}", field="answer")
        return {
            "messages": [
                {"role": "user", "content": render_mc(question, LETTERS, choices)},
                {"role": "assistant", "content": LETTERS[answer]},
            ],
            "subject": row["subject"],
            "letters": LETTERS,
        }
