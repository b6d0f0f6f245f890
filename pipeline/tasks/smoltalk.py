"""SmolTalk (HuggingFaceTB/smol-smoltalk): general chat, the bulk of nanochat's SFT mixture (reference §3.3)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.tasks.base import ParquetTask, check_smoltalk_messages
from pipeline.tasks.source import find_source_files

PARAMS = {"split": ("str", None), "repo": ("str", "HuggingFaceTB/smol-smoltalk"), "subset": ("str", "default"),
          "paths": ("paths?", None)}


class SmolTalk(ParquetTask):
    """Rows' `messages` as they are (a leading system message is kept; the renderer merges it)."""

    def __init__(self, name: str, data_dir: Path, split: str, repo: str, subset: str, paths=None):
        files = find_source_files(data_dir, repo, subset, split, paths)
        super().__init__(name, files, {"messages": "messages"})

    def get_example(self, p: int) -> dict[str, Any]:
        messages = self.row(p)["messages"]
        check_smoltalk_messages(messages)
        return {"messages": messages}
