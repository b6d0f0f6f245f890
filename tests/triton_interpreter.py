"""Run Triton kernel checks on CPU in Triton's interpreter: TRITON_INTERPRET=1 must be set before Triton is
imported, so each check runs in a fresh Python process."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# what Triton 3.6's interpreter raises under NumPy 2.4 where a kernel loops over a runtime argument
NUMPY_INDEX_BUG = "only 0-dimensional arrays can be converted to Python scalars"


def run_interpreted(source: str, call: str, cuda_test: str) -> None:
    """Run `source` + `call` with the interpreter on; fail with its traceback. Skips where Triton is absent,
    and on CUDA machines, where `cuda_test` checks the compiled kernels instead."""
    pytest.importorskip("triton", reason="Triton is not installed (CUDA machines have it with torch)")
    if torch.cuda.is_available():  # older Triton interpreters choke on these kernels' runtime arguments
        pytest.skip(f"on CUDA the compiled kernels are checked instead ({cuda_test})")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", source + textwrap.dedent(call)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode and NUMPY_INDEX_BUG in proc.stderr and "triton/runtime/interpreter.py" in proc.stderr:
        import numpy
        import triton
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot index with a runtime argument under NumPy "
                    f"{numpy.__version__} (int() of a 1-element array; Triton 3.9 can); {cuda_test} checks the "
                    "compiled kernels on a GPU")
    assert proc.returncode == 0, proc.stderr[-3000:]
