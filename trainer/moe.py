"""Mixture of experts (nanochat moe3): sigmoid top-k router with aux-loss-free bias balancing,
routed ReLU^2 experts stored as 3-D weights (Muon orthogonalizes each expert), plus one shared expert.
Names and shapes match nanochat's state dict: mlp.router.*, mlp.experts.w_up/w_down, mlp.shared_expert.*."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from trainer.common import Linear


def expert_hidden_dim(n_embd: int, top_k: int) -> int:
    """Iso-FLOP with the dense 4C MLP: top_k routed + 1 shared expert, rounded to 128 (Python round)."""
    return round(4 * n_embd / (top_k + 1) / 128) * 128


class Router(nn.Module):
    def __init__(self, dim: int, num_experts: int, top_k: int):
        super().__init__()
        self.gate = Linear(dim, num_experts)
        self.num_experts, self.top_k = num_experts, top_k
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        self.register_buffer("tokens_per_expert_counter", torch.zeros(num_experts))

    def forward(self, x: torch.Tensor):
        """x (T, C) -> gates (T, K) fp32, expert ids (T, K), assignments per expert (E,) fp32."""
        scores = torch.sigmoid(self.gate(x).float())
        # the bias steers which experts are chosen; the gates stay the unbiased scores
        _, experts = torch.topk(scores + self.expert_bias, self.top_k, dim=-1, sorted=False)
        gates = scores.gather(-1, experts)
        counts = torch.histc(experts.view(-1).float(), bins=self.num_experts, min=0, max=self.num_experts)
        if self.training:  # only training forwards steer the balancing
            self.tokens_per_expert_counter += counts
        return gates, experts, counts


def experts_grouped_mm(w_up, w_down, x, counts):
    """One grouped GEMM per projection over expert-sorted rows (CUDA, bf16). Shapes stay static:
    the routing lives in the values of the offsets only, so torch.compile does not recompile."""
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
    h = torch._grouped_mm(x.bfloat16(), w_up.bfloat16().transpose(-2, -1), offs=offs)
    h = F.relu(h).square()
    return torch._grouped_mm(h, w_down.bfloat16().transpose(-2, -1), offs=offs).type_as(x)


@torch.compiler.disable
def experts_loop(w_up, w_down, x, counts):
    """Per-expert loop off CUDA. Empty chunks are kept so every expert gets a (zero) gradient,
    which the optimizer needs to stack the 3-D weights. .tolist() syncs, hence compile-disabled."""
    chunks = torch.split(x, [int(c) for c in counts.tolist()])
    out = [F.relu(c @ w_up[e].to(c.dtype).T).square() @ w_down[e].to(c.dtype).T for e, c in enumerate(chunks)]
    return torch.cat(out)


class _GatherSlots(torch.autograd.Function):
    """Rows flat[order // k]: each token copied to its k slots, the slots in expert order. Backward gathers
    the slot gradients back into token-major order and sums each token's k (no scatter-add, no atomics)."""

    @staticmethod
    def forward(ctx, flat, order, inv, k: int):
        ctx.save_for_backward(inv)
        ctx.k = k
        return flat[order // k]

    @staticmethod
    def backward(ctx, grad):
        (inv,) = ctx.saved_tensors
        return grad[inv].view(-1, ctx.k, grad.size(-1)).sum(dim=1), None, None, None


class _Permute(torch.autograd.Function):
    """Rows x[idx] for a permutation idx whose inverse is inv: a gather forward and backward (where an
    index_put into zeros would scatter forward and gather backward)."""

    @staticmethod
    def forward(ctx, x, idx, inv):
        ctx.save_for_backward(inv)
        return x[idx]

    @staticmethod
    def backward(ctx, grad):
        (inv,) = ctx.saved_tensors
        return grad[inv], None, None


# How routed rows move between token order and expert order: "gather" (the two autograd functions above)
# or "scatter" (index and index_put, autograd's own backward: scatter-adds), kept as the reference that
# tests/test_moe.py compares with. On an H200, d20 with 8 experts: gather 490.7 ms/step, scatter 497.6
# (bench/bench_train.py --variants, same first loss and gradient norm; bench/RESULTS.md).
MOE_PERMUTE = "gather"


class Experts(nn.Module):
    def __init__(self, dim: int, hidden: int, num_experts: int):
        super().__init__()
        self.w_up = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w_down = nn.Parameter(torch.empty(num_experts, dim, hidden))

    def forward(self, x, counts):
        run = experts_grouped_mm if x.is_cuda else experts_loop
        return run(self.w_up, self.w_down, x, counts)


class SharedExpert(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_up = Linear(dim, hidden)
        self.w_down = Linear(hidden, dim)

    def forward(self, x):
        return self.w_down(F.relu(self.w_up(x)).square())


class MoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, E, K = config.n_embd, config.num_experts, config.top_k
        self.top_k = K
        self.hidden = expert_hidden_dim(C, K)
        self.router = Router(C, E, K)
        self.experts = Experts(C, self.hidden, E)
        self.shared_expert = SharedExpert(C, self.hidden)

    @torch.no_grad()
    def init_weights(self, s: float):
        """nanochat's order: router U(-s,s), experts.w_up U(-0.4s,0.4s), w_down 0, shared alike, buffers 0."""
        nn.init.uniform_(self.router.gate.weight, -s, s)
        nn.init.uniform_(self.experts.w_up, -0.4 * s, 0.4 * s)
        nn.init.zeros_(self.experts.w_down)
        nn.init.uniform_(self.shared_expert.w_up.weight, -0.4 * s, 0.4 * s)
        nn.init.zeros_(self.shared_expert.w_down.weight)
        self.router.expert_bias.zero_()
        self.router.tokens_per_expert_counter.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(-1, C)
        gates, experts, counts = self.router(flat)
        # (token, slot) pairs in token-major order, stably sorted by expert: contiguous block per expert
        order = torch.argsort(experts.view(-1), stable=True)
        gather = MOE_PERMUTE == "gather"
        if gather:
            inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
            rows = _GatherSlots.apply(flat, order, inv, self.top_k)
        else:
            rows = flat[order // self.top_k]
        routed = self.experts(rows, counts)
        routed = routed * gates.view(-1)[order].unsqueeze(-1).to(routed.dtype)
        if gather:
            combined = _Permute.apply(routed, inv, order)  # back to token-major slots
        else:
            combined = torch.zeros(B * T * self.top_k, C, dtype=routed.dtype, device=routed.device)
            combined[order] = routed  # a permutation: every row written once
        out = combined.view(B * T, self.top_k, C).sum(dim=1) + self.shared_expert(flat)
        return out.view(B, T, C)


@torch.no_grad()
def update_expert_biases(moe_layers, coeff: float = 1e-3) -> None:
    """Aux-loss-free balancing, once per optimizer step before optimizer.step(): nudge under-loaded
    experts up and over-loaded ones down by coeff, re-center each layer's bias, reset the counters.
    Counts are summed over ranks first so every rank applies the same update."""
    routers = [m.router for m in moe_layers]
    if not routers:
        return
    counts = torch.stack([r.tokens_per_expert_counter for r in routers])  # (L, E)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    bias = torch.stack([r.expert_bias for r in routers])
    bias = bias + coeff * torch.sign(counts.mean(dim=-1, keepdim=True) - counts)
    bias = bias - bias.mean(dim=-1, keepdim=True)
    for r, b in zip(routers, bias):
        r.expert_bias.copy_(b)
        r.tokens_per_expert_counter.zero_()


@torch.no_grad()
def moe_stats(moe_layers) -> dict[str, float]:
    """Routing statistics for logging from this rank's counters; call before update_expert_biases."""
    routers = [m.router for m in moe_layers]
    if not routers:
        return {}
    counts = torch.stack([r.tokens_per_expert_counter for r in routers]).float()
    bias = torch.stack([r.expert_bias for r in routers]).float()
    imbalance = (counts.std(dim=-1) / counts.mean(dim=-1).clamp(min=1)).mean()
    return {"moe/load_imbalance": imbalance.item(), "moe/expert_bias_std": bias.std().item(),
            "moe/expert_bias_absmax": bias.abs().max().item()}
