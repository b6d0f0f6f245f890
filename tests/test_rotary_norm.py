"""trainer.rotary_norm: the Triton rotary + QK norm against the model's plain expression, values and gradients.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before Triton is imported, so each
check runs in its own Python process); where Triton is not installed those checks skip. On CUDA the same
checks run on the compiled kernels, at the model's real sizes."""
from __future__ import annotations

import pytest
import torch

from tests.triton_interpreter import run_interpreted
from trainer import rotary_norm

# The model's plain expression and the checks, shared by the interpreted and the CUDA tests.
CHECKS = '''
import torch
from trainer import rotary_norm
from trainer.model import apply_rotary, norm, rotary_tables


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def check_rotary_norm(B, T, H, D, dtype, device):
    """y and dx against autograd through the model's rotary + norm * 1.2 in fp32, with a strided x (a slice of
    a wider projection) and a strided dy (a transposed attention gradient)."""
    g = torch.Generator(device="cpu").manual_seed(T)
    wide = torch.randn(B, T, H * D + 8, generator=g).to(dtype).to(device)
    x = wide[..., :H * D].unflatten(-1, (H, D))
    dy = torch.randn(B, H, T, D, generator=g).to(dtype).to(device).transpose(1, 2)
    cos, sin = rotary_tables(T, D, device)
    ref_in = x.float().clone().requires_grad_()
    ref = norm(apply_rotary(ref_in, cos, sin)) * 1.2
    ref.backward(dy.float())
    c2, s2 = cos[0, :, 0].contiguous(), sin[0, :, 0].contiguous()
    y, inv = rotary_norm.rotary_norm_forward(x, c2, s2, 1.2)
    dx = rotary_norm.rotary_norm_backward(dy, y, inv, c2, s2, 1.2)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert y.dtype == dtype and y.is_contiguous() and rel(y, ref) < tol, rel(y, ref)
    assert rel(dx, ref_in.grad) < 2 * tol, rel(dx, ref_in.grad)
    assert torch.allclose(inv, ref_in.detach().pow(2).mean(-1).add(torch.finfo(torch.float32).eps).rsqrt(),
                          rtol=1e-2 if dtype != torch.float32 else 1e-5)


def check_through_autograd_and_compile(device):
    """Projection -> rotary_norm -> a loss, eager and compiled, against the plain path in fp32: the autograd
    Function and the fake kernels under torch.compile."""
    torch.manual_seed(0)
    B, T, H, D, C = 2, 16, 2, 16, 32
    cos, sin = rotary_tables(T, D, device)
    c2, s2 = cos[0, :, 0].contiguous(), sin[0, :, 0].contiguous()
    target = torch.randn(B, T, H, D, device=device)

    def fused(x, wq):
        return ((rotary_norm.rotary_norm((x @ wq.t()).view(B, T, H, D), c2, s2, 1.2) - target) ** 2).sum()

    def plain(x, wq):
        return ((norm(apply_rotary((x @ wq.t()).view(B, T, H, D), cos, sin)) * 1.2 - target) ** 2).sum()

    inputs = [torch.randn(B * T, C, device=device), torch.randn(H * D, C, device=device) * 0.2]
    results = []
    for fn in (plain, fused, torch.compile(fused, dynamic=False)):
        leaves = [p.clone().requires_grad_() for p in inputs]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in leaves])
    for ref, eager, compiled in zip(*results):
        assert rel(eager, ref) < 1e-5 and rel(compiled, ref) < 1e-5, (rel(eager, ref), rel(compiled, ref))
'''


def _interpreted(call: str) -> None:
    run_interpreted(CHECKS, call, "test_rotary_norm_on_cuda_at_the_model_sizes")


def test_rotary_norm_kernels_interpreted():
    _interpreted("""
        for dtype in (torch.float32, torch.bfloat16):
            check_rotary_norm(B=2, T=24, H=3, D=16, dtype=dtype, device="cpu")
    """)


def test_rotary_norm_through_autograd_and_compile_interpreted():
    _interpreted("check_through_autograd_and_compile('cpu')")


def test_rotary_norm_refuses_shapes_it_does_not_serve():
    """Checked before any kernel runs (no Triton needed): the message names the shapes."""
    with pytest.raises(ValueError, match=r"rotary_norm: x \(1, 4, 2, 12\).*power-of-two head dim"):
        rotary_norm.rotary_norm_forward(torch.zeros(1, 4, 2, 12), torch.zeros(4, 6), torch.zeros(4, 6), 1.2)
    with pytest.raises(ValueError, match=r"cos/sin \(4, 8\)/\(4, 8\) must be contiguous \(8, 8\)"):
        rotary_norm.rotary_norm_forward(torch.zeros(1, 8, 2, 16), torch.zeros(4, 8), torch.zeros(4, 8), 1.2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rotary_norm_on_cuda_at_the_model_sizes():
    """The compiled kernels at d20's sizes (head dim 128, 10 heads, T=2048), bf16, and through torch.compile."""
    if not rotary_norm.available():
        pytest.skip(f"no Triton: {rotary_norm.load_error()}")
    scope: dict = {}
    exec(CHECKS, scope)
    scope["check_rotary_norm"](B=2, T=2048, H=10, D=128, dtype=torch.bfloat16, device="cuda")
    scope["check_through_autograd_and_compile"]("cuda")
