"""Run model-written Python (HumanEval) in a fresh interpreter, the way nanochat master does (reference §9.4).

NOT a security sandbox. The program runs as this user, in a throw-away working directory, with a
scrubbed environment, stdin closed, an address-space limit, a wall-clock limit, and a guard that
replaces destructive functions (os.remove, shutil.rmtree, subprocess.Popen, ...) by None before the
program's first line. That stops accidents by a weak model, not an adversary: run untrusted code in a
container.

The resource limits are set by the child itself, in the guard's first lines (before any program code
runs), rather than through `subprocess`'s `preexec_fn`: `preexec_fn` may deadlock when the parent has
threads, and the trainer has a data-loading thread.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

_GUARD = r'''
import sys as _sys
if _sys.platform.startswith("linux"):  # RLIMIT_AS is not enforced on macOS
    import resource as _resource
    for _limit in (_resource.RLIMIT_AS, _resource.RLIMIT_DATA):
        _resource.setrlimit(_limit, ({mem}, {mem}))
    _resource.setrlimit(_resource.RLIMIT_CORE, (0, 0))
    _resource.setrlimit(_resource.RLIMIT_FSIZE, ({fsize}, {fsize}))
    del _resource, _limit

import builtins as _builtins, faulthandler as _faulthandler, os as _os, shutil as _shutil, subprocess as _subprocess
_faulthandler.disable()
for _name in ("kill", "killpg", "system", "putenv", "unsetenv", "remove", "removedirs", "rmdir", "unlink",
              "rename", "renames", "replace", "truncate", "fchdir", "chdir", "setuid", "fork", "forkpty",
              "fchmod", "fchown", "chmod", "chown", "lchown", "lchmod", "lchflags", "chroot", "getcwd",
              "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe",
              "spawnv", "spawnve", "spawnl", "spawnle", "posix_spawn", "posix_spawnp", "popen"):
    if hasattr(_os, _name):
        setattr(_os, _name, None)
_shutil.rmtree = _shutil.move = _shutil.chown = None
_subprocess.Popen = None
_builtins.exit = _builtins.quit = _builtins.help = None
for _mod in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    _sys.modules[_mod] = None
del _builtins, _faulthandler, _os, _shutil, _subprocess, _name, _mod, _sys
'''

MiB = 1024 * 1024


def guarded_program(code: str, max_memory_bytes: int, max_file_bytes: int = 16 * MiB) -> str:
    """The source that actually runs: the guard, then `code` unchanged."""
    return _GUARD.format(mem=int(max_memory_bytes), fsize=int(max_file_bytes)) + "\n" + code


def execute_code(code: str, timeout: float = 5.0, max_memory_bytes: int = 256 * MiB) -> bool:
    """True iff `code` runs to completion (exit status 0) within `timeout` seconds and the memory limit.

    The interpreter is this one (`sys.executable`), started isolated (`-I`: no PYTHONPATH, no user
    site-packages), in a fresh temporary directory that is removed afterwards. Output is discarded."""
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    with tempfile.TemporaryDirectory(prefix="nanosft-exec-") as tmp:
        program = Path(tmp) / "program.py"
        program.write_text(guarded_program(code, max_memory_bytes), encoding="utf-8")
        env = {"PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-I", "-B", str(program)], cwd=tmp, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # its own process group: a timeout kills all of it
        try:
            return proc.wait(timeout=timeout) == 0
        except subprocess.TimeoutExpired:
            return False
        finally:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
