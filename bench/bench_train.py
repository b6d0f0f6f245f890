"""Trainer throughput on one GPU or several: snapshot loader vs a batch kept on the GPU, tok/s, MFU, peak memory.

    python bench/bench_train.py [--configs d12,d12-moe,d20,d20-moe] [--batch 32] [--steps 20] [--profile]
        [--total-batch 524288] [--set key=JSON,...] [--variants JSON] [--inductor key=JSON,...] [--top N]
    python bench/bench_train.py --configs d20 --total-batch 524288 --scaling 2   # 1 GPU, then torchrun on 2

Rows come from a synthetic snapshot written through pipeline.shard_format (random ids in the
model's vocab, nanochat-like document lengths and masks), so the loader path is the real one:
memory-mapped shards → background thread → pinned buffer → non_blocking copy. The "resident"
column replays one batch already on the GPU: the ratio loader/resident is the data loading
cost that leaks into the step time (target ≤ 1.01).

A step is `--total-batch` tokens: micro-batches of B×T per rank accumulated, then one optimizer
step (0: one micro-batch per optimizer step). nanochat's SFT total batch is 524,288 tokens, 8
micro-batches of 32×2048 on one GPU, so its optimizer runs once per 8 forward+backward passes.
The training-path kernel choices of trainer.model (SETTINGS) are set with --set, or timed
against each other in one process with --variants. `--scaling N` runs the configs on one GPU, then
the same command under `torchrun --nproc_per_node=N` (DistMuonAdamW, each GPU the same micro-batch
size, the accumulation divided by N), and prints tokens/s on N GPUs over N × tokens/s on one.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.shard_format import ShardMeta, ShardRows, SplitReader, write_shard  # noqa: E402
from trainer.common import SHARE_GPUS_ENV, get_peak_flops, init_distributed, print0, share_gpus  # noqa: E402
from trainer.config import GPTConfig  # noqa: E402
from trainer.data import RowSchedule, StepLoader  # noqa: E402
import trainer.model as model_module  # noqa: E402
import trainer.moe as moe_module  # noqa: E402
from trainer.model import GPT  # noqa: E402
from trainer.optim import DistMuonAdamW, MuonAdamW  # noqa: E402
from trainer.train import forward_backward, optimizer_step  # noqa: E402

CONFIGS = {  # name: (depth, experts) with nanochat's sizing: C = depth·64 rounded up to 128, heads of 128
    "d12": (12, 0), "d12-moe": (12, 8), "d20": (20, 0), "d20-moe": (20, 8),
}
# --set / --variants key: the module-level training-path choice it sets
SETTINGS = {"flex": (model_module, "FLEX_KERNEL_OPTIONS"), "causal_sdpa": (model_module, "CAUSAL_SDPA_BACKEND"),
            "window": (model_module, "WINDOW_BACKEND"), "moe_permute": (moe_module, "MOE_PERMUTE"),
            "rotary_norm": (model_module, "ROTARY_NORM_KERNEL"), "mlp": (model_module, "MLP_KERNEL"),
            "loss": (model_module, "LOSS_KERNEL")}
DEFAULTS = {key: getattr(mod, attr) for key, (mod, attr) in SETTINGS.items()}


def apply_settings(settings: dict) -> None:
    """trainer.model's defaults, then `settings` on top (a compiled variant must see its own values again
    before each of its steps: dynamo guards on these globals and would otherwise recompile)."""
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise SystemExit(f"unknown setting(s) {sorted(unknown)}; known: {sorted(SETTINGS)}")
    for key, (mod, attr) in SETTINGS.items():
        setattr(mod, attr, settings.get(key, DEFAULTS[key]))


def current_settings() -> dict:
    return {key: getattr(mod, attr) for key, (mod, attr) in SETTINGS.items()}


def synthetic_snapshot(folder: Path, rows: int, seq_len: int, vocab: int, seed: int = 0) -> SplitReader:
    rng = np.random.default_rng(seed)
    L = seq_len + 1
    meta = ShardMeta(max_seq_len=seq_len, bos_id=vocab - 9, vocab_size=vocab, tokenizer_fingerprint="synthetic",
                     split="train")
    paths = []
    per_shard = 1024
    for s in range(0, rows, per_shard):
        n = min(per_shard, rows - s)
        tokens = rng.integers(0, vocab - 9, size=(n, L), dtype=np.int64).astype(np.uint16)
        lens_all, offsets = [], [0]
        for _ in range(n):
            lens = []
            left = L
            while left > 0:
                d = int(min(left, max(16, rng.lognormal(6.0, 1.0))))
                lens.append(d)
                left -= d
            lens_all.extend(lens)
            offsets.append(len(lens_all))
        mask = (rng.random((n, L)) < 0.6).astype(np.uint8)
        mask[:, 0] = 0
        lens_arr = np.array(lens_all, dtype=np.int32)
        rows_obj = ShardRows(tokens=tokens, mask=mask, doc_offsets=np.array(offsets, dtype=np.int32),
                             doc_lens=lens_arr, doc_ids=np.arange(len(lens_arr)), doc_tasks=np.zeros(len(lens_arr),
                                                                                                      dtype=np.int16))
        p = folder / f"train-{s // per_shard:05d}.arrow"
        write_shard(p, rows_obj, meta)
        paths.append(p)
    return SplitReader(paths)


def build(depth: int, experts: int, seq_len: int, vocab: int, device) -> GPT:
    C = -(-depth * 64 // 128) * 128
    cfg = GPTConfig(sequence_len=seq_len, vocab_size=vocab, n_layer=depth, n_head=C // 128, n_kv_head=C // 128,
                    n_embd=C, num_experts=experts, top_k=2)
    torch.manual_seed(42)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    model.init_weights()
    return model


def time_steps(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


MATMUL_KEYS = ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "wgmma", "triton_tem_fused_mm",
               "triton_tem_fused_addmm", "triton_tem_fused_bmm", "relu2_matmul_kernel")
# cuDNN's attention backward runs two helpers beside its main kernel: rowsum(dO * O) and dQ's fp32 -> 16-bit
ATTENTION_KEYS = ("flex", "attention", "fmha", "flash", "compute_dot_do_o", "convert_dq_to_16bits")


def kernel_category(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ATTENTION_KEYS):
        return "attention"
    if any(k in low for k in MATMUL_KEYS):
        return "matmul"
    return "other"


def profile_split(step_fn, steps: int, top: int) -> tuple[dict, int, list, list]:
    """GPU kernel time per category (matmul / attention / other) over `steps` steps and the number of distinct
    compiled graphs run, the top kernels, and the top launching ops (rank_ops): a kernel's name alone does not
    say which op of the step ran it."""
    from torch.profiler import ProfilerActivity, profile
    gpu = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities, record_shapes=top > 0) as prof:
        for _ in range(steps):
            step_fn()
        if gpu:
            torch.cuda.synchronize()
    per_kernel, graphs = kernel_times(prof.events(), steps)
    split = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for kname, ms in per_kernel.items():
        split[kernel_category(kname)] += ms
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]
    return split, graphs, ranked, rank_ops(prof, steps, top) if top else []


def kernel_times(events, steps: int) -> tuple[dict[str, float], int]:
    """(GPU ms per step of each kernel name, distinct compiled graphs run). GPU-side spans are not kernels:
    inductor's `## Call CompiledFxGraph` covers its graph's kernels (counted as graphs), and a user annotation
    such as the profiler's `Optimizer.step#MuonAdamW.step` covers the optimizer's; counted as kernel time,
    either one counts the same work twice."""
    per_kernel: dict[str, float] = {}
    graphs = set()
    for ev in events:
        if ev.name.startswith("## Call CompiledFxGraph"):
            graphs.add(ev.name)
        elif ev.device_type == torch.autograd.DeviceType.CUDA and not getattr(ev, "is_user_annotation", False):
            per_kernel[ev.name] = per_kernel.get(ev.name, 0.0) + ev.device_time / 1e3 / steps
    return per_kernel, len(graphs)


def rank_ops(prof, steps: int, top: int, device: bool = True) -> list[tuple[str, str, float]]:
    """The ops whose own kernels took the most time, per input shapes: (op, shapes, ms per step). Ops compiled
    into an inductor graph show as the graph's kernels; eager ops (a custom op's body, AccumulateGrad, a
    library's autograd) as aten::... with the shapes that locate them. device=False ranks CPU time instead."""
    attr = "self_device_time_total" if device else "self_cpu_time_total"
    rows = [(ev.key, str(ev.input_shapes), getattr(ev, attr) / 1e3 / steps)
            for ev in prof.key_averages(group_by_input_shape=True)
            if getattr(ev, attr) > 0 and not getattr(ev, "is_user_annotation", False)]  # spans, as in kernel_times
    return sorted(rows, key=lambda r: -r[2])[:top]


def time_phases(fwd_bwd, opt_step, n: int) -> tuple[float, float]:
    """Median ms of the forward+backward and of the optimizer step, with CUDA events around each."""
    fb, op = [], []
    for _ in range(n):
        e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        e0.record()
        fwd_bwd()
        e1.record()
        opt_step()
        e2.record()
        torch.cuda.synchronize()
        fb.append(e0.elapsed_time(e1))
        op.append(e1.elapsed_time(e2))
    return statistics.median(fb), statistics.median(op)


def micro_steps(args, T: int, world: int) -> int:
    """Micro-batches per optimizer step on each rank, from --total-batch (0: one)."""
    if not args.total_batch:
        return 1
    per = args.batch * T * world
    if args.total_batch % per:
        raise SystemExit(f"--total-batch {args.total_batch} is not a multiple of batch {args.batch} x seq {T} x "
                         f"world {world}")
    return args.total_batch // per


def make_optimizer(model: GPT, world: int):
    return DistMuonAdamW(model.setup_optimizer()) if world > 1 else MuonAdamW(model.setup_optimizer())


def bench_config(name: str, reader: SplitReader, args, device, rank: int = 0, world: int = 1) -> dict:
    depth, experts = CONFIGS[name]
    T = reader.meta.max_seq_len
    model = build(depth, experts, T, reader.meta.vocab_size, device)
    opt = make_optimizer(model, world)
    step_model = torch.compile(model, dynamic=False)
    B, accum = args.batch, micro_steps(args, T, world)
    schedule = RowSchedule(reader.num_rows, B * accum * world)
    loader = StepLoader(reader, schedule, rank=rank, world_size=world, grad_accum=accum, device_batch=B,
                        device=device, start_step=0)
    torch.cuda.reset_peak_memory_stats(device)

    def loader_step():
        batch = loader.next()
        forward_backward(step_model, batch, accum, world, "token")
        optimizer_step(model, opt, 1.0, 0.95)

    resident = loader.next()

    def resident_step():
        loss = forward_backward(step_model, resident, accum, world, "token")
        optimizer_step(model, opt, 1.0, 0.95)
        return loss

    t0 = time.time()
    time_steps(loader_step, args.warmup)
    compile_s = time.time() - t0
    require_finite(resident_step(), name)
    # interleave the two modes in blocks so clock drift hits both alike
    a, b, block = [], [], max(1, args.steps // 2)  # two blocks per mode, at least one step each
    for _ in range(2):
        a += time_steps(loader_step, block)
        b += time_steps(resident_step, block)
    loader.close()
    dt_loader, dt_res = statistics.median(a), statistics.median(b)
    ms_fb, ms_opt = time_phases(lambda: forward_backward(step_model, resident, accum, world, "token"),
                                lambda: optimizer_step(model, opt, 1.0, 0.95), max(4, args.steps // 4))
    tokens = B * T * accum * world  # per optimizer step, all ranks
    peak = get_peak_flops(torch.cuda.get_device_name(device))
    flops = model.estimate_flops()
    res = {"config": name, "params": sum(p.numel() for p in model.parameters()), "B": B, "T": T, "accum": accum,
           "world": world, "compile_s": compile_s, "ms_loader": 1e3 * dt_loader, "ms_resident": 1e3 * dt_res,
           "ratio": dt_loader / dt_res, "tok_s": tokens / dt_loader,
           "mfu": 100 * flops * tokens / dt_loader / (peak * world),
           "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
           "reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,  # what an 80 GB card must hold
           "spread_loader": (max(a) - min(a)) / dt_loader, "ms_fwd_bwd": ms_fb, "ms_opt": ms_opt,
           "ms_per_micro": 1e3 * dt_loader / accum, "settings": current_settings()}
    if args.profile and world == 1:
        split, graphs, ranked, ops = profile_split(resident_step, 3, args.top)
        res.update({f"ms_{k}": v for k, v in split.items()})
        res["graphs"] = graphs  # forward, backward and optimizer graphs: 13 for d12/d20; more means graph breaks
        res["top_kernels"], res["top_ops"] = ranked, ops
        forward_backward(step_model, resident, accum, world, "token")  # grads for the optimizer alone
        opt_split, _, opt_ranked, _ = profile_split(opt.step, 3, args.top)
        res["ms_opt_gpu"] = sum(opt_split.values())
        res["opt_top_kernels"] = opt_ranked
        model.zero_grad(set_to_none=True)
    return res


def require_finite(loss: torch.Tensor, what: str) -> None:
    """A variant that computes NaN is wrong, and looks fast: NaN data draws less power, so the card clocks higher."""
    if not torch.isfinite(loss).item():
        raise SystemExit(f"{what}: the loss is not finite; a wrong result is not a speed-up")


def ab_config(name: str, reader: SplitReader, args, device) -> list[dict]:
    """Whole-step A/B of training-path settings: one compiled model per variant in this process, timed in
    interleaved rounds (resident batch), so that the card's clock state hits every variant alike. Every
    variant starts from the same weights and batch; its first loss is compared with the first variant's."""
    depth, experts = CONFIGS[name]
    T, B = reader.meta.max_seq_len, args.batch
    accum = micro_steps(args, T, 1)
    variants = json.loads(args.variants)
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        raise SystemExit('--variants takes a JSON list of settings dicts, e.g. \'[{}, {"causal_sdpa": null}]\'')
    loader = StepLoader(reader, RowSchedule(reader.num_rows, B * accum), rank=0, world_size=1, grad_accum=accum,
                        device_batch=B, device=device, start_step=0)
    batch = loader.next()
    loader.close()
    runs, first_loss, first_norm = [], None, None
    for settings in variants:
        apply_settings(settings)
        base = torch.cuda.memory_allocated(device)  # the variants before this one stay resident
        torch.cuda.reset_peak_memory_stats(device)
        model = build(depth, experts, T, reader.meta.vocab_size, device)
        opt = MuonAdamW(model.setup_optimizer())
        step_model = torch.compile(model, dynamic=False)
        flops = model.estimate_flops()

        def step(step_model=step_model, model=model, opt=opt):
            loss = forward_backward(step_model, batch, accum, 1, "token")
            optimizer_step(model, opt, 1.0, 0.95)
            return loss
        t0 = time.time()
        try:  # the first step: the same weights and batch in every variant
            loss = forward_backward(step_model, batch, accum, 1, "token").item() / batch.n_supervised
        except Exception as e:  # a variant the card or this torch cannot run is reported, not fatal
            print(f"variant {settings}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        grad_norm = torch.stack([p.grad.float().norm() for p in model.parameters() if p.grad is not None]).norm()
        optimizer_step(model, opt, 1.0, 0.95)
        require_finite(torch.tensor(loss) + grad_norm.cpu(), f"{name} {settings}")
        if first_loss is None:
            first_loss, first_norm = loss, grad_norm.item()
        time_steps(step, args.warmup)
        peak_gib = (torch.cuda.max_memory_allocated(device) - base) / 2**30  # its model, states and activations
        print(f"compiled {name} {settings} in {time.time() - t0:.0f} s: first loss {loss:.6f}, grad norm "
              f"{grad_norm.item():.6g} (vs first variant {loss / first_loss - 1:+.2e}, "
              f"{grad_norm.item() / first_norm - 1:+.2e}), peak {peak_gib:.1f} GiB", flush=True)
        runs.append((settings, step, [], loss, peak_gib))
    peak = get_peak_flops(torch.cuda.get_device_name(device))
    for _ in range(args.rounds):
        for settings, step, times, *_ in runs:
            apply_settings(settings)
            times += time_steps(step, args.steps)
    out = []
    for settings, _, times, loss, peak_gib in runs:
        ms = 1e3 * statistics.median(times)
        out.append({"config": name, "settings": settings, "accum": accum, "ms": ms, "ms_per_micro": ms / accum,
                    "mfu": 100 * flops * B * T * accum / (ms / 1e3) / peak, "first_loss": loss, "peak_gib": peak_gib,
                    "spread": (max(times) - min(times)) / statistics.median(times)})
        print(f"A/B {name} {json.dumps(settings)}: {ms:.1f} ms/step ({ms / accum:.1f} per micro-batch), "
              f"MFU {out[-1]['mfu']:.1f} %, spread {out[-1]['spread']:.3f}, peak {peak_gib:.1f} GiB", flush=True)
    return out


def parse_settings(text: str) -> dict:
    """'causal_sdpa="cudnn",flex={"USE_TMA":true}' -> {"causal_sdpa": "cudnn", "flex": {"USE_TMA": True}}:
    key=JSON pairs separated by commas; a value may hold commas of its own (it is decoded as JSON first)."""
    out, decoder, pos = {}, json.JSONDecoder(), 0
    while pos < len(text):
        eq = text.find("=", pos)
        if eq < 0:
            raise SystemExit(f"expected key=JSON at {text[pos:]!r}")
        try:
            out[text[pos:eq]], end = decoder.raw_decode(text, eq + 1)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{text[pos:eq]}: not a JSON value ({e})") from None
        if end < len(text) and text[end] != ",":
            raise SystemExit(f"expected ',' after {text[pos:end]!r}")
        pos = end + 1
    return out


def print_table(results: list[dict]) -> None:
    print()
    print("| config | params | B×T × accum × GPUs | step ms (loader) | step ms (resident) | ratio | tok/s | MFU % | "
          "peak GiB (reserved) | fwd+bwd ms | optim ms | GPU split matmul/attn/other ms | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        split = (f"{r['ms_matmul']:.0f} / {r['ms_attention']:.0f} / {r['ms_other']:.0f}" if "ms_matmul" in r else "-")
        print(f"| {r['config']} | {r['params'] / 1e6:.0f}M | {r['B']}×{r['T']} × {r['accum']} × {r['world']} | "
              f"{r['ms_loader']:.1f} | {r['ms_resident']:.1f} | {r['ratio']:.3f} | {r['tok_s']:,.0f} | {r['mfu']:.1f} | "
              f"{r['peak_gib']:.1f} ({r['reserved_gib']:.1f}) | {r['ms_fwd_bwd']:.1f} | {r['ms_opt']:.1f} | {split} | {r['compile_s']:.0f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="d12,d12-moe,d20,d20-moe")
    ap.add_argument("--batch", type=int, default=32, help="rows per micro-batch per GPU")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--total-batch", type=int, default=0,
                    help="tokens per optimizer step over all GPUs (nanochat SFT: 524288); 0 = one micro-batch")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--profile", action="store_true",
                    help="GPU time split matmul/attention/other (3 steps), and the optimizer step's own")
    ap.add_argument("--top", type=int, default=0, help="with --profile: list the N kernels with most time")
    ap.add_argument("--set", default="", help=f"training-path settings key=JSON,... (keys: {', '.join(SETTINGS)})")
    ap.add_argument("--inductor", default="", help="torch._inductor.config settings key=JSON,... to try")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--variants", default=None,
                    help="JSON list of settings dicts ({} = trainer.model's defaults): whole-step A/B in one process")
    ap.add_argument("--rounds", type=int, default=4, help="with --variants: interleaved rounds of --steps each")
    ap.add_argument("--scaling", type=int, default=0, help="also run on N GPUs through torchrun, print the scaling")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_train needs a CUDA GPU (run it through the device tool)")
        return 1
    ddp, rank, _, world, device = init_distributed("cuda")
    settings = parse_settings(args.set)
    apply_settings(settings)
    for key, value in parse_settings(args.inductor).items():
        setattr(torch._inductor.config, key, value)
    print0(f"# settings {json.dumps(current_settings())}, inductor {args.inductor or 'defaults'}")
    gpu = torch.cuda.get_device_name(device)
    print0(f"# {world} rank(s) on {torch.cuda.device_count()} x {gpu}, torch {torch.__version__}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        reader = synthetic_snapshot(Path(tmp), args.rows, args.seq_len, args.vocab)
        if args.variants:
            if ddp:
                raise SystemExit("--variants runs on one GPU (no torchrun)")
            ab = [r for name in args.configs.split(",") for r in ab_config(name, reader, args, device)]
            if args.json:
                Path(args.json).write_text(json.dumps(ab, indent=1))
            return 0
        for name in args.configs.split(","):
            try:
                r = bench_config(name, reader, args, device, rank, world)
                torch.cuda.empty_cache()  # the config's model and optimizer are gone with its frame
            except torch.OutOfMemoryError:
                print(f"{name}: out of memory at batch {args.batch} (rank {rank})")
                torch.cuda.empty_cache()
                continue
            results.append(r)
            print0(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                            if not k.startswith(("top_", "opt_top_"))), flush=True)
            for title, key in (("step", "top_kernels"), ("optimizer step alone", "opt_top_kernels")):
                if r.get(key):
                    print(f"  top kernels, {title}:")
                for kname, ms in r.get(key, []):
                    print(f"    {ms:8.2f} ms  {kernel_category(kname):9s} {kname[:110]}")
            if r.get("top_ops"):
                print("  top ops by their own GPU time, step (op, input shapes):")
            for op, shapes, ms in r.get("top_ops", []):
                print(f"    {ms:8.2f} ms  {op[:60]:60s} {shapes[:150]}")
    if rank == 0:
        print_table(results)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    if ddp:
        dist.destroy_process_group()
    elif args.scaling > 1:
        return run_scaling(args, results)
    return 0


def run_scaling(args, single: list[dict]) -> int:
    """The same bench under torchrun on `args.scaling` GPUs; tokens/s there over N x tokens/s on one GPU."""
    n, gpus = args.scaling, torch.cuda.device_count()
    if gpus < n:
        if not share_gpus():
            print(f"--scaling {n}: this machine has {gpus} GPU(s)")
            return 1
        print(f"# {SHARE_GPUS_ENV}: {n} ranks on {gpus} GPU(s) over gloo: this checks the multi-rank run, "
              "its tok/s is no scaling number")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "multi.json"
        argv = list(sys.argv[1:])
        i = argv.index("--scaling") if "--scaling" in argv else None
        if i is not None:
            del argv[i:i + 2]
        argv = [a for a in argv if not a.startswith("--scaling=")]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               str(Path(__file__).resolve()), *argv, "--json", str(out)]
        print(f"# {' '.join(cmd)}", flush=True)
        if subprocess.run(cmd).returncode != 0 or not out.is_file():
            print("the multi-GPU run failed")
            return 1
        multi = {r["config"]: r for r in json.loads(out.read_text())}
    print()
    print(f"| config | tokens/step | 1 GPU tok/s (accum) | {n} GPUs tok/s (accum) | scaling (target ≥ {0.95 * n:.2f}x) |")
    print("|---|---|---|---|---|")
    for r in single:
        m = multi.get(r["config"])
        if m is None:
            print(f"| {r['config']} | - | {r['tok_s']:,.0f} | failed | - |")
            continue
        print(f"| {r['config']} | {r['B'] * r['T'] * r['accum']:,} | {r['tok_s']:,.0f} ({r['accum']}) | "
              f"{m['tok_s']:,.0f} ({m['accum']}) | {m['tok_s'] / r['tok_s']:.2f}x ({m['tok_s'] / r['tok_s'] / n:.3f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
