"""Temporary names of the form `<name>.tmp-<pid>` and the removal of those a dead process left behind.

Every write goes to such a name and is renamed into place; a killed process leaves its temp behind.
The next run removes only temps whose process is gone, so two live processes never delete each
other's work (a pid in use by an unrelated process just keeps its temp until a later run).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.layout import is_stale_temp


def temp_path(path: Path) -> Path:
    """The temporary name this process writes `path` under: `.<name>.tmp-<pid>` beside it."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Temp name + fsync + rename: a reader (or a killed writer) never leaves half a file. Removes the temps
    of this path that dead writers left."""
    path = Path(path)
    remove_stale_temps(path.parent, f".{path.name}.tmp-*")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def link_into_place(src: Path, dst: Path) -> None:
    """Rename a finished temp to its final name, never over an existing file: a hard link fails if `dst`
    exists (no window in which another file is replaced); without hard links, check, then rename.
    Raises FileExistsError when `dst` is there."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links
        if Path(dst).exists():
            raise FileExistsError(dst) from None
        os.replace(src, dst)
        return
    Path(src).unlink()


def remove_stale_temps(folder: Path, pattern: str = ".*.tmp-*") -> list[Path]:
    """Delete temps in `folder` matching `pattern` whose owning process is dead; returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.glob(pattern):
        if not is_stale_temp(p):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed
