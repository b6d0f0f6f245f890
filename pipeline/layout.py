"""Where nanosft's own files live in a data dir, apart from the inputs that it only reads.

    <data_dir>/                      inputs, read and never written: a nanochat base dir's task_data/,
                                     tokenizer/, base_checkpoints/, identity_conversations.jsonl, word lists
    <data_dir>/nanosft/demo/         the demo's generated sources, in nanochat's cache layout below it
    <data_dir>/nanosft/cache/render/ the render cache (content-addressed)
    <data_dir>/nanosft/tokenizers/   tokenizers that a recipe trains
    <data_dir>/nanosft/snapshots/    snapshots

One folder that nanosft owns, so that a data dir can be a user's nanochat base dir: nothing nanosft makes
lands beside (or over) that user's files, and deleting `nanosft/` removes all of it. SFT checkpoints are
the one exception: they go where nanochat looks for them (`chatsft_checkpoints/<tag>/`, trainer.checkpoint),
as new files only.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

OWNED = "nanosft"


def owned_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / OWNED


def demo_dir(data_dir: str | Path) -> Path:
    return owned_dir(data_dir) / "demo"


def render_cache_dir(data_dir: str | Path) -> Path:
    return owned_dir(data_dir) / "cache" / "render"


def tokenizers_dir(data_dir: str | Path) -> Path:
    return owned_dir(data_dir) / "tokenizers"


def snapshots_dir(data_dir: str | Path) -> Path:
    return owned_dir(data_dir) / "snapshots"


def source_root(data_dir: str | Path, is_demo: bool) -> Path:
    """Where a recipe's tasks read their files: the demo reads its own generated folder, every other recipe
    the data dir itself (a nanochat base dir's cache layout)."""
    return demo_dir(data_dir) if is_demo else Path(data_dir)


def data_dir_of(snapshot: str | Path) -> Path | None:
    """The data dir a snapshot folder was built in (<data_dir>/nanosft/snapshots/<name>), or None."""
    snapshot = Path(snapshot).resolve()
    if snapshot.parent.name == "snapshots" and snapshot.parent.parent.name == OWNED:
        return snapshot.parents[2]
    return None


_TMP_PID = re.compile(r"\.tmp-(\d+)$")


def is_stale_temp(path: Path) -> bool:
    """A `<name>.tmp-<pid>` left by a process that no longer runs: safe to remove. One of a live process
    (another prepare running now) is that process's to finish or remove."""
    m = _TMP_PID.search(Path(path).name)
    if not m:
        return False
    pid = int(m.group(1))
    if pid == os.getpid():
        return True  # ours, from an earlier attempt in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False
