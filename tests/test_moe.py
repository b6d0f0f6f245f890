"""MoE (nanochat-reference §6.9): output against a per-token loop over experts, bias steering selection only,
counters, the balancing update, gradients for idle experts, and the CUDA grouped-GEMM path."""
from __future__ import annotations

import pytest
import torch

import trainer.moe as moe_module
from trainer.config import GPTConfig
from trainer.moe import MoE, experts_grouped_mm, experts_loop, expert_hidden_dim, moe_stats, update_expert_biases

CFG = GPTConfig(n_embd=64, n_head=4, n_kv_head=4, num_experts=6, top_k=2)


def make_moe(seed=0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(CFG)
    with torch.no_grad():
        for p in moe.parameters():  # live weights everywhere (init zeroes the down projections)
            p.copy_(torch.randn_like(p) * 0.2)
    return moe


def reference(moe: MoE, x: torch.Tensor, bias: torch.Tensor):
    """Token by token in float64: experts chosen by score + bias, weighted by the unbiased score."""
    W = moe.router.gate.weight.double()
    up, down = moe.experts.w_up.double(), moe.experts.w_down.double()
    s_up, s_down = moe.shared_expert.w_up.weight.double(), moe.shared_expert.w_down.weight.double()
    out, chosen = [], []
    for t in x.double():
        scores = torch.sigmoid(W @ t)
        sel = sorted(range(len(scores)), key=lambda e: -(scores[e] + bias[e]).item())[: moe.top_k]
        y = s_down @ torch.relu(s_up @ t).square()
        for e in sel:
            y = y + scores[e] * (down[e] @ torch.relu(up[e] @ t).square())
        out.append(y)
        chosen.append(sorted(sel))
    return torch.stack(out), chosen


def test_expert_hidden_dim():
    assert [expert_hidden_dim(c, 2) for c in (768, 1280, 1536)] == [1024, 1664, 2048]
    assert expert_hidden_dim(64, 2) == 128 and expert_hidden_dim(768, 1) == 1536


def test_output_matches_per_token_reference():
    moe = make_moe()
    bias = torch.tensor([0.3, -0.2, 0.0, 0.15, -0.4, 0.1])
    moe.router.expert_bias.copy_(bias)
    x = torch.randn(3, 20, 64)
    with torch.no_grad():
        got = moe.eval()(x)
    want, chosen = reference(moe, x.view(-1, 64), bias)
    assert torch.allclose(got.view(-1, 64).double(), want, atol=1e-4)
    _, unbiased = reference(moe, x.view(-1, 64), torch.zeros(6))
    assert chosen != unbiased  # the bias really changed some selections, so the test covers it


def test_counters_accumulate_in_training_only():
    moe = make_moe()
    x = torch.randn(2, 16, 64)
    moe.eval()(x)
    assert moe.router.tokens_per_expert_counter.sum() == 0
    moe.train()(x)
    moe.train()(x)
    _, chosen = reference(moe, x.view(-1, 64), torch.zeros(6))
    want = torch.bincount(torch.tensor(chosen).view(-1), minlength=6).float() * 2
    assert torch.equal(moe.router.tokens_per_expert_counter, want)
    assert want.sum() == 2 * 32 * 2  # two forwards x tokens x top_k
    stats = moe_stats([moe])
    assert stats["moe/load_imbalance"] == pytest.approx((want.std() / want.mean()).item())


def test_update_expert_biases():
    a, b = make_moe(1), make_moe(2)
    a.router.tokens_per_expert_counter.copy_(torch.tensor([6.0, 2, 4, 4, 4, 4]))  # mean 4
    a.router.expert_bias.zero_()
    b.router.tokens_per_expert_counter.copy_(torch.tensor([1.0, 1, 1, 1, 1, 7]))  # mean 2
    b.router.expert_bias.copy_(torch.tensor([0.56, 0, 0, 0, 0, 0]))
    update_expert_biases([a, b], coeff=0.01)
    assert torch.allclose(a.router.expert_bias, torch.tensor([-0.01, 0.01, 0, 0, 0, 0]))
    # b: +0.01 on the five under-loaded, -0.01 on expert 5 -> [0.57, .01, .01, .01, .01, -.01], minus its mean 0.1
    assert torch.allclose(b.router.expert_bias, torch.tensor([0.47, -0.09, -0.09, -0.09, -0.09, -0.11]), atol=1e-6)
    assert a.router.tokens_per_expert_counter.sum() == 0 and b.router.tokens_per_expert_counter.sum() == 0
    update_expert_biases([], coeff=0.01)  # dense model: nothing to do


def test_idle_experts_get_zero_gradients():
    moe = make_moe()
    moe.router.expert_bias.copy_(torch.tensor([-10.0, 0, 0, 0, 0, 0]))  # expert 0 is never chosen
    moe.train()(torch.randn(2, 8, 64)).square().sum().backward()
    assert moe.router.tokens_per_expert_counter[0] == 0
    g = moe.experts.w_up.grad
    assert g is not None and g[0].abs().max() == 0 and g[1:].abs().sum() > 0
    assert moe.experts.w_down.grad[0].abs().max() == 0 and moe.router.gate.weight.grad.abs().sum() > 0


def test_gather_permutation_matches_scatter(monkeypatch):
    """MOE_PERMUTE="gather" moves rows with gathers both ways: the same output and gradients as index_put."""
    x = torch.randn(3, 20, 64)
    runs = {}
    for mode in ("scatter", "gather"):
        monkeypatch.setattr(moe_module, "MOE_PERMUTE", mode)
        moe = make_moe()
        xi = x.clone().requires_grad_(True)
        out = moe.train()(xi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        runs[mode] = (out.detach(), xi.grad, {n: p.grad for n, p in moe.named_parameters()})
    (a, ga, pa), (b, gb, pb) = runs["scatter"], runs["gather"]
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gb, ga, rtol=1e-6, atol=1e-6)
    for name in pa:
        torch.testing.assert_close(pb[name], pa[name], rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_mm_matches_loop_on_cuda():
    torch.manual_seed(0)
    E, C, H = 4, 64, 128
    w_up, w_down = torch.randn(E, H, C, device="cuda") * 0.1, torch.randn(E, C, H, device="cuda") * 0.1
    counts = torch.tensor([5.0, 0.0, 19.0, 8.0], device="cuda")  # an idle expert included
    x = torch.randn(32, C, device="cuda", dtype=torch.bfloat16)
    got = experts_grouped_mm(w_up, w_down, x, counts)
    want = experts_loop(w_up, w_down, x, counts)
    assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2)
