import math

import pytest
import torch

from trainer.optim import MuonAdamW
from trainer.schedule import apply_schedule, lr_multiplier, muon_momentum


def test_default_schedule_flat_then_linear_warmdown():
    # defaults: constant 1 until p = 0.5, then linear to 0 at p = 1
    assert lr_multiplier(0.0) == 1.0
    assert lr_multiplier(0.25) == 1.0
    assert lr_multiplier(0.5) == 1.0
    assert lr_multiplier(0.75) == pytest.approx(0.5)
    assert lr_multiplier(0.9) == pytest.approx(0.2)
    assert lr_multiplier(1.0) == 0.0


def test_final_lr_frac_is_the_floor():
    assert lr_multiplier(1.0, final_lr_frac=0.1) == pytest.approx(0.1)
    assert lr_multiplier(0.75, final_lr_frac=0.1) == pytest.approx(0.55)
    assert lr_multiplier(0.5, final_lr_frac=0.1) == 1.0


def test_warmup():
    # (p + 1e-8) / warmup_ratio below the warmup ratio
    assert lr_multiplier(0.0, warmup_ratio=0.1) == pytest.approx(1e-7, rel=1e-6)
    assert lr_multiplier(0.05, warmup_ratio=0.1) == pytest.approx(0.5)
    assert lr_multiplier(0.1, warmup_ratio=0.1) == 1.0
    # warmup and warmdown together
    assert lr_multiplier(0.1, warmup_ratio=0.2, warmdown_ratio=0.4) == pytest.approx(0.5)
    assert lr_multiplier(0.6, warmup_ratio=0.2, warmdown_ratio=0.4) == 1.0
    assert lr_multiplier(0.8, warmup_ratio=0.2, warmdown_ratio=0.4) == pytest.approx(0.5)


def test_no_warmdown_is_flat():
    assert [lr_multiplier(p, warmdown_ratio=0.0) for p in (0.0, 0.5, 1.0)] == [1.0, 1.0, 1.0]


def test_progress_is_clamped_so_lr_never_goes_negative():
    # upstream's unclamped formula gives (1 - 1.4) = -0.4 at p = 1.2 with the defaults
    assert lr_multiplier(1.2) == 0.0
    assert lr_multiplier(1.2, final_lr_frac=0.1) == pytest.approx(0.1)
    assert lr_multiplier(-0.3) == 1.0
    assert all(lr_multiplier(1 + k / 10) >= 0 for k in range(20))


@pytest.mark.parametrize("kwargs", [dict(warmup_ratio=-0.1), dict(warmdown_ratio=1.5), dict(final_lr_frac=2.0)])
def test_bad_ratios_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        lr_multiplier(0.3, **kwargs)


def test_nan_progress_raises():
    with pytest.raises(ValueError, match="progress"):
        lr_multiplier(math.nan)


def test_muon_momentum_ramp():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95)
    assert muon_momentum(1000) == pytest.approx(0.95)
    with pytest.raises(ValueError):
        muon_momentum(-1)


def test_apply_schedule_sets_lr_from_initial_lr_and_muon_momentum():
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3, 5))
    opt = MuonAdamW([
        dict(kind="adamw", params=[a], lr=0.2, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0),
        dict(kind="muon", params=[b], lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.0),
    ])
    for step, p in [(0, 0.0), (150, 0.75), (400, 1.0)]:
        apply_schedule(opt, lr_multiplier(p), muon_momentum(step))
        adamw, muon = opt.param_groups
        assert adamw["lr"] == pytest.approx(0.2 * lr_multiplier(p))
        assert muon["lr"] == pytest.approx(0.02 * lr_multiplier(p))
        assert muon["momentum"] == pytest.approx(muon_momentum(step))
        assert "momentum" not in adamw
        # initial_lr is the anchor and never moves
        assert (adamw["initial_lr"], muon["initial_lr"]) == (0.2, 0.02)
