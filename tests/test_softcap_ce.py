"""trainer.softcap_ce: lm_head + softcap + cross-entropy over the supervised rows, against the model's plain
expression.

On CPU the kernel runs in Triton's interpreter (the tanh without inline assembly); where Triton is not
installed those checks skip. On a GPU the same checks run on the compiled kernel (hardware tanh) at nanochat's
vocabulary, in bf16. The target checks run everywhere: they come before any kernel."""
from __future__ import annotations

import pytest
import torch

from tests.triton_interpreter import run_interpreted
from trainer import softcap_ce

CHECKS = '''
import torch
import torch.nn.functional as F
from trainer import softcap_ce


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def plain(x, w, targets, vocab, cap):
    """trainer.model's expression, summed."""
    logits = F.linear(x, w)[..., :vocab].float()
    logits = cap * torch.tanh(logits / cap)
    return F.cross_entropy(logits.view(-1, vocab), targets.reshape(-1), ignore_index=-1, reduction="sum")


def check_rows(n, cols, vocab, dtype, device, blocks, tol):
    """Each row's loss and d loss / d logits (written over the logits, zero in the padding) against float64
    autograd, one-pass (a block spans the row) and chunked, ragged vocabularies and the extreme targets."""
    g = torch.Generator().manual_seed(cols)
    z = (torch.randn(n, cols, generator=g) * 12).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[0], targets[-1] = 0, vocab - 1
    ref_z = z.double()[:, :vocab].requires_grad_()
    s = 15.0 * torch.tanh(ref_z / 15.0)
    ref = torch.logsumexp(s, dim=1) - s.gather(1, targets[:, None])[:, 0]
    ref.sum().backward()
    for block in blocks:
        logits = z.clone().to(device)
        losses = softcap_ce.softcap_ce_rows(logits, targets.to(device), vocab, 15.0, block=block, warps=4)
        assert losses.dtype == torch.float32 and rel(losses.cpu(), ref.detach()) < tol, (block, rel(losses.cpu(), ref))
        got = logits.cpu()
        assert rel(got[:, :vocab], ref_z.grad) < 10 * tol, (block, rel(got[:, :vocab], ref_z.grad))
        assert (got[:, vocab:] == 0).all(), block


def check_loss(B, T, C, vocab, padded, dtype, device, tol, compile=False):
    """softcap_ce's summed loss and its gradients against the plain expression in float64: ignored targets
    (the first rows, a run in the middle), a vocabulary padded past the real one, eager or compiled."""
    g = torch.Generator().manual_seed(T)
    x = torch.randn(B, T, C, generator=g).to(dtype)
    w = (torch.randn(padded, C, generator=g) * 3 * C ** -0.5).to(dtype)
    targets = torch.randint(0, vocab, (B, T), generator=g)
    targets[:, :3] = -1
    targets[0, T // 2:T // 2 + 5] = -1
    ref = [t.double().requires_grad_() for t in (x, w)]
    ref_loss = plain(*ref, targets, vocab, 15.0)
    (ref_loss * 0.37).backward()
    got = [t.to(device).requires_grad_() for t in (x, w)]
    fn = torch.compile(softcap_ce.softcap_ce, dynamic=False) if compile else softcap_ce.softcap_ce
    loss = fn(*got, targets.to(device), vocab, 15.0)
    (loss * 0.37).backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - ref_loss.item()) < tol * ref_loss.item()
    for name, t, r in zip(("dx", "dw"), got, ref):
        assert t.grad.dtype == dtype and rel(t.grad, r.grad) < 10 * tol, (name, rel(t.grad, r.grad))
    assert (got[0].grad[:, :3] == 0).all()  # no target, no gradient


def check_all_ignored(dtype, device):
    """A micro-batch without a single target (a row of padding): loss 0 and zero gradients, as the plain
    summed loss gives, not NaN."""
    x = torch.randn(2, 8, 16).to(dtype).to(device).requires_grad_()
    w = torch.randn(64, 16).to(dtype).to(device).requires_grad_()
    loss = softcap_ce.softcap_ce(x, w, torch.full((2, 8), -1, device=device), 60, 15.0)
    loss.backward()
    assert loss.item() == 0 and not x.grad.any() and not w.grad.any()
'''


def _interpreted(call: str) -> None:
    run_interpreted(CHECKS, call, "test_softcap_ce_on_cuda_at_nanochats_vocabulary")


def test_softcap_ce_rows_interpreted():
    _interpreted("""
        check_rows(n=5, cols=320, vocab=300, dtype=torch.float32, device="cpu", blocks=[512, 128, 64], tol=1e-5)
        check_rows(n=4, cols=256, vocab=256, dtype=torch.bfloat16, device="cpu", blocks=[256, 64], tol=1e-2)
    """)


def test_softcap_ce_loss_interpreted():
    _interpreted("""
        check_loss(B=2, T=24, C=32, vocab=300, padded=320, dtype=torch.float32, device="cpu", tol=1e-5)
        check_loss(B=2, T=24, C=32, vocab=256, padded=256, dtype=torch.float32, device="cpu", tol=1e-5, compile=True)
        check_all_ignored(torch.float32, "cpu")
    """)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_softcap_ce_on_cuda_at_nanochats_vocabulary():
    if not softcap_ce.available():
        pytest.skip(f"no Triton: {softcap_ce.load_error()}")
    namespace: dict = {}
    exec(CHECKS, namespace)
    namespace["check_rows"](n=64, cols=32768, vocab=32768, dtype=torch.bfloat16, device="cuda",
                            blocks=[32768, 8192], tol=1e-2)
    namespace["check_rows"](n=64, cols=50304, vocab=50257, dtype=torch.bfloat16, device="cuda",
                            blocks=[8192], tol=1e-2)
    for compile in (False, True):
        namespace["check_loss"](B=4, T=256, C=256, vocab=32768, padded=32768, dtype=torch.bfloat16,
                                device="cuda", tol=1e-2, compile=compile)
    namespace["check_all_ignored"](torch.bfloat16, "cuda")


def test_targets_outside_the_vocabulary_are_refused():
    x, w = torch.randn(2, 4, 8), torch.randn(16, 8)
    for bad in (16, -2):
        targets = torch.tensor([[1, -1, 3, 2], [bad, 0, -1, 5]])
        with pytest.raises(ValueError, match=f"the first is {bad} at flat position 4"):
            softcap_ce.softcap_ce(x, w, targets, 16, 15.0)
    with pytest.raises(ValueError, match="do not match"):
        softcap_ce.softcap_ce(x, w, torch.zeros(2, 3, dtype=torch.long), 16, 15.0)
    with pytest.raises(ValueError, match="at most 60"):
        softcap_ce.softcap_ce_rows(torch.zeros(2, 16), torch.zeros(2, dtype=torch.long), 16, 80.0)
