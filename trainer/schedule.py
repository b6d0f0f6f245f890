"""chat_sft's LR and Muon momentum schedules (nanochat-reference §10.4), as pure functions of progress/step."""

from __future__ import annotations

import math


def lr_multiplier(progress: float, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.5,
                  final_lr_frac: float = 0.0) -> float:
    """LR multiplier at training progress p: linear warmup over `warmup_ratio`, flat at 1, then linear
    warmdown over the last `warmdown_ratio` to `final_lr_frac`.

    Progress is clamped to [0, 1]. Upstream does not clamp, and progress can exceed 1 (epoch mode's last step,
    or `--num-iterations` counting micro-batches, §4.7), which makes its multiplier, and so the LR, negative.
    """
    if not math.isfinite(progress):
        raise ValueError(f"progress must be a finite number, got {progress}")
    for name, value in (("warmup_ratio", warmup_ratio), ("warmdown_ratio", warmdown_ratio),
                        ("final_lr_frac", final_lr_frac)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    p = min(max(progress, 0.0), 1.0)
    if p < warmup_ratio:
        return (p + 1e-8) / warmup_ratio
    if p <= 1.0 - warmdown_ratio:
        return 1.0
    d = (p - (1.0 - warmdown_ratio)) / warmdown_ratio
    return (1.0 - d) + d * final_lr_frac


def muon_momentum(step: int) -> float:
    """Muon momentum at optimizer step s (0-based): 0.85 ramping linearly to 0.95 over the first 300 steps."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    f = min(step / 300, 1.0)
    return (1 - f) * 0.85 + f * 0.95


def apply_schedule(optimizer, lr_mult: float, momentum: float) -> None:
    """Set every group's lr to initial_lr * lr_mult and every Muon group's momentum (once per step)."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_mult
        if group.get("kind") == "muon":
            group["momentum"] = momentum
