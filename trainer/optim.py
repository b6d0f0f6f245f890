"""Muon + AdamW in one optimizer, single process and distributed (nanochat-reference §7).

AdamW (§7.1) updates embeddings, the unembedding and scalars; Muon (§7.2) updates every matrix of the
transformer blocks, one group per shape, all params of a group stacked to (K, *shape) so the
orthogonalization is one batched call (3-D expert weights are orthogonalized per expert over their last two
dims). The per-tensor math lives in two plain functions that are `torch.compile`d when their tensors are on
CUDA and run eagerly elsewhere (compiling on CPU costs more than it saves in tests). Hyperparameters reach
them as 0-D CPU tensors so that changing the LR or momentum every step never triggers a recompile.

State layout is exactly nanochat's (§7.4), so `state_dict()` round-trips and nanochat optimizer shards load:
AdamW params carry `step`, `exp_avg`, `exp_avg_sq`; a Muon group keeps `momentum_buffer` and
`second_momentum_buffer` on its first param only.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

# Polar Express coefficients (num_iters=5, safety factor 2e-2, cushion 2), §7.2 step 4.
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# AdamW params below this many elements are all-reduced whole in the distributed variant (§7.3).
SMALL_PARAM_NUMEL = 1024

_REQUIRED_KEYS = {
    "adamw": ("lr", "betas", "eps", "weight_decay"),
    "muon": ("lr", "momentum", "ns_steps", "beta2", "weight_decay"),
}


# ----------------------------------------------------------------------------------------------------------
# per-tensor math (compile-friendly: no Python branching on tensor values, hyperparameters as 0-D tensors)

def adamw_update(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step_t: Tensor, lr_t: Tensor,
                 beta1_t: Tensor, beta2_t: Tensor, eps_t: Tensor, wd_t: Tensor) -> None:
    """One AdamW step in place (§7.1), math in fp32 and cast back (master), so bf16 params lose nothing
    to `1 - beta2` rounding; the moments stay in the param's dtype."""
    p32, m, v, g = p.float(), exp_avg.float(), exp_avg_sq.float(), grad.float()
    p32.mul_(1 - lr_t * wd_t)                       # decoupled weight decay, before the update
    m.lerp_(g, 1 - beta1_t)
    v.lerp_(g.square(), 1 - beta2_t)
    denom = (v / (1 - beta2_t ** step_t)).sqrt() + eps_t
    p32.sub_((lr_t / (1 - beta1_t ** step_t)) * m / denom)
    p.copy_(p32)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


def orthogonalize(U: Tensor, ns_steps: int = 5) -> Tensor:
    """MuonEq row equilibration then Polar Express (§7.2 steps 3-4) on every matrix of U (..., rows, cols).
    Returns a tensor of U's dtype whose singular values are close to 1."""
    rows, cols = U.shape[-2], U.shape[-1]
    # MuonEq: every row gets the mean row norm, so the spectrum entering the iteration is better conditioned
    U32 = U.float()
    target = U32.norm(dim=(-2, -1), keepdim=True) / math.sqrt(rows)
    row_norm = U32.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    X = U * (target / row_norm).to(U.dtype)
    # Polar Express: the norm here is taken in X's dtype (bf16 on GPU), as upstream does
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        if rows > cols:  # tall: work with the small cols x cols Gram matrix
            A = X.mT @ X
            X = a * X + X @ (b * A + c * (A @ A))
        else:
            A = X @ X.mT
            X = a * X + (b * A + c * (A @ A)) @ X
    return X


def muon_update(grads: Tensor, params: Tensor, momentum_buffer: Tensor, second_momentum_buffer: Tensor,
                momentum_t: Tensor, lr_t: Tensor, wd_t: Tensor, beta2_t: Tensor,
                ns_steps: int, bf16: bool) -> None:
    """One Muon step in place on stacked tensors (K, *shape) (§7.2); `grads` is overwritten, `lr_t` is already
    lr_eff. bf16 selects the orthogonalization dtype; the result is cast back to the param dtype (master)."""
    rows, cols = params.shape[-2], params.shape[-1]
    red_dim = -1 if rows >= cols else -2
    # 1. Nesterov momentum
    mu = momentum_t.to(grads.dtype)
    momentum_buffer.lerp_(grads, 1 - mu)
    U = grads.lerp_(momentum_buffer, mu)
    # 2-4. orthogonalize (bf16 on GPU), back to the param dtype
    U = orthogonalize(U.bfloat16() if bf16 else U, ns_steps).to(params.dtype)
    # 5. Muon+: Frobenius norm of a semi-orthogonal matrix, fixing under-convergence of the iteration
    U = U * (math.sqrt(min(rows, cols)) / U.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)).to(U.dtype)
    # 6. NorMuon: per-row (or per-column) adaptive scale from a factored second moment, norm preserved
    v_mean = U.float().square().mean(dim=red_dim, keepdim=True)
    n_red = U.shape[red_dim]
    old_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * n_red).sqrt()
    second_momentum_buffer.lerp_(v_mean.to(second_momentum_buffer.dtype), 1 - beta2_t.to(U.dtype))
    scale = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    new_norm = (v_mean * n_red * scale.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    U = U * (scale * (old_norm / new_norm.clamp_min(1e-10))).to(U.dtype)
    # 7. cautious weight decay (only where update and param agree in sign) + update
    lr, wd = lr_t.to(U.dtype), wd_t.to(U.dtype)
    mask = (U * params) >= 0
    params.sub_(lr * U + lr * wd * params * mask)


RECOMPILE_LIMIT = 64


@functools.cache
def _compiled(fn: Callable) -> Callable:
    # Every (shape, dtype) of a param (and every owned-chunk size when distributed) is its own static graph of
    # the same function; a MoE model has more than dynamo's default 8, and with fullgraph=True hitting that
    # limit is a hard error (torch 2.11), so raise it (never lower it).
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), RECOMPILE_LIMIT))
    return torch.compile(fn, dynamic=False, fullgraph=True)


def _kernel(fn: Callable, t: Tensor) -> Callable:
    """The compiled kernel for CUDA tensors, the plain function elsewhere."""
    return _compiled(fn) if t.is_cuda else fn


@functools.cache
def _auto_bf16(device: torch.device) -> bool:
    """Orthogonalize in bf16 when the compute dtype is bf16 (§6.8): NANOCHAT_DTYPE if set, else CUDA SM >= 8."""
    env = os.environ.get("NANOCHAT_DTYPE")
    if env:
        return env == "bfloat16"
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def _second_moment_shape(n: int, shape: torch.Size) -> tuple[int, ...]:
    """(n, *shape[:-1], 1) when rows >= cols else (n, *shape[:-2], 1, cols) (§7.4)."""
    if shape[-2] >= shape[-1]:
        return (n, *shape[:-1], 1)
    return (n, *shape[:-2], 1, shape[-1])


def _check_groups(param_groups: list[dict]) -> list[dict]:
    """Clear errors for malformed groups; fills `initial_lr = lr` where missing (§6.11)."""
    if not isinstance(param_groups, (list, tuple)) or not param_groups:
        raise ValueError("MuonAdamW needs a non-empty list of param group dicts")
    out = []
    for i, group in enumerate(param_groups):
        if not isinstance(group, dict):
            raise ValueError(f"param group {i}: expected a dict, got {type(group).__name__}")
        kind = group.get("kind")
        if kind not in _REQUIRED_KEYS:
            raise ValueError(f"param group {i}: kind must be 'adamw' or 'muon', got {kind!r}")
        missing = [k for k in ("params", *_REQUIRED_KEYS[kind]) if k not in group]
        if missing:
            raise ValueError(f"param group {i} ({kind}): missing keys {missing}")
        group = dict(group, params=list(group["params"]))
        group.setdefault("initial_lr", group["lr"])
        if kind == "muon":
            shapes = {tuple(p.shape) for p in group["params"]}
            if len(shapes) > 1:
                raise ValueError(f"param group {i} (muon): all params must share one shape, got {sorted(shapes)}")
            if shapes and len(next(iter(shapes))) < 2:
                raise ValueError(f"param group {i} (muon): params must be 2-D or more, got shape {shapes.pop()}")
            if not 1 <= group["ns_steps"] <= len(POLAR_EXPRESS_COEFFS):
                raise ValueError(f"param group {i} (muon): ns_steps must be in 1..{len(POLAR_EXPRESS_COEFFS)}, "
                                 f"got {group['ns_steps']}")
        out.append(group)
    return out


# ----------------------------------------------------------------------------------------------------------

class MuonAdamW(torch.optim.Optimizer):
    """Single-process Muon + AdamW over nanochat's param groups (§6.11).

    `muon_bf16` forces the orthogonalization dtype; None picks bf16 when the compute dtype is (CUDA SM >= 8
    or NANOCHAT_DTYPE=bfloat16), else fp32.
    """

    def __init__(self, param_groups: list[dict], *, muon_bf16: bool | None = None):
        super().__init__(_check_groups(param_groups), defaults={})
        self.muon_bf16 = muon_bf16
        # 0-D CPU tensors: refilled each step, so compiled kernels see new values without recompiling
        self._t = {name: torch.tensor(0.0, dtype=torch.float32)
                   for name in ("step", "lr", "beta1", "beta2", "eps", "wd", "momentum")}

    # -- pieces shared with the distributed variant --------------------------------------------------------

    def _world(self) -> tuple[int, int]:
        return 0, 1

    def _bf16(self, device: torch.device) -> bool:
        return _auto_bf16(device) if self.muon_bf16 is None else self.muon_bf16

    def _adamw_state_shape(self, p: Tensor) -> tuple[int, ...]:
        return tuple(p.shape)

    def _muon_chunk(self, k: int) -> int:
        return k

    def _adamw_apply(self, group: dict, p: Tensor, p_view: Tensor, grad: Tensor) -> None:
        """Lazily create the state for `p` shaped like `p_view` (whole param or this rank's slice), then step."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p_view)
            state["exp_avg_sq"] = torch.zeros_like(p_view)
        state["step"] += 1
        t = self._t
        t["step"].fill_(state["step"])
        t["lr"].fill_(group["lr"])
        t["beta1"].fill_(group["betas"][0])
        t["beta2"].fill_(group["betas"][1])
        t["eps"].fill_(group["eps"])
        t["wd"].fill_(group["weight_decay"])
        _kernel(adamw_update, p_view)(p_view, grad, state["exp_avg"], state["exp_avg_sq"],
                                      t["step"], t["lr"], t["beta1"], t["beta2"], t["eps"], t["wd"])

    def _muon_state(self, group: dict, chunk: int) -> tuple[Tensor, Tensor]:
        p = group["params"][0]
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(chunk, *p.shape, dtype=p.dtype, device=p.device)
        if "second_momentum_buffer" not in state:
            state["second_momentum_buffer"] = torch.zeros(_second_moment_shape(chunk, p.shape),
                                                          dtype=p.dtype, device=p.device)
        return state["momentum_buffer"], state["second_momentum_buffer"]

    def _muon_apply(self, group: dict, grads: Tensor, params: Tensor, buf: Tensor, buf2: Tensor) -> None:
        rows, cols = params.shape[-2], params.shape[-1]
        t = self._t
        t["momentum"].fill_(group["momentum"])
        t["lr"].fill_(group["lr"] * math.sqrt(max(1.0, rows / cols)))  # lr_eff
        t["wd"].fill_(group["weight_decay"])
        t["beta2"].fill_(group["beta2"] if group["beta2"] is not None else 0.0)
        _kernel(muon_update, params)(grads, params, buf, buf2, t["momentum"], t["lr"], t["wd"], t["beta2"],
                                     group["ns_steps"], self._bf16(params.device))

    # -- single process ------------------------------------------------------------------------------------

    def _step_adamw(self, group: dict) -> None:
        for p in group["params"]:
            if p.grad is not None:  # moe3 skips params without a grad
                self._adamw_apply(group, p, p, p.grad)

    def _step_muon(self, group: dict) -> None:
        params = group["params"]
        have = [p.grad is not None for p in params]
        if not any(have):
            return
        if not all(have):
            raise RuntimeError(f"Muon group of shape {tuple(params[0].shape)}: params {have.index(False)} has no grad "
                               "while others do; a stacked Muon group steps all its params or none")
        buf, buf2 = self._muon_state(group, len(params))
        stacked = torch.stack(params)
        self._muon_apply(group, torch.stack([p.grad for p in params]), stacked, buf, buf2)
        torch._foreach_copy_(params, list(stacked.unbind(0)))

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._step_adamw(group)
            else:
                self._step_muon(group)
        return loss

    # -- state loading -------------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader plus the checks it lacks: same group kinds, and state shaped for this world size."""
        saved = state_dict.get("param_groups", [])
        if len(saved) != len(self.param_groups):
            raise ValueError(f"optimizer state has {len(saved)} param groups, this optimizer has "
                             f"{len(self.param_groups)}")
        for i, (s, g) in enumerate(zip(saved, self.param_groups)):
            if s.get("kind") != g["kind"] or len(s.get("params", [])) != len(g["params"]):
                raise ValueError(f"param group {i}: saved kind {s.get('kind')!r} with {len(s.get('params', []))} "
                                 f"params, this optimizer has {g['kind']!r} with {len(g['params'])}")
        super().load_state_dict(state_dict)
        self._check_state_shapes()

    def _check_state_shapes(self) -> None:
        def check(i: int, j: int, name: str, got: Tensor, want: tuple[int, ...]) -> None:
            if tuple(got.shape) != want:
                raise ValueError(f"optimizer state, param group {i} ({self.param_groups[i]['kind']}) param {j}: "
                                 f"{name} has shape {tuple(got.shape)}, expected {want} (shards are only valid "
                                 "for the same world size and grouping)")
        for i, group in enumerate(self.param_groups):
            params = group["params"]
            if group["kind"] == "adamw":
                for j, p in enumerate(params):
                    st = self.state.get(p, {})
                    for name in ("exp_avg", "exp_avg_sq"):
                        if name in st:
                            check(i, j, name, st[name], self._adamw_state_shape(p))
            elif params:
                st = self.state.get(params[0], {})
                chunk, shape = self._muon_chunk(len(params)), params[0].shape
                if "momentum_buffer" in st:
                    check(i, 0, "momentum_buffer", st["momentum_buffer"], (chunk, *shape))
                if "second_momentum_buffer" in st:
                    check(i, 0, "second_momentum_buffer", st["second_momentum_buffer"],
                          _second_moment_shape(chunk, shape))


# ----------------------------------------------------------------------------------------------------------

def _all_gather_into(out: Tensor, inp: Tensor, group) -> dist.Work:
    # all_gather_single is the new name (torch >= 2.13); all_gather_into_tensor is the same op before that
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group, async_op=True)


class DistMuonAdamW(MuonAdamW):
    """Distributed Muon + AdamW (§7.3). No DDP: the gradient all-reduce happens here, overlapped with the
    updates, and optimizer state is sharded (ZeRO-2 style) so each rank's `state_dict()` is its shard (§7.4).

    Works over NCCL and gloo (gloo has reduce_scatter_tensor since torch 2.3 and AVG since 2.8).
    """

    def __init__(self, param_groups: list[dict], *, muon_bf16: bool | None = None, process_group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistMuonAdamW needs torch.distributed to be initialized (use MuonAdamW otherwise)")
        super().__init__(param_groups, muon_bf16=muon_bf16)
        self.process_group = process_group
        world = self._world()[1]
        for i, group in enumerate(self.param_groups):
            if group["kind"] == "adamw":
                for j, p in enumerate(group["params"]):
                    if p.numel() >= SMALL_PARAM_NUMEL and p.shape[0] % world:
                        raise ValueError(f"param group {i} (adamw) param {j}: shape {tuple(p.shape)} has >= "
                                         f"{SMALL_PARAM_NUMEL} elements, so dim 0 must be divisible by the world "
                                         f"size {world}")

    def _world(self) -> tuple[int, int]:
        return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)

    def _adamw_state_shape(self, p: Tensor) -> tuple[int, ...]:
        if p.numel() < SMALL_PARAM_NUMEL:
            return tuple(p.shape)
        return (p.shape[0] // self._world()[1], *p.shape[1:])

    def _muon_chunk(self, k: int) -> int:
        return -(-k // self._world()[1])

    @staticmethod
    def _grad(p: Tensor, i: int) -> Tensor:
        if p.grad is None:
            raise RuntimeError(f"param group {i}: a param of shape {tuple(p.shape)} has no grad; in distributed "
                               "training every rank must hold a grad for every param (collectives must match)")
        return p.grad.contiguous()

    # phase 1: launch the gradient reductions
    def _reduce_adamw(self, i: int, group: dict, world: int) -> list:
        pending = []
        for p in group["params"]:
            grad = self._grad(p, i)
            if p.numel() < SMALL_PARAM_NUMEL:
                work = dist.all_reduce(grad, op=dist.ReduceOp.AVG, group=self.process_group, async_op=True)
                pending.append((work, grad))
            else:
                shard = torch.empty_like(grad[: grad.shape[0] // world])
                work = dist.reduce_scatter_tensor(shard, grad, op=dist.ReduceOp.AVG, group=self.process_group,
                                                  async_op=True)
                pending.append((work, shard))
        return pending

    def _reduce_muon(self, i: int, group: dict, world: int) -> tuple:
        params = group["params"]
        k, chunk = len(params), self._muon_chunk(len(params))
        p = params[0]
        stacked = torch.zeros(chunk * world, *p.shape, dtype=p.dtype, device=p.device)
        torch.stack([self._grad(q, i) for q in params], out=stacked[:k])
        grad_chunk = torch.empty(chunk, *p.shape, dtype=p.dtype, device=p.device)
        work = dist.reduce_scatter_tensor(grad_chunk, stacked, op=dist.ReduceOp.AVG, group=self.process_group,
                                          async_op=True)
        return work, grad_chunk, stacked

    # phase 2: update what this rank owns and launch the gathers
    def _update_adamw(self, group: dict, pending: list, rank: int, world: int, gathers: list) -> None:
        for p, (work, grad) in zip(group["params"], pending):
            work.wait()
            if p.numel() < SMALL_PARAM_NUMEL:
                self._adamw_apply(group, p, p, grad)
            else:
                n = p.shape[0] // world
                p_slice = p[rank * n:(rank + 1) * n]
                self._adamw_apply(group, p, p_slice, grad)
                gathers.append((_all_gather_into(p, p_slice, self.process_group), None, None))

    def _update_muon(self, group: dict, pending: tuple, rank: int, gathers: list) -> None:
        work, grad_chunk, stacked = pending
        work.wait()
        params = group["params"]
        chunk = grad_chunk.shape[0]
        start = rank * chunk
        owned = max(0, min(chunk, len(params) - start))
        buf, buf2 = self._muon_state(group, chunk)
        updated = torch.zeros_like(grad_chunk)
        if owned:
            mine = torch.stack(params[start:start + owned])
            self._muon_apply(group, grad_chunk[:owned], mine, buf[:owned], buf2[:owned])
            updated[:owned].copy_(mine)
        # the reduce input buffer is free now: reuse it as the gather output
        gathers.append((_all_gather_into(stacked, updated, self.process_group), stacked, params))

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world = self._world()
        pending = [self._reduce_adamw(i, g, world) if g["kind"] == "adamw" else self._reduce_muon(i, g, world)
                   for i, g in enumerate(self.param_groups) if g["params"]]
        groups = [g for g in self.param_groups if g["params"]]
        gathers: list = []
        for group, red in zip(groups, pending):
            if group["kind"] == "adamw":
                self._update_adamw(group, red, rank, world, gathers)
            else:
                self._update_muon(group, red, rank, gathers)
        # phase 3: wait for the gathers, copy Muon rows back into the individual params
        for work, stacked, params in gathers:
            work.wait()
            if params is not None:
                torch._foreach_copy_(params, list(stacked[:len(params)].unbind(0)))
        return loss


# ----------------------------------------------------------------------------------------------------------

def warm_start(optimizer: MuonAdamW, state_dict: dict, init_lr_frac: float) -> None:
    """Load a (base-training) optimizer shard but keep this run's LRs (§10.3).

    Loading overwrites every group hyperparameter with its end-of-pretraining value (weight decay, betas,
    momentum, initial_lr); only `lr` is restored to the freshly configured one, then scaled by `init_lr_frac`
    and made the new `initial_lr` that the schedule multiplies.
    """
    if not (math.isfinite(init_lr_frac) and init_lr_frac >= 0):
        raise ValueError(f"init_lr_frac must be a finite number >= 0, got {init_lr_frac}")
    fresh = [g["lr"] for g in optimizer.param_groups]
    optimizer.load_state_dict(state_dict)
    for group, lr in zip(optimizer.param_groups, fresh):
        group["lr"] = lr * init_lr_frac
        group["initial_lr"] = group["lr"]
