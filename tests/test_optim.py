"""MuonAdamW / DistMuonAdamW against independent references written from nanochat-reference §7."""

import datetime
import io
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.optim import POLAR_EXPRESS_COEFFS, DistMuonAdamW, MuonAdamW, orthogonalize, warm_start
from trainer.schedule import apply_schedule, lr_multiplier, muon_momentum

# §7.2 step 4, copied from the reference text (not from the module under test)
SPEC_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def adamw_group(params, lr=0.01, betas=(0.8, 0.95), eps=1e-10, wd=0.0):
    return dict(kind="adamw", params=params, lr=lr, initial_lr=lr, betas=betas, eps=eps, weight_decay=wd)


def muon_group(params, lr=0.02, momentum=0.95, wd=0.0, beta2=0.9):
    return dict(kind="muon", params=params, lr=lr, initial_lr=lr, momentum=momentum, ns_steps=5, beta2=beta2,
                weight_decay=wd)


def randn(*shape, seed, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


# ----------------------------------------------------------------------------------------------------------
# AdamW

def test_adamw_matches_torch_adamw():
    # nanochat: p -= (lr/(1-b1^t)) * m / (sqrt(v/(1-b2^t)) + eps)
    # torch:    p -= (lr/(1-b1^t)) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
    # sqrt(v/c) == sqrt(v)/sqrt(c) for c > 0, so the two are the same update up to fp32 rounding;
    # both apply decoupled weight decay p *= 1 - lr*wd before the update.
    shapes = [(16, 8), (5,), (1,)]
    ours = [torch.nn.Parameter(randn(*s, seed=i)) for i, s in enumerate(shapes)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = MuonAdamW([adamw_group(ours[:2], lr=0.01, betas=(0.8, 0.95), eps=1e-8, wd=0.1),
                     adamw_group(ours[2:], lr=0.05, betas=(0.96, 0.99), eps=1e-10, wd=0.0)])
    ref = torch.optim.AdamW([dict(params=theirs[:2], lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1),
                             dict(params=theirs[2:], lr=0.05, betas=(0.96, 0.99), eps=1e-10, weight_decay=0.0)],
                            foreach=False)
    for step in range(6):
        for k, (a, b) in enumerate(zip(ours, theirs)):
            g = randn(*a.shape, seed=100 * step + k)
            a.grad, b.grad = g.clone(), g.clone()
        mult = lr_multiplier(step / 5)  # LR changes between steps, both must read it per step
        for go, gr in zip(opt.param_groups, ref.param_groups):
            go["lr"] = gr["lr"] = go["initial_lr"] * mult
        opt.step()
        ref.step()
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert not torch.equal(a, randn(*a.shape, seed=i))  # it moved
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        st, rt = opt.state[a], ref.state[b]
        assert st["step"] == 6 and isinstance(st["step"], int)
        torch.testing.assert_close(st["exp_avg"], rt["exp_avg"])
        torch.testing.assert_close(st["exp_avg_sq"], rt["exp_avg_sq"])


def test_adamw_bf16_param_keeps_bf16_state_and_tracks_fp32():
    init = randn(64, 8, seed=1, scale=0.05)
    p16 = torch.nn.Parameter(init.bfloat16())
    p32 = torch.nn.Parameter(init.bfloat16().float())
    opt16 = MuonAdamW([adamw_group([p16], lr=0.01, wd=0.01)])
    opt32 = MuonAdamW([adamw_group([p32], lr=0.01, wd=0.01)])
    for step in range(3):
        g = randn(64, 8, seed=10 + step)
        p16.grad, p32.grad = g.bfloat16(), g.bfloat16().float()
        opt16.step()
        opt32.step()
    st = opt16.state[p16]
    assert p16.dtype == st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16
    assert (p16.float() - init).abs().max() > 0.02  # three steps of ~lr each actually landed in bf16
    torch.testing.assert_close(p16.float(), p32.detach(), rtol=0, atol=1e-3)


def test_adamw_skips_params_without_grad():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = MuonAdamW([adamw_group([a, b], wd=0.1)])
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b, torch.ones(3)) and b not in opt.state
    assert (a < 1).all()


# ----------------------------------------------------------------------------------------------------------
# Muon: a straight-line reference from the §7.2 text, one matrix at a time

def ref_muon_matrix(p, g, buf, s, lr, mu, wd, beta2):
    """One §7.2 step for a single (rows, cols) fp32 matrix. Returns (p, buf, s)."""
    rows, cols = p.shape
    buf = buf + (1 - mu) * (g - buf)                 # lerp(buf, G, 1-mu)
    u = g + mu * (buf - g)                           # lerp(G, buf, mu)
    target = torch.linalg.matrix_norm(u) / math.sqrt(rows)
    u = u * (target / torch.linalg.vector_norm(u, dim=1, keepdim=True).clamp(min=1e-6))
    x = u / (torch.linalg.matrix_norm(u) * 1.01 + 1e-6)
    for a, b, c in SPEC_COEFFS:
        if rows > cols:
            A = x.T @ x
            x = a * x + x @ (b * A + c * A @ A)
        else:
            A = x @ x.T
            x = a * x + (b * A + c * A @ A) @ x
    u = x * (math.sqrt(min(rows, cols)) / max(torch.linalg.matrix_norm(x).item(), 1e-6))
    dim = 1 if rows >= cols else 0
    v_mean = (u * u).mean(dim=dim, keepdim=True)
    n = u.shape[dim]
    old = math.sqrt(v_mean.sum().item() * n)
    s = s + (1 - beta2) * (v_mean - s)
    step = 1 / torch.sqrt(s.clamp(min=1e-10))
    new = math.sqrt((v_mean * n * step * step).sum().item())
    u = u * step * (old / max(new, 1e-10))
    lr_eff = lr * math.sqrt(max(1.0, rows / cols))
    mask = (u * p >= 0).float()
    p = p - lr_eff * u - lr_eff * wd * p * mask
    return p, buf, s


def ref_muon_param(p, g, buf, s, **hp):
    """A 2-D param, or a 3-D one expert by expert (python loop)."""
    if p.dim() == 2:
        return ref_muon_matrix(p, g, buf, s, **hp)
    outs = [ref_muon_matrix(p[e], g[e], buf[e], s[e], **hp) for e in range(p.shape[0])]
    return tuple(torch.stack(parts) for parts in zip(*outs))


@pytest.mark.parametrize("shape,k", [((32, 16), 2), ((16, 40), 3), ((24, 24), 1), ((3, 16, 8), 2), ((2, 8, 20), 2)],
                         ids=["tall", "wide", "square", "experts-tall", "experts-wide"])
def test_muon_matches_spec_reference(shape, k):
    init = [randn(*shape, seed=i, scale=0.1) for i in range(k)]
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = MuonAdamW([muon_group(params, lr=0.02, momentum=0.85, wd=0.2)], muon_bf16=False)
    rows, cols = shape[-2:]
    s_shape = (*shape[:-1], 1) if rows >= cols else (*shape[:-2], 1, cols)
    ref = [(x.clone(), torch.zeros(shape), torch.zeros(s_shape)) for x in init]
    for step in range(4):
        grads = [randn(*shape, seed=1000 + 10 * step + i) for i in range(k)]
        mult, mu = lr_multiplier(step / 3), muon_momentum(100 * step)
        apply_schedule(opt, mult, mu)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref = [ref_muon_param(p, g, buf, s, lr=0.02 * mult, mu=mu, wd=0.2, beta2=0.9)
               for (p, buf, s), g in zip(ref, grads)]
    for p, (rp, _, _), x in zip(params, ref, init):
        # compare the total update, not the params, so the tolerance bites on what the optimizer did
        torch.testing.assert_close(p.detach() - x, rp - x, rtol=1e-4, atol=1e-6)
        assert (p.detach() - x).abs().max() > 1e-3
    state = opt.state[params[0]]
    torch.testing.assert_close(state["momentum_buffer"], torch.stack([b for _, b, _ in ref]), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(state["second_momentum_buffer"], torch.stack([s for _, _, s in ref]),
                               rtol=1e-4, atol=1e-9)
    assert all(p not in opt.state for p in params[1:])


def test_polar_express_coefficients_are_the_spec_ones():
    assert [tuple(c) for c in POLAR_EXPRESS_COEFFS] == SPEC_COEFFS


@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (48, 48), (4, 48, 24)])
def test_orthogonalize_drives_singular_values_to_one(shape):
    # U diag(s) V^T with singular values spread over two orders of magnitude (condition number 100)
    g = torch.Generator().manual_seed(7)
    *lead, rows, cols = shape
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(*lead, rows, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(*lead, cols, k, generator=g))
    x = u @ torch.diag_embed(torch.logspace(0, -2, k).expand(*lead, k)) @ v.mT
    sv = torch.linalg.svdvals(orthogonalize(x))
    # Polar Express aims for [1 - 0.14, 1 + 0.14] rather than exactly 1 (its safety margin)
    assert sv.min() > 0.8 and sv.max() < 1.2, (sv.min(), sv.max())
    assert (sv - 1).abs().mean() < 0.12


# ----------------------------------------------------------------------------------------------------------
# state layout, round trip, warm start

def model_params(seed=0):
    """One of each kind: small/large fp32 AdamW, a bf16 embedding, tall/wide 2-D and 3-D Muon groups."""
    shapes = [("scalars", (4,), torch.float32), ("wte", (64, 32), torch.bfloat16), ("lm_head", (64, 32), torch.float32),
              ("ve_gate", (6, 12), torch.float32),
              ("q0", (16, 32), torch.float32), ("q1", (16, 32), torch.float32), ("q2", (16, 32), torch.float32),
              ("fc0", (32, 16), torch.float32), ("fc1", (32, 16), torch.float32),
              ("up0", (3, 16, 8), torch.float32), ("up1", (3, 16, 8), torch.float32),
              ("down0", (2, 8, 20), torch.float32)]
    return {name: torch.nn.Parameter(randn(*shape, seed=seed + i, scale=0.1, dtype=dt))
            for i, (name, shape, dt) in enumerate(shapes)}


def model_groups(P, wd=0.1):
    return [adamw_group([P["lm_head"]], lr=0.004, betas=(0.8, 0.96), wd=0.01),
            adamw_group([P["wte"]], lr=0.2, betas=(0.8, 0.995), wd=0.001),
            adamw_group([P["scalars"]], lr=0.5, betas=(0.96, 0.95)),
            muon_group([P["ve_gate"]], wd=wd),
            muon_group([P["q0"], P["q1"], P["q2"]], wd=wd),
            muon_group([P["fc0"], P["fc1"]], wd=wd),
            muon_group([P["up0"], P["up1"]], wd=wd),
            muon_group([P["down0"]], wd=wd)]


def batch(P, step, rows=4):
    return {name: randn(rows, *p.shape, seed=10_000 * step + i) for i, (name, p) in enumerate(P.items())}


def grads(P, data):
    """Gradients of a small nonlinear loss, averaged over the batch rows (so half batches average exactly)."""
    out = {}
    for name, p in P.items():
        w = p.detach().float().requires_grad_(True)
        s = (w.unsqueeze(0) * data[name]).flatten(1).sum(1)
        loss = (torch.tanh(s) ** 2 + 0.1 * s).mean()
        (g,) = torch.autograd.grad(loss, w)
        out[name] = g.to(p.dtype)
    return out


def train(opt, P, steps, start=0):
    for step in range(start, start + steps):
        for name, g in grads(P, batch(P, step)).items():
            P[name].grad = g
        apply_schedule(opt, lr_multiplier(step / 6), muon_momentum(100 * step))
        opt.step()


def test_state_layout_matches_reference():
    P = model_params()
    opt = MuonAdamW(model_groups(P))
    train(opt, P, 1)
    sd = opt.state_dict()
    # global index = position over all groups' params concatenated in group order (§5.4)
    assert [g["params"] for g in sd["param_groups"]] == [[0], [1], [2], [3], [4, 5, 6], [7, 8], [9, 10], [11]]
    assert set(sd["state"]) == {0, 1, 2, 3, 4, 7, 9, 11}  # AdamW params + first param of each Muon group
    for i in (0, 1, 2):
        st = sd["state"][i]
        assert set(st) == {"step", "exp_avg", "exp_avg_sq"} and st["step"] == 1
    assert sd["state"][1]["exp_avg"].dtype == torch.bfloat16 and sd["state"][1]["exp_avg"].shape == (64, 32)
    expect = {3: ((1, 6, 12), (1, 1, 12)), 4: ((3, 16, 32), (3, 1, 32)), 7: ((2, 32, 16), (2, 32, 1)),
              9: ((2, 3, 16, 8), (2, 3, 16, 1)), 11: ((1, 2, 8, 20), (1, 2, 1, 20))}
    for i, (mb, smb) in expect.items():
        st = sd["state"][i]
        assert set(st) == {"momentum_buffer", "second_momentum_buffer"}
        assert (tuple(st["momentum_buffer"].shape), tuple(st["second_momentum_buffer"].shape)) == (mb, smb)
        assert st["momentum_buffer"].dtype == torch.float32
    g0, g3 = sd["param_groups"][0], sd["param_groups"][3]
    assert set(g0) == {"kind", "params", "lr", "initial_lr", "betas", "eps", "weight_decay"}
    assert set(g3) == {"kind", "params", "lr", "initial_lr", "momentum", "ns_steps", "beta2", "weight_decay"}
    assert (g0["kind"], g3["kind"]) == ("adamw", "muon")


def test_state_dict_round_trip_continues_identically():
    P_ref = model_params()
    opt_ref = MuonAdamW(model_groups(P_ref))
    train(opt_ref, P_ref, 5)

    P = model_params()
    opt = MuonAdamW(model_groups(P))
    train(opt, P, 2)
    blob = io.BytesIO()
    torch.save({"params": {k: v.detach() for k, v in P.items()}, "optim": opt.state_dict()}, blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)

    P2 = {k: torch.nn.Parameter(v.clone()) for k, v in saved["params"].items()}
    opt2 = MuonAdamW(model_groups(P2, wd=0.5))  # the loaded hyperparameters win over the constructor's
    opt2.load_state_dict(saved["optim"])
    assert opt2.param_groups[4]["weight_decay"] == 0.1
    train(opt2, P2, 3, start=2)
    for name in P_ref:
        assert torch.equal(P2[name], P_ref[name]), name
    assert opt2.state[P2["wte"]]["exp_avg"].dtype == torch.bfloat16
    assert opt2.state[P2["wte"]]["step"] == 5


def test_warm_start_restores_fresh_lrs_and_applies_init_lr_frac():
    P_base = model_params()
    base = MuonAdamW(model_groups(P_base))
    train(base, P_base, 2)
    # end of pretraining: decayed Muon weight decay, scheduled momentum and lr
    for g in base.param_groups:
        g["lr"] *= 0.05
        if g["kind"] == "muon":
            g["weight_decay"], g["momentum"] = 0.0, 0.97
    sd = base.state_dict()

    P = model_params(seed=0)
    fresh = model_groups(P, wd=0.3)
    for g in fresh:
        g["lr"] = g["initial_lr"] = g["lr"] * 3  # this run's own LRs
    fresh_lrs = [g["lr"] for g in fresh]
    opt = MuonAdamW(fresh)
    warm_start(opt, sd, init_lr_frac=0.8)
    for g, lr in zip(opt.param_groups, fresh_lrs):
        assert g["lr"] == pytest.approx(lr * 0.8) and g["initial_lr"] == g["lr"]
        if g["kind"] == "muon":
            assert (g["weight_decay"], g["momentum"]) == (0.0, 0.97)  # loaded, not the constructor's 0.3
    torch.testing.assert_close(opt.state[P["q0"]]["momentum_buffer"], base.state[P_base["q0"]]["momentum_buffer"],
                               rtol=0, atol=0)
    assert opt.state[P["lm_head"]]["step"] == 2
    apply_schedule(opt, 0.5, 0.9)
    assert opt.param_groups[0]["lr"] == pytest.approx(fresh_lrs[0] * 0.8 * 0.5)
    with pytest.raises(ValueError, match="init_lr_frac"):
        warm_start(opt, sd, init_lr_frac=-1.0)


def test_loading_mismatched_state_raises_clear_errors():
    P = model_params()
    opt = MuonAdamW(model_groups(P))
    train(opt, P, 1)
    sd = opt.state_dict()

    # a distributed shard (world size 2) into a single-process optimizer
    shard = {"state": {**sd["state"], 4: {**sd["state"][4], "momentum_buffer": sd["state"][4]["momentum_buffer"][:2]}},
             "param_groups": sd["param_groups"]}
    with pytest.raises(ValueError, match=r"group 4 \(muon\).*momentum_buffer.*\(2, 16, 32\).*world size"):
        MuonAdamW(model_groups(model_params())).load_state_dict(shard)

    # a different grouping
    P2 = model_params()
    other = MuonAdamW([g for i, g in enumerate(model_groups(P2)) if i != 2] + [adamw_group([P2["scalars"]])])
    with pytest.raises(ValueError, match="param group 2"):
        other.load_state_dict(sd)


@pytest.mark.parametrize("groups,match", [
    ([dict(kind="sgd", params=[torch.zeros(2)], lr=0.1)], "kind must be"),
    ([dict(kind="adamw", params=[torch.zeros(2)], lr=0.1, betas=(0.9, 0.9))], r"missing keys \['eps', 'weight_decay'\]"),
    ([muon_group([torch.zeros(4, 4), torch.zeros(4, 5)])], "share one shape"),
    ([muon_group([torch.zeros(4)])], "2-D or more"),
    ([], "non-empty"),
])
def test_bad_groups_raise(groups, match):
    with pytest.raises(ValueError, match=match):
        MuonAdamW(groups)


def test_muon_group_with_partial_grads_raises():
    a, b = torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(4, 4))
    opt = MuonAdamW([muon_group([a, b])])
    opt.step()  # no grads at all: nothing happens
    assert a not in opt.state
    a.grad = torch.ones(4, 4)
    with pytest.raises(RuntimeError, match="no grad"):
        opt.step()


# ----------------------------------------------------------------------------------------------------------
# distributed: 2 gloo ranks, each with half the batch == one process with the averaged grads

DIST_STEPS = 3


def dist_params():
    shapes = [("bias", (16,)), ("small", (4, 4)), ("emb", (64, 32)),           # AdamW: two small, one sharded
              ("a0", (16, 32)), ("a1", (16, 32)), ("a2", (16, 32)),           # K=3 over 2 ranks: 2 + 1
              ("b0", (32, 16)),                                               # K=1: rank 1 owns nothing
              ("e0", (3, 16, 8)), ("e1", (3, 16, 8)),                         # 3-D experts, K=2
              ("s0", (24, 24)), ("s1", (24, 24)), ("s2", (24, 24)), ("s3", (24, 24))]
    return {name: torch.nn.Parameter(randn(*shape, seed=50 + i, scale=0.1)) for i, (name, shape) in enumerate(shapes)}


def dist_groups(P):
    return [adamw_group([P["bias"], P["small"]], lr=0.05, wd=0.01),
            adamw_group([P["emb"]], lr=0.2, betas=(0.8, 0.995), wd=0.001),
            muon_group([P["a0"], P["a1"], P["a2"]], wd=0.1),
            muon_group([P["b0"]], wd=0.1),
            muon_group([P["e0"], P["e1"]], wd=0.1),
            muon_group([P[f"s{i}"] for i in range(4)], wd=0.1)]


def half_grads(P, step, rank, world=2):
    full = batch(P, step, rows=4)
    n = 4 // world
    return grads(P, {k: v[rank * n:(rank + 1) * n] for k, v in full.items()})


def _dist_worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        P = dist_params()
        opt = DistMuonAdamW(dist_groups(P))
        for step in range(DIST_STEPS):
            for name, g in half_grads(P, step, rank, world).items():
                P[name].grad = g
            apply_schedule(opt, lr_multiplier(step / DIST_STEPS), muon_momentum(150 * step))
            opt.step()
        # a rank's shard reloads into a fresh optimizer of the same world size (shape checks pass)
        DistMuonAdamW(dist_groups(dist_params())).load_state_dict(opt.state_dict())
        torch.save({"params": {k: v.detach() for k, v in P.items()}, "optim": opt.state_dict()},
                   f"{out_file}{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_matches_single_process(tmp_path):
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "rank")), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))

    P = dist_params()
    opt = MuonAdamW(dist_groups(P))
    for step in range(DIST_STEPS):
        g0, g1 = half_grads(P, step, 0), half_grads(P, step, 1)
        for name in P:
            P[name].grad = (g0[name] + g1[name]) / 2
        apply_schedule(opt, lr_multiplier(step / DIST_STEPS), muon_momentum(150 * step))
        opt.step()

    for name, p in P.items():
        assert torch.equal(r0["params"][name], r1["params"][name]), f"ranks disagree on {name}"
        assert not torch.equal(p.detach(), dist_params()[name].detach())
        torch.testing.assert_close(r0["params"][name], p.detach(), rtol=1e-5, atol=1e-6, msg=name)

    single = opt.state_dict()["state"]
    s0, s1 = r0["optim"]["state"], r1["optim"]["state"]
    # small AdamW params: full, replicated state; large: each rank holds its dim-0 half
    for i in (0, 1):
        for s in (s0, s1):
            torch.testing.assert_close(s[i]["exp_avg_sq"], single[i]["exp_avg_sq"])
            assert s[i]["step"] == DIST_STEPS
    assert s0[2]["exp_avg"].shape == (32, 32)
    torch.testing.assert_close(torch.cat([s0[2]["exp_avg"], s1[2]["exp_avg"]]), single[2]["exp_avg"])
    # Muon: state on the group's first param, (chunk, ...) per rank; rank r owns params [r*chunk, r*chunk+chunk)
    for first, k, shape in [(3, 3, (16, 32)), (6, 1, (32, 16)), (7, 2, (3, 16, 8)), (9, 4, (24, 24))]:
        chunk = -(-k // 2)
        owned = [min(chunk, max(0, k - r * chunk)) for r in (0, 1)]
        for s in (s0, s1):
            assert tuple(s[first]["momentum_buffer"].shape) == (chunk, *shape)
        bufs = torch.cat([s0[first]["momentum_buffer"][:owned[0]], s1[first]["momentum_buffer"][:owned[1]]])
        torch.testing.assert_close(bufs, single[first]["momentum_buffer"], rtol=1e-5, atol=1e-7)
        smbs = torch.cat([s0[first]["second_momentum_buffer"][:owned[0]],
                          s1[first]["second_momentum_buffer"][:owned[1]]])
        torch.testing.assert_close(smbs, single[first]["second_momentum_buffer"], rtol=1e-4, atol=1e-9)
        if owned[1] < chunk:  # the padding slot never trains
            assert not s1[first]["momentum_buffer"][owned[1]:].any()
    assert set(s0) == set(s1) == {0, 1, 2, 3, 6, 7, 9}
    with pytest.raises(ValueError, match="world size"):  # a rank shard is not a single-process state
        MuonAdamW(dist_groups(dist_params())).load_state_dict(r0["optim"])
