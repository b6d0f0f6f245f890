"""Rotary + QK norm of q and k as Triton kernels (trainer.triton_kernels), for the training path.

Why: inductor's kernels for the model's `norm(apply_rotary(t, cos, sin)) * 1.2` on q and k (forward, backward
and the halves' slice backward) took 135 ms of a d20 step of 8 micro-batches on an H200 and keep the
pre-rotary q and k for the backward (bench/RESULTS.md, step 4). Rotation keeps each row's norm, so with
y = scale * r / rms(r) the backward can recover r from y and the row's 1/rms: `rotary_norm` keeps only its
output (which attention keeps anyway) and one fp32 per row. Measured: 71 ms for the same work, a d20 step
1.8 % faster in a same-process A/B, 6 GiB less at the peak.

A torch.library custom op per direction (opaque to torch.compile, with fake kernels for tracing), joined
by an autograd Function. Where Triton is absent (CPU, CI) `available()` is False and the model keeps its
plain expression; trainer.model's ROTARY_NORM_KERNEL chooses.
"""
from __future__ import annotations

import functools

import torch

from trainer.common import import_error


@functools.cache
def load_error() -> str | None:
    """None when the Triton kernels import; else why not."""
    return import_error("trainer.triton_kernels")


@torch.compiler.assume_constant_result  # asked inside the compiled forward: a constant, not traced
def available() -> bool:
    return load_error() is None


def _kernels():
    import trainer.triton_kernels as kernels
    return kernels


def _check_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    B, T, H, D = x.shape
    if x.stride(-1) != 1 or D % 2 or D & (D - 1) or tuple(cos.shape) != (T, D // 2) or cos.shape != sin.shape \
            or not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError(f"rotary_norm: x {tuple(x.shape)} (strides {x.stride()}) needs a unit last stride and "
                         f"a power-of-two head dim; cos/sin {tuple(cos.shape)}/{tuple(sin.shape)} must be "
                         f"contiguous ({T}, {D // 2})")


def rotary_norm_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: float,
                        rows: int = 16, num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T, H, D), any strides but the last -> (y contiguous (B, T, H, D) in x's dtype, inv (B, T, H) fp32):
    y = scale * rms_norm(rotary(x)), rms_norm's default eps (fp32's), inv = 1 / rms of each rotated row."""
    _check_rows(x, cos, sin)
    B, T, H, D = x.shape
    y = torch.empty((B, T, H, D), dtype=x.dtype, device=x.device)
    inv = torch.empty((B, T, H), dtype=torch.float32, device=x.device)
    n = B * T * H
    if n:
        _kernels().rotary_norm_fwd_kernel[(-(-n // rows),)](
            x, cos, sin, y, inv, n, H, T, *x.stride()[:3], float(scale), torch.finfo(torch.float32).eps,
            HALF=D // 2, ROWS=rows, num_warps=num_warps)
    return y, inv


def rotary_norm_backward(dy: torch.Tensor, y: torch.Tensor, inv: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, scale: float, rows: int = 16, num_warps: int = 4) -> torch.Tensor:
    """d x from d y (any strides but the last) and the forward's y and inv -> contiguous (B, T, H, D)."""
    _check_rows(dy, cos, sin)
    B, T, H, D = dy.shape
    dx = torch.empty((B, T, H, D), dtype=dy.dtype, device=dy.device)
    n = B * T * H
    if n:
        _kernels().rotary_norm_bwd_kernel[(-(-n // rows),)](
            dy, y.contiguous(), inv.contiguous(), cos, sin, dx, n, H, T, *dy.stride()[:3], float(scale),
            HALF=D // 2, ROWS=rows, num_warps=num_warps)
    return dx


@torch.library.custom_op("nanosft::rotary_norm", mutates_args=())
def _rotary_norm_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return rotary_norm_forward(x, cos, sin, scale)


@_rotary_norm_op.register_fake
def _(x, cos, sin, scale):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("nanosft::rotary_norm_backward", mutates_args=())
def _rotary_norm_backward_op(dy: torch.Tensor, y: torch.Tensor, inv: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor, scale: float) -> torch.Tensor:
    return rotary_norm_backward(dy, y, inv, cos, sin, scale)


@_rotary_norm_backward_op.register_fake
def _(dy, y, inv, cos, sin, scale):
    return dy.new_empty(dy.shape)


class _RotaryNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, scale: float):
        y, inv = torch.ops.nanosft.rotary_norm(x, cos, sin, scale)
        ctx.save_for_backward(y, inv, cos, sin)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        y, inv, cos, sin = ctx.saved_tensors
        return torch.ops.nanosft.rotary_norm_backward(dy, y, inv, cos, sin, ctx.scale), None, None, None


def rotary_norm(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: float) -> torch.Tensor:
    """x (B, T, H, D) CUDA, cos/sin (T, D/2) -> scale * rms_norm(apply_rotary(x)), as trainer.model computes
    q and k, with its gradient. The rotation keeps each row's norm, so the backward needs only y and 1/rms."""
    return _RotaryNorm.apply(x, cos, sin, scale)
