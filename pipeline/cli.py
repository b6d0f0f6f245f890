"""The command lines' one convention for failures: one line on stderr, never a traceback.

    error: <what is wrong and where; what to do>     exit 2  (a fault the user can fix)
    interrupted; nothing was published              exit 130 (Ctrl-C, as a shell reports SIGINT)

Every CLI (`pipeline.*`, `trainer.train`) runs its body through `run_cli`, so the same faults read
the same everywhere: bad inputs (DataError and the CLI's own error types), a full disk, a
read-only or missing folder (OSError), and Ctrl-C.
"""
from __future__ import annotations

import errno
import re
import signal
import sys
from typing import Callable

from pipeline.errors import DataError

INTERRUPTED = "interrupted; nothing was published"
EXIT_ERROR, EXIT_INTERRUPTED = 2, 130

_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free some space and run again",
    errno.EDQUOT: "the disk quota is exceeded: free some space and run again",
    errno.EROFS: "the file system is read-only: point the command at a writable folder",
    errno.EACCES: "permission denied: point the command at a folder you can write, or fix its permissions",
    errno.EPERM: "operation not permitted: point the command at a folder you can write",
    errno.ENOTDIR: "a path component is a file, not a folder",
    errno.ENOENT: "no such file or folder",
    errno.EEXIST: "already exists and is not a folder",
}


def first_line(message, empty: str) -> str:
    """The first line of a message (the convention is one line), or `empty` when it has none."""
    text = str(message).strip()
    return text.splitlines()[0] if text else empty


def error(message: str, out=None) -> int:
    """Print `error: message` (first line only) and return exit code 2."""
    first = first_line(message, "failed")
    print(f"error: {first}", file=out or sys.stderr)
    return EXIT_ERROR


def _errno_of(e: OSError) -> int | None:
    """The errno, also when only the message carries it (pyarrow: "[Errno 28] Error writing bytes ...")."""
    if e.errno:
        return e.errno
    m = re.search(r"\[errno (\d+)\]", str(e), re.IGNORECASE)
    return int(m.group(1)) if m else None


def with_path(e: OSError, path) -> OSError:
    """The same fault as an OSError that names `path` (for writers whose errors do not)."""
    if e.filename is not None:
        return e
    text = first_line(e, type(e).__name__)
    return OSError(_errno_of(e) or 0, text, str(path))


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: the file it concerns, what happened, what to do; nothing was published."""
    text = first_line(e, type(e).__name__)
    hint = _OS_HINTS.get(_errno_of(e) or -1)
    if e.filename is not None:
        return f"{e.filename}: {hint or e.strerror or text}; nothing was published"
    return f"{text}{f' ({hint})' if hint else ''}; nothing was published"


def run_cli(body: Callable[[], int], errors: tuple[type[BaseException], ...] = (),
            interrupted: str = INTERRUPTED) -> int:
    """Run a CLI's body; map user faults to `error: …` (2) and Ctrl-C to one line (130).

    `errors` are the CLI's own exception types whose message is already the one line to show
    (DataError always is). Anything else is a bug and keeps its traceback.
    """
    try:
        return body()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not turn this into a traceback
        print(interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED
    except (DataError, *errors) as e:
        return error(str(e))
    except OSError as e:
        return error(describe_os_error(e))
