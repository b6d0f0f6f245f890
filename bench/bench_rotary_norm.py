"""trainer.rotary_norm against what torch.compile makes of the model's plain expression, at the model's shapes.

    python bench/bench_rotary_norm.py [--batch 32] [--seq-len 2048] [--heads 10] [--head-dim 128]
        [--configs 16:4,8:2,32:4,32:8] [--rounds 5]

Rotary + QK norm of one (B, T, H, D) bf16 tensor (q or k of one layer), forward and backward: the plain
expression compiled vs rotary_norm; then the two kernels alone for each ROWS:num_warps config, with the bytes
they must move (forward: read x, write y; backward: read dy and y, write dx) as GB/s. Candidates interleaved
round by round (the card's clock drifts under its power cap); medians of CUDA-event times; peak memory above
the inputs, which includes what each keeps for its backward.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cuda_timing import fwd_bwd, interleaved, peak_gib  # noqa: E402
from trainer import rotary_norm  # noqa: E402
from trainer.model import QK_SCALE, apply_rotary, norm, rotary_tables  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=10)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--configs", default="16:4,8:2,32:4,32:8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    if not torch.cuda.is_available() or not rotary_norm.available():
        print(f"bench_rotary_norm needs a CUDA GPU and Triton ({rotary_norm.load_error()})")
        return 1
    torch.manual_seed(0)
    B, T, H, D = args.batch, args.seq_len, args.heads, args.head_dim
    cos, sin = rotary_tables(T, D, "cuda", torch.bfloat16)
    c2, s2 = cos[0, :, 0].contiguous(), sin[0, :, 0].contiguous()
    x = torch.randn(B, T, H, D, device="cuda").bfloat16().requires_grad_()
    dy = torch.randn(B, T, H, D, device="cuda").bfloat16()

    def plain(t):
        return norm(apply_rotary(t, cos, sin)) * QK_SCALE

    def kernels(rows: int, warps: int):
        def run():
            y, inv = rotary_norm.rotary_norm_forward(x, c2, s2, QK_SCALE, rows=rows, num_warps=warps)
            rotary_norm.rotary_norm_backward(dy, y, inv, c2, s2, QK_SCALE, rows=rows, num_warps=warps)
        return run

    candidates = {"plain, compiled": fwd_bwd(torch.compile(plain, dynamic=False), [x], grad=dy),
                  "rotary_norm": fwd_bwd(lambda t: rotary_norm.rotary_norm(t, c2, s2, QK_SCALE), [x], grad=dy)}
    for cfg in args.configs.split(","):
        rows, warps = (int(v) for v in cfg.split(":"))
        candidates[f"kernels ROWS={rows} warps={warps}"] = kernels(rows, warps)
    peaks = {}
    for name, fn in candidates.items():  # compile and warm up
        fn()
        peaks[name] = peak_gib(fn)
    times = interleaved(candidates, args.rounds, args.iters)
    moved = 5 * x.numel() * x.element_size()  # forward 2, backward 3 tensors of x's size
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; (B, T, H, D) = ({B}, {T}, {H}, {D}) bf16")
    print("| candidate | fwd+bwd ms | GB/s (5 tensors moved) | peak GiB above inputs |")
    print("|---|---|---|---|")
    for name, ms in times.items():
        print(f"| {name} | {ms:.3f} | {moved / ms / 1e6:,.0f} | {peaks[name]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
