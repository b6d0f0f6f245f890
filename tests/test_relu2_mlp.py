"""trainer.relu2_mlp: the MLP with relu^2 fused into two Triton GEMMs, against the model's plain expression.

On CPU the kernels run in Triton's interpreter (in fp16 and fp32: its TMA descriptors mishandle bf16); where
Triton is not installed those checks skip. On a Hopper GPU the same checks run on the compiled kernels at
d20's sizes, in bf16."""
from __future__ import annotations

import pytest
import torch

from tests.triton_interpreter import run_interpreted
from trainer import relu2_mlp

CHECKS = '''
import torch
import torch.nn.functional as F
from trainer import relu2_mlp


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def check_gemms(M, K, N, dtype, device, configs):
    """Both fused GEMMs, B read K-major and MN-major, against fp32 with ragged edges (M, N, K not multiples
    of the tiles): forward relu(x W^T)^2, backward (g W2) * 2 relu(h) with relu(h) recovered from a.
    A config of None: FWD_CONFIG and GRAD_CONFIG."""
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g).to(dtype).to(device)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(dtype).to(device)
    dy = torch.randn(M, K, generator=g).to(dtype).to(device)
    w2 = (torch.randn(K, N, generator=g) * K ** -0.5).to(dtype).to(device)
    h = x.float() @ w.float().t()
    ref_a = torch.relu(h) ** 2
    ref_dh = (dy.float() @ w2.float()) * 2 * torch.relu(h)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for cfg in configs:
        a = relu2_mlp.relu2_matmul(x, w, b_kmajor=True, config=cfg)
        assert a.dtype == dtype and a.shape == (M, N) and rel(a, ref_a) < tol, (cfg, rel(a, ref_a))
        a_t = relu2_mlp.relu2_matmul(x, w.t().contiguous(), b_kmajor=False, config=cfg)
        assert rel(a_t, ref_a) < tol, (cfg, rel(a_t, ref_a))
        dh = relu2_mlp.relu2_matmul(dy, w2, a, b_kmajor=False, config=cfg)
        assert dh.dtype == dtype and rel(dh, ref_dh) < 2 * tol, (cfg, rel(dh, ref_dh))


def check_mlp(B, T, C, dtype, device, compile=False):
    """relu2_mlp's output and its three gradients against autograd through the plain expression in fp32,
    eager or compiled (the custom ops' fake kernels)."""
    g = torch.Generator().manual_seed(T)
    x = torch.randn(B, T, C, generator=g).to(dtype)
    w_fc = (torch.randn(4 * C, C, generator=g) * C ** -0.5).to(dtype)
    w_proj = (torch.randn(C, 4 * C, generator=g) * (4 * C) ** -0.5).to(dtype)
    dy = torch.randn(B, T, C, generator=g).to(dtype)
    ref = [t.float().to(device).requires_grad_() for t in (x, w_fc, w_proj)]
    ref_out = F.linear(F.relu(F.linear(ref[0], ref[1])).square(), ref[2])
    ref_out.backward(dy.float().to(device))
    got = [t.to(device).requires_grad_() for t in (x, w_fc, w_proj)]
    fn = torch.compile(relu2_mlp.relu2_mlp, dynamic=False) if compile else relu2_mlp.relu2_mlp
    out = fn(*got)
    out.backward(dy.to(device))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert out.shape == (B, T, C) and rel(out, ref_out) < tol, rel(out, ref_out)
    for name, t, r in zip(("dx", "dw_fc", "dw_proj"), got, ref):
        assert rel(t.grad, r.grad) < 2 * tol, (name, rel(t.grad, r.grad))
'''

SMALL_CONFIGS = "[relu2_mlp.GemmConfig(32, 64, 32, 2, 2, 4, True), relu2_mlp.GemmConfig(32, 32, 16, 2, 2, 4, False)]"


def _interpreted(call: str) -> None:
    run_interpreted(CHECKS, call, "test_relu2_mlp_on_cuda_at_the_model_sizes")


def test_relu2_gemms_interpreted():
    _interpreted(f"""
        for dtype in (torch.float32, torch.float16):
            check_gemms(M=100, K=48, N=96, dtype=dtype, device="cpu", configs={SMALL_CONFIGS})
    """)


def test_relu2_mlp_through_autograd_and_compile_interpreted():
    _interpreted(f"""
        relu2_mlp.FWD_CONFIG, relu2_mlp.GRAD_CONFIG = {SMALL_CONFIGS}
        check_mlp(B=2, T=20, C=16, dtype=torch.float16, device="cpu")
        check_mlp(B=2, T=20, C=16, dtype=torch.float32, device="cpu", compile=True)
    """)


def test_relu2_matmul_refuses_operands_tma_cannot_read():
    """Checked before any kernel runs (no Triton needed): the message names the operand and its strides."""
    with pytest.raises(ValueError, match=r"relu2_matmul: operand \(4, 6\) \(strides \(6, 1\)\).*16-byte aligned"):
        relu2_mlp.relu2_matmul(torch.zeros(4, 6, dtype=torch.float16), torch.zeros(8, 6, dtype=torch.float16),
                               b_kmajor=True)
    with pytest.raises(ValueError, match=r"shapes a \(4, 8\), b \(16, 16\) \(b_kmajor=True\).*do not fit"):
        relu2_mlp.relu2_matmul(torch.zeros(4, 8, dtype=torch.float16), torch.zeros(16, 16, dtype=torch.float16),
                               b_kmajor=True)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a CUDA GPU with TMA (SM 9.0 or later)")
def test_relu2_mlp_on_cuda_at_the_model_sizes():
    """The compiled kernels with the default tile configs at d20's width (C=1280, two micro-batch rows),
    bf16, eager and through torch.compile."""
    if not relu2_mlp.available():
        pytest.skip("no Triton with TMA descriptors")
    scope: dict = {}
    exec(CHECKS, scope)
    scope["check_gemms"](M=4096 + 17, K=1280, N=5120, dtype=torch.bfloat16, device="cuda", configs=[None])
    scope["check_mlp"](B=2, T=2048, C=1280, dtype=torch.bfloat16, device="cuda")
    scope["check_mlp"](B=2, T=2048, C=1280, dtype=torch.bfloat16, device="cuda", compile=True)
