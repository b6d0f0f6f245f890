"""trainer.softcap_ce (lm_head over the supervised rows, softcap + cross-entropy in one Triton kernel) against
what torch.compile makes of the model's plain expression.

    python bench/bench_softcap_ce.py [--tokens 65536] [--dims 768,1280] [--vocab 32768]
        [--supervised 0.6,1.0] [--configs 32768:16,32768:32,8192:8,4096:8] [--rounds 5]

Per model width C (d12: 768, d20: 1280) and fraction of tokens with a target (the bench's synthetic SFT rows:
0.6), bf16:
1. the kernel alone per BLOCK:warps on the supervised rows' logits (ms, GB/s of one read and one write);
2. the loss forward + backward: the plain expression compiled, softcap_ce eager and compiled, and lm_head's
   three GEMMs alone over every row (the plain path's floor), with the peak memory above the inputs and each
   one's relative error from a float32 run (loss, d x, d w).
Candidates interleaved round by round; medians of CUDA-event times.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cuda_timing import errors_and_peaks, fwd_bwd, interleaved  # noqa: E402
from trainer import softcap_ce  # noqa: E402

CAP = 15.0


def plain_loss(x, w, targets, vocab):
    logits = F.linear(x, w)[..., :vocab].float()
    logits = CAP * torch.tanh(logits / CAP)
    return F.cross_entropy(logits.view(-1, vocab), targets, ignore_index=-1, reduction="sum")


def bench_kernel(n: int, vocab: int, configs: list[str], rounds: int, iters: int) -> None:
    torch.manual_seed(0)
    logits = (torch.randn(n, vocab, device="cuda") * 4).bfloat16()
    targets = torch.randint(0, vocab, (n,), device="cuda")
    runs = {}
    for text in configs:
        block, warps = (int(v) for v in text.split(":"))
        runs[f"kernel {text}"] = lambda b=block, w=warps: softcap_ce.softcap_ce_rows(logits, targets, vocab, CAP,
                                                                                      block=b, warps=w)
    print(f"| kernel alone, {n} rows x {vocab} | ms | GB/s (one read, one write) |")
    print("|---|---|---|")
    for name, ms in interleaved(runs, rounds, iters).items():
        print(f"| {name} | {ms:.3f} | {2 * logits.numel() * 2 / ms / 1e6:.0f} |")


def bench_loss(C: int, tokens: int, vocab: int, supervised: float, rounds: int, iters: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(tokens, C, device="cuda").bfloat16()
    w = (torch.randn(vocab, C, device="cuda") * 3 * C ** -0.5).bfloat16()
    targets = torch.randint(0, vocab, (tokens,), device="cuda")
    targets[torch.rand(tokens, device="cuda") >= supervised] = -1
    leaves = [t.clone().requires_grad_() for t in (x, w)]
    ref_leaves = [t.float().requires_grad_() for t in (x, w)]
    ref_loss = plain_loss(*ref_leaves, targets, vocab)
    ref_loss.backward()

    def fused_loss(x, w, targets, vocab):
        return softcap_ce.softcap_ce(x, w, targets, vocab, CAP)

    candidates = {"plain, compiled": torch.compile(plain_loss, dynamic=False), "softcap_ce": fused_loss,
                  "softcap_ce, compiled": torch.compile(fused_loss, dynamic=False)}

    g = torch.randn(tokens, vocab, device="cuda").bfloat16()

    def gemms():  # lm_head over every row: forward, d x, d w
        x @ w.t(), g @ w, g.t() @ x

    runs = {name: fwd_bwd(fn, leaves, targets, vocab) for name, fn in candidates.items()}
    errors, peaks = errors_and_peaks(runs, leaves, ref_loss, ref_leaves)
    runs["lm_head's 3 GEMMs, every row"] = gemms
    print(f"\n## C = {C}, {tokens} tokens, {supervised:.0%} with a target, vocab {vocab}")
    print("| loss fwd+bwd | ms | peak GiB above inputs | rel. error from fp32: loss, dx, dw |")
    print("|---|---|---|---|")
    for name, ms in interleaved(runs, rounds, iters).items():
        errs = ", ".join(f"{e:.2e}" for e in errors[name]) if name in errors else "-"
        print(f"| {name} | {ms:.3f} | {peaks.get(name, float('nan')):.2f} | {errs} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32 * 2048)
    ap.add_argument("--dims", default="768,1280")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--supervised", default="0.6,1.0")
    ap.add_argument("--configs", default="8192:8,8192:4,8192:16,4096:4,16384:8,32768:32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    if not torch.cuda.is_available() or not softcap_ce.available():
        print("bench_softcap_ce needs a CUDA GPU and Triton")
        return 1
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, default BLOCK {softcap_ce.BLOCK}, "
          f"warps {softcap_ce.WARPS}")
    bench_kernel(int(args.tokens * 0.6), args.vocab, args.configs.split(","), args.rounds, args.iters)
    for C in (int(v) for v in args.dims.split(",")):
        for frac in (float(v) for v in args.supervised.split(",")):
            bench_loss(C, args.tokens, args.vocab, frac, args.rounds, args.iters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
