"""Temporary names of the form `<name>.tmp-<pid>` and the removal of those a dead process left behind.

Every write goes to such a name and is renamed into place; a killed process leaves its temp behind.
The next run removes only temps whose process is gone, so two live processes never delete each
other's work (a pid in use by an unrelated process just keeps its temp until a later run).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

_PID = re.compile(r"\.tmp-(\d+)$")


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def remove_stale_temps(folder: Path, pattern: str = ".*.tmp-*") -> list[Path]:
    """Delete temps in `folder` matching `pattern` whose owning process is dead; returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.glob(pattern):
        m = _PID.search(p.name)
        if m is None or pid_alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed
