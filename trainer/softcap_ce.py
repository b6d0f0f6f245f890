"""The training loss, lm_head + softcap + cross-entropy, fused and over the supervised rows only.

Why: an SFT batch supervises only the assistant's tokens (the bench's synthetic rows: 60 %), yet the plain
expression unembeds every position, then runs softcap and cross-entropy over the whole (tokens, vocab) logits
in inductor's kernels, forward and backward. Here the rows with a target are gathered first, so lm_head's
three GEMMs shrink with them, and one Triton kernel (trainer.triton_kernels.softcap_ce_kernel) computes each
row's loss and overwrites its logits with d loss / d logits during the forward; the backward is the two
GEMMs on that buffer, scaled by the incoming gradient in fp32. Measured on an H200 (bench/RESULTS.md, step 6):
the d12 loss forward + backward 11.4 ms against 21.8 at 60 % supervised (18.7 against 22.6 with every row
supervised), a d12 step 6.1 % faster and 3.6 GiB smaller in a same-process A/B.

Each direction is a torch.library custom op (opaque to torch.compile, with fake kernels), joined by an
autograd Function. The forward op reads the number of supervised rows to the host: one synchronisation per
micro-batch, which is also where an out-of-vocabulary target is caught (and which a CUDA graph could not
capture: training runs without them). trainer.model's LOSS_KERNEL chooses; elsewhere (CPU, CI, evaluation)
the plain expression runs.
"""
from __future__ import annotations

import functools
import math

import torch

from trainer.common import import_error

# Columns per program step: measured on an H200 over 39,321 rows of 32,768 (bench/bench_softcap_ce.py), 8192
# with 8 warps took 1.80 ms (2.9 TB/s of one read and one write); a whole row in registers (one tanh per
# element instead of two) 2.1-2.3 ms.
BLOCK = 8192
WARPS = 8
FAST_TANH = True  # the hardware's tanh.approx on CUDA; False: 1 - 2 / (e^2x + 1), as in the interpreter
MAX_SOFTCAP = 60.0  # e^cap summed over a vocabulary must stay finite in fp32 (the kernel keeps no running max)


@functools.cache
def load_error() -> str | None:
    """None when the Triton kernel imports; else why not."""
    return import_error("trainer.triton_kernels")


@torch.compiler.assume_constant_result  # asked inside the compiled forward: a constant, not traced
def available() -> bool:
    return load_error() is None


def softcap_ce_rows(logits: torch.Tensor, targets: torch.Tensor, vocab: int, softcap: float, *,
                    block: int | None = None, warps: int | None = None) -> torch.Tensor:
    """Each row of logits z (n, cols), contiguous, its first `vocab` columns real: the row's loss
    logsumexp(s) - s[target] with s = softcap * tanh(z / softcap), in fp32 (n,). Overwrites logits with
    d loss / d z (zero in the padding columns). targets (n,) int64, each in [0, vocab)."""
    n, cols = logits.shape
    if not (logits.is_contiguous() and targets.shape == (n,) and 0 < vocab <= cols and 0 < softcap <= MAX_SOFTCAP):
        raise ValueError(f"softcap_ce_rows: logits {tuple(logits.shape)} (contiguous: {logits.is_contiguous()}), "
                         f"targets {tuple(targets.shape)}, vocab {vocab}, softcap {softcap} (at most {MAX_SOFTCAP})")
    losses = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return losses
    import trainer.triton_kernels as kernels
    block = min(block or BLOCK, _next_pow2(cols))
    kernels.softcap_ce_kernel[(n,)](logits, targets, losses, vocab, cols, 1.0 / softcap, softcap * math.log2(math.e),
                                    BLOCK=block, ONE_PASS=block >= cols, FAST_TANH=FAST_TANH and logits.is_cuda,
                                    num_warps=warps or WARPS)
    return losses


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _supervised_rows(targets: torch.Tensor, vocab: int) -> tuple[torch.Tensor, int]:
    """The rows with a target, first (in order), then the rest; and how many there are. Targets other than
    the ignore index -1 must be token ids of the vocabulary."""
    supervised, outside = targets >= 0, (targets < -1) | (targets >= vocab)
    rows = torch.sort((~supervised).to(torch.int32), stable=True).indices
    n, bad = torch.stack([supervised.sum(), outside.sum()]).tolist()
    if bad:
        first = int(torch.nonzero(outside)[0, 0])
        raise ValueError(f"softcap_ce: {bad} targets are neither -1 (ignored) nor a token id below the vocabulary "
                         f"size {vocab}: the first is {int(targets[first])} at flat position {first}")
    return rows, n


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in fp32 (cuBLAS writes fp32 straight from 16-bit inputs)."""
    return torch.mm(a, b, out_dtype=torch.float32) if a.is_cuda and a.dtype != torch.float32 \
        else torch.mm(a.float(), b.float())


@torch.library.custom_op("nanosft::softcap_ce_fwd", mutates_args=())
def _softcap_ce_fwd_op(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab: int,
                       softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (summed loss fp32, buffer (N, padded vocab) whose first n rows hold d loss / d logits of the
    supervised rows, the row order (supervised first), n as a CPU int64 scalar)."""
    rows, n = _supervised_rows(targets, vocab)
    buffer = x.new_empty((x.shape[0], w.shape[0]))
    grad = buffer[:n]
    torch.mm(x[rows[:n]], w.t(), out=grad)
    losses = softcap_ce_rows(grad, targets[rows[:n]], vocab, softcap)
    return losses.sum(), buffer, rows, torch.tensor(n, dtype=torch.int64)


@_softcap_ce_fwd_op.register_fake
def _(x, w, targets, vocab, softcap):
    return (x.new_empty((), dtype=torch.float32), x.new_empty((x.shape[0], w.shape[0])),
            targets.new_empty(targets.shape), torch.empty((), dtype=torch.int64, device="cpu"))


@torch.library.custom_op("nanosft::softcap_ce_bwd", mutates_args=())
def _softcap_ce_bwd_op(g: torch.Tensor, buffer: torch.Tensor, rows: torch.Tensor, n: torch.Tensor,
                       x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d x, d w) for the incoming gradient g of the summed loss: the unsupervised rows' d x is zero."""
    k = int(n)  # a CPU tensor: no synchronisation
    grad, picked = buffer[:k], rows[:k]
    dx = torch.zeros_like(x)
    dx[picked] = (_mm32(grad, w) * g).to(x.dtype)
    dw = (_mm32(grad.t(), x[picked]) * g).to(w.dtype)
    return dx, dw


@_softcap_ce_bwd_op.register_fake
def _(g, buffer, rows, n, x, w):
    return torch.empty_like(x), torch.empty_like(w)


class _SoftcapCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, targets, vocab, softcap):
        loss, buffer, rows, n = torch.ops.nanosft.softcap_ce_fwd(x, w, targets, vocab, softcap)
        ctx.save_for_backward(x, w, buffer, rows, n)
        return loss

    @staticmethod
    def backward(ctx, g):
        x, w, buffer, rows, n = ctx.saved_tensors
        dx, dw = torch.ops.nanosft.softcap_ce_bwd(g, buffer, rows, n, x, w)
        return dx, dw, None, None, None


def softcap_ce(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab: int, softcap: float) -> torch.Tensor:
    """Summed cross-entropy of softcap * tanh((x w^T)[:, :vocab] / softcap) against targets (ignore index -1),
    as trainer.model computes it, with its gradient. x (..., C) and w (padded vocab, C) in one 16-bit dtype
    on a GPU where Triton runs; targets x.shape[:-1]."""
    if targets.shape != x.shape[:-1]:
        raise ValueError(f"softcap_ce: targets {tuple(targets.shape)} do not match x {tuple(x.shape)}")
    return _SoftcapCE.apply(x.reshape(-1, x.shape[-1]).contiguous(), w.contiguous(), targets.reshape(-1),
                            vocab, float(softcap))
