"""The dense MLP, c_proj(relu(c_fc(x))^2), with its activation fused into two Triton GEMMs (Hopper, TMA).

Why: on an H200, inductor ran relu^2 as separate passes over the (tokens, 4C) activation: two in the forward
(read h, write a), three in the backward (read d a and h, write d h), 15 ms of a 378 ms d20 micro-batch at
the card's bandwidth, with h kept for the backward (bench/RESULTS.md, step 4). Only a GEMM epilogue removes
them. Here c_fc's GEMM writes a = relu(x W1^T)^2 directly, and the backward's d a = g W2 GEMM writes
d h = d a * 2 relu(h) directly, with relu(h) = sqrt(a) read from the forward's output, so h is never kept
and d a never exists. The other three GEMMs stay cuBLAS. Measured: a d20 step 2.2 % faster and 12 GiB
smaller in a same-process A/B (step 5).

Each fused GEMM is a torch.library custom op (opaque to torch.compile, fake kernels for tracing) under one
autograd Function; trainer.model's MLP_KERNEL chooses, and the plain expression runs elsewhere.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from trainer.common import import_error


class GemmConfig(NamedTuple):
    """Tile shape and schedule of relu2_matmul_kernel."""
    bm: int = 128
    bn: int = 256
    bk: int = 64
    group_m: int = 8
    stages: int = 3
    warps: int = 8
    subtile: bool = True
    warp_specialize: bool = False


# Measured on an H200 at d20's shapes (bench/bench_relu2_mlp.py; bench/RESULTS.md, step 5): the forward at
# 724 TFLOP/s with 4 stages (cuBLAS's plain GEMM: 714), the backward's at 616 with warp specialization (its
# epilogue also reads a), against 561 without.
FWD_CONFIG = GemmConfig(stages=4)
GRAD_CONFIG = GemmConfig(stages=3, warp_specialize=True)


@functools.cache
def load_error() -> str | None:
    """None when the kernels and Triton's host-side TMA descriptors import; else why not."""
    return import_error("trainer.triton_kernels", "triton.tools.tensor_descriptor")


@torch.compiler.assume_constant_result  # asked inside the compiled forward: a constant, not traced
def available() -> bool:
    return load_error() is None


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _check(name: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dim() != 2 or t.stride(-1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            raise ValueError(f"{name}: operand {tuple(t.shape)} (strides {t.stride()}) must be a 2-d matrix "
                             "with a unit last stride and 16-byte aligned rows (TMA)")


def relu2_matmul(a: torch.Tensor, b: torch.Tensor, aux: torch.Tensor | None = None, *, b_kmajor: bool,
                 config: GemmConfig | None = None) -> torch.Tensor:
    """relu(a @ B)^2, or with aux (a @ B) * 2 sqrt(aux); B = b.T when b_kmajor (b is (N, K), a Linear's weight)
    else b (K, N). a (M, K) -> (M, N) in a's dtype. config: FWD_CONFIG or GRAD_CONFIG when None."""
    _check("relu2_matmul", a, b, *(() if aux is None else (aux,)))
    M, K = a.shape
    N = b.shape[0] if b_kmajor else b.shape[1]
    if (b.shape[1] if b_kmajor else b.shape[0]) != K or (aux is not None and tuple(aux.shape) != (M, N)):
        raise ValueError(f"relu2_matmul: shapes a {tuple(a.shape)}, b {tuple(b.shape)} (b_kmajor={b_kmajor}), "
                         f"aux {None if aux is None else tuple(aux.shape)} do not fit")
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    from triton.tools.tensor_descriptor import TensorDescriptor

    import trainer.triton_kernels as kernels
    cfg = config or (FWD_CONFIG if aux is None else GRAD_CONFIG)
    store = [cfg.bm, cfg.bn // 2 if cfg.subtile else cfg.bn]
    a_desc = TensorDescriptor.from_tensor(a, [cfg.bm, cfg.bk])
    b_desc = TensorDescriptor.from_tensor(b, [cfg.bn, cfg.bk] if b_kmajor else [cfg.bk, cfg.bn])
    c_desc = TensorDescriptor.from_tensor(c, store)
    aux_desc = c_desc if aux is None else TensorDescriptor.from_tensor(aux, store)
    tiles = -(-M // cfg.bm) * -(-N // cfg.bn)
    sms = min(_num_sms(a.device), tiles)
    kernels.relu2_matmul_kernel[(sms,)](
        a_desc, b_desc, c_desc, aux_desc, M, N, K, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GROUP_M=cfg.group_m,
        NUM_SMS=sms, B_KMAJOR=b_kmajor, GRAD=aux is not None, SUBTILE=cfg.subtile,
        WARP_SPECIALIZE=cfg.warp_specialize, num_stages=cfg.stages, num_warps=cfg.warps)
    return c


@torch.library.custom_op("nanosft::relu2_fc", mutates_args=())
def _relu2_fc_op(x: torch.Tensor, w_fc: torch.Tensor) -> torch.Tensor:
    return relu2_matmul(x, w_fc, b_kmajor=True)


@_relu2_fc_op.register_fake
def _(x, w_fc):
    return x.new_empty((x.shape[0], w_fc.shape[0]))


@torch.library.custom_op("nanosft::relu2_fc_grad", mutates_args=())
def _relu2_fc_grad_op(g: torch.Tensor, w_proj: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """(g @ W2) * 2 sqrt(a), reading w_proj = W2 (K, N) in place (a K-major copy measured no faster)."""
    return relu2_matmul(g, w_proj, a, b_kmajor=False)


@_relu2_fc_grad_op.register_fake
def _(g, w_proj, a):
    return a.new_empty(a.shape)


class _Relu2MLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_fc, w_proj):
        a = torch.ops.nanosft.relu2_fc(x, w_fc)
        ctx.save_for_backward(x, w_fc, w_proj, a)
        return a @ w_proj.t()

    @staticmethod
    def backward(ctx, g):
        x, w_fc, w_proj, a = ctx.saved_tensors
        g = g.contiguous()
        dh = torch.ops.nanosft.relu2_fc_grad(g, w_proj, a)
        return dh @ w_fc, dh.t() @ x, g.t() @ a


def relu2_mlp(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> torch.Tensor:
    """x (..., C), w_fc (4C, C), w_proj (C, 4C), all one 16-bit dtype on a Hopper GPU ->
    relu(x w_fc^T)^2 w_proj^T, as trainer.model's MLP computes it, with its gradient."""
    lead = x.shape[:-1]
    out = _Relu2MLP.apply(x.reshape(-1, x.shape[-1]).contiguous(), w_fc, w_proj)
    return out.view(*lead, out.shape[-1])
