"""FlexAttention kernel options for the training path, measured at the model's own shapes.

    python bench/bench_attention.py [--batch 32] [--heads 10] [--seq-len 2048] [--rounds 5]

Times forward+backward of the compiled flex_attention for nanochat's two window sizes (short S = a
quarter of the row, long L = the row) under each candidate `kernel_options`, and, for the long window
(plain causal attention), SDPA's causal kernels ("sdpa:cudnn", "sdpa:flash", "sdpa:efficient"), and for
both windows "cudnn:band" (cuDNN's diagonal band through the frontend, trainer.cudnn_window); the
candidates interleaved round by round so that clock drift hits them alike; prints the median per
candidate and window, its ratio to the inductor defaults, and each candidate's largest difference from
the defaults in the output and the gradients. Winners go into trainer.model (FLEX_KERNEL_OPTIONS,
CAUSAL_SDPA_BACKEND, WINDOW_BACKEND).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import cudnn_window  # noqa: E402
from trainer.model import _window_mod, short_window  # noqa: E402

CANDIDATES = {
    "defaults": None,
    "defaults again": None,  # the same version twice: the spread between them is the noise
    "safe": {"ROWS_GUARANTEED_SAFE": True},
    "safe+contiguous": {"ROWS_GUARANTEED_SAFE": True, "BLOCKS_ARE_CONTIGUOUS": True},
    "tma": {"USE_TMA": True},
    "safe+contiguous+tma": {"ROWS_GUARANTEED_SAFE": True, "BLOCKS_ARE_CONTIGUOUS": True, "USE_TMA": True},
    "bwd 64/128 s2": {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 64,
                      "bwd_num_stages": 2, "bwd_num_warps": 8},
    "fwd 128/128 w8 s2": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 2},
}
SDPA = {"sdpa:cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa:flash": SDPBackend.FLASH_ATTENTION,
        "sdpa:efficient": SDPBackend.EFFICIENT_ATTENTION}  # causal only: the long window
BAND = "cudnn:band"  # any window


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--heads", type=int, default=10)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--candidates", default=",".join([*CANDIDATES, *SDPA, BAND]))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention needs a CUDA GPU")
        return 1
    dev = torch.device("cuda")
    B, H, T, D = args.batch, args.heads, args.seq_len, args.head_dim
    short = short_window(T)
    torch._dynamo.config.recompile_limit = 64  # one graph per (candidate, window)
    flex = torch.compile(flex_attention, dynamic=False)
    names = args.candidates.split(",")
    q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16)
    masks = {left: create_block_mask(_window_mod(left), None, None, T, T, device=dev) for left in (short, T)}
    ref = {left: None for left in masks}

    def run(name, left):
        if name == BAND:
            out = cudnn_window.band_attention(q, k, v, left)
        elif name in SDPA:
            with sdpa_kernel([SDPA[name]]):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = flex(q, k, v, block_mask=masks[left], kernel_options=CANDIDATES[name])
        out.backward(grad)
        return out

    def windows(name):
        return [T] if name in SDPA else list(masks)

    failed = set()
    if BAND in names and not cudnn_window.available():
        print(f"{BAND}: the cuDNN frontend is not available ({cudnn_window.load_error()})")
        failed.add(BAND)
    for name in names:  # compile every candidate, check it against the defaults
        for left in windows(name):
            try:
                out = run(name, left).detach().float()
            except Exception as e:  # a config the card cannot run is reported, not fatal
                print(f"{name} window {left}: {type(e).__name__}: {str(e)[:200]}")
                failed.add(name)
                continue
            grads = [t.grad.float() for t in (q, k, v)]
            if ref[left] is None:
                ref[left] = (out, grads)
            err = (out - ref[left][0]).abs().max().item()
            gerr = max((g - r).abs().max().item() for g, r in zip(grads, ref[left][1]))
            finite = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
            print(f"compiled {name:22s} window {left:5d}: max |out - defaults| {err:.2e}, max |grad - defaults| "
                  f"{gerr:.2e}{'' if finite else '  NOT FINITE: rejected'}")
            if not finite:  # a wrong kernel is not a candidate (and NaN data changes power draw, hence clocks)
                failed.add(name)
            for t in (q, k, v):
                t.grad = None
    times = {(n, left): [] for n in names for left in windows(n)}
    for _ in range(args.rounds):
        for name in names:
            if name in failed:
                continue
            for left in windows(name):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                for _ in range(args.iters):
                    run(name, left)
                e1.record()
                torch.cuda.synchronize()
                times[(name, left)].append(e0.elapsed_time(e1) / args.iters)
    print(f"\n# {torch.cuda.get_device_name()}, torch {torch.__version__}, B={B} H={H} T={T} D={D}, fwd+bwd ms")
    print("| candidate | " + " | ".join(f"window {left} ms | vs defaults" for left in masks) + " |")
    print("|---|" + "---|---|" * len(masks))
    rows = []
    for name in names:
        if name in failed:
            continue
        cells = []
        for left in masks:
            if (name, left) not in times:
                cells.append("- | -")
                continue
            ms = statistics.median(times[(name, left)])
            base = statistics.median(times[(names[0], left)])
            cells.append(f"{ms:.2f} | {ms / base:.3f}")
            rows.append({"candidate": name, "window": left, "ms": ms, "spread": (max(times[(name, left)]) -
                                                                                 min(times[(name, left)])) / ms})
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
