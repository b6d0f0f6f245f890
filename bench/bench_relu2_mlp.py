"""trainer.relu2_mlp's fused GEMMs against cuBLAS and what torch.compile makes of the plain MLP.

    python bench/bench_relu2_mlp.py [--tokens 65536] [--dims 1280,768] [--rounds 5]
        [--configs 128:256:64:3:8:1:0,...]   (BM:BN:BK:stages:warps:subtile:warp_specialize)

Per model width C (d20: 1280, d12: 768), bf16, tokens = B x T of a micro-batch:
1. each fused GEMM alone per tile config, against cuBLAS's plain GEMM of the same shape (TFLOP/s);
2. the whole MLP forward + backward: the plain expression compiled, against relu2_mlp (FWD_CONFIG and
   GRAD_CONFIG),
   with the peak memory above the inputs (what each keeps for its backward) and each one's relative error
   from an fp32 run (output and the three gradients).
Candidates interleaved round by round (the card's clock drifts under its power cap); medians of CUDA-event
times.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cuda_timing import errors_and_peaks, fwd_bwd, interleaved  # noqa: E402
from trainer import relu2_mlp  # noqa: E402

DEFAULT_CONFIGS = "128:256:64:3:8:1:0,128:256:64:4:8:1:0,128:256:64:3:8:1:1,128:256:64:4:8:1:1,128:128:64:4:8:0:0"


def parse_config(text: str) -> relu2_mlp.GemmConfig:
    bm, bn, bk, stages, warps, sub, ws = (int(v) for v in text.split(":"))
    return relu2_mlp.GemmConfig(bm, bn, bk, 8, stages, warps, bool(sub), bool(ws))


def plain_mlp(x, w_fc, w_proj):
    return F.linear(F.relu(F.linear(x, w_fc)).square(), w_proj)


def bench_width(C: int, tokens: int, configs: list[str], rounds: int, iters: int) -> None:
    torch.manual_seed(0)
    H = 4 * C
    x = torch.randn(tokens, C, device="cuda").bfloat16()
    w_fc = (torch.randn(H, C, device="cuda") * C ** -0.5).bfloat16()
    w_proj = (torch.randn(C, H, device="cuda") * H ** -0.5).bfloat16()
    g = torch.randn(tokens, C, device="cuda").bfloat16()
    a = relu2_mlp.relu2_matmul(x, w_fc, b_kmajor=True)
    flops = 2 * tokens * C * H
    print(f"\n## C = {C}: ({tokens} x {C}) @ ({C} x {H}), {flops / 1e9:.0f} GFLOP per GEMM")
    gemms = {"cuBLAS x @ w_fc.T": lambda: x @ w_fc.t(), "cuBLAS g @ w_proj": lambda: g @ w_proj}
    for text in configs:
        cfg = parse_config(text)
        gemms[f"fused fwd {text}"] = lambda cfg=cfg: relu2_mlp.relu2_matmul(x, w_fc, b_kmajor=True, config=cfg)
        gemms[f"fused grad {text}"] = lambda cfg=cfg: relu2_mlp.relu2_matmul(g, w_proj, a, b_kmajor=False,
                                                                              config=cfg)
    usable = {}
    for name, fn in gemms.items():
        try:
            fn()
            torch.cuda.synchronize()
            usable[name] = fn
        except Exception as e:  # a config that does not compile or fit on this card
            print(f"- {name}: failed, {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    print("| GEMM | ms | TFLOP/s |")
    print("|---|---|---|")
    for name, ms in interleaved(usable, rounds, iters).items():
        print(f"| {name} | {ms:.3f} | {flops / ms / 1e9:.0f} |")

    leaves = [t.clone().requires_grad_() for t in (x, w_fc, w_proj)]
    ref_leaves = [t.float().requires_grad_() for t in (x, w_fc, w_proj)]
    ref_out = plain_mlp(*ref_leaves)
    ref_out.backward(g.float())
    compiled = torch.compile(plain_mlp, dynamic=False)
    candidates = {"plain, compiled": compiled, "relu2_mlp": relu2_mlp.relu2_mlp}
    runs = {name: fwd_bwd(fn, leaves, grad=g) for name, fn in candidates.items()}
    errors, peaks = errors_and_peaks(runs, leaves, ref_out, ref_leaves)
    print("| MLP fwd+bwd | ms | peak GiB above inputs | rel. error from fp32: out, dx, dw_fc, dw_proj |")
    print("|---|---|---|---|")
    for name, ms in interleaved(runs, rounds, iters).items():
        errs = ", ".join(f"{e:.2e}" for e in errors[name])
        print(f"| {name} | {ms:.3f} | {peaks[name]:.2f} | {errs} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32 * 2048)
    ap.add_argument("--dims", default="1280,768")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    if not torch.cuda.is_available() or not relu2_mlp.available():
        print("bench_relu2_mlp needs a CUDA GPU and Triton with TMA descriptors")
        return 1
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, fwd {relu2_mlp.FWD_CONFIG}, grad {relu2_mlp.GRAD_CONFIG}")
    for C in (int(v) for v in args.dims.split(",")):
        bench_width(C, args.tokens, args.configs.split(","), args.rounds, args.iters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
