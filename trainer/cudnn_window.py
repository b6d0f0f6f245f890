"""Sliding-window attention as cuDNN's diagonal band: the short-window training layers on Hopper.

Why: FlexAttention runs nanochat's short window (513 keys at T=2048) at 2.70 ms fwd+bwd for B=32 H=10 D=128
on an H200, while cuDNN's causal kernel does the whole causal triangle, 2.3x the work, in 3.02 ms
(bench/RESULTS.md). cuDNN's fused attention takes a left diagonal bound and skips the tiles outside the band;
PyTorch's SDPA does not expose that bound, NVIDIA's cuDNN frontend does (pip package nvidia-cudnn-frontend,
the optional `.[cuda]` extra). Its torch op `torch.ops.cudnn.sdpa_fwd` carries its own autograd (cuDNN's
backward over the forward's softmax statistics) and a fake kernel, so torch.compile keeps it as one opaque
kernel in the graph. Measured on an H200 (bench/RESULTS.md, step 3): the window-512 layer 2.20 ms against
flex's 2.74, a d20 step 1.7 % faster in a same-process A/B. Where the frontend is absent (CPU, CI, no extra),
`available()` is False and the model keeps FlexAttention.
"""
from __future__ import annotations

import functools

import torch

from trainer.common import import_error


@functools.cache
def load_error() -> str | None:
    """None when the frontend's torch op is registered; else why not (import or cuDNN-loading error)."""
    return import_error("cudnn.sdpa.fwd.torch_op")  # registers torch.ops.cudnn.sdpa_fwd (autograd + fake)


@torch.compiler.assume_constant_result  # asked inside the compiled forward: a constant, not traced
def available() -> bool:
    return load_error() is None


def band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, left: int) -> torch.Tensor:
    """q, k, v (B, H, T, D) 16-bit CUDA -> (B, H, T, D): query t attends keys t-left..t, as the model's window
    mask does. cuDNN's left bound counts the keys (kv > q - bound), so it is left + 1. The softmax statistics
    are returned for the backward, which consumes them."""
    out, _ = torch.ops.cudnn.sdpa_fwd(q, k, v, q.size(-1) ** -0.5, is_causal=True, window_left=left + 1,
                                      return_lse=True)
    return out
