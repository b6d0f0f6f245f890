"""Supervised fine-tuning on a packed snapshot.

    python -m trainer.train --snapshot DIR [flags]              (one process, CPU or one GPU)
    torchrun --nproc_per_node=8 -m trainer.train --snapshot DIR (one or many nodes)

Flags keep nanochat's chat_sft names. The loss of a step is the sum of cross-entropy over
its supervised targets divided by the step's supervised-target count (known from the
shards' n_supervised before the step runs); `--loss-norm mean` gives the original mean of
micro-batch means.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.cli import run_cli
from pipeline.tempfiles import remove_stale_temps, temp_path
from pipeline.layout import data_dir_of, demo_dir
from pipeline.manifest import latest_snapshot, shard_paths, verify_snapshot
from pipeline.shard_format import SplitReader
from pipeline.tokenizer import load_tokenizer
from trainer.checkpoint import (PHASE_DIRS, CheckpointError, base_dir, build_model, find_last_step, find_model_tag,
                                load_meta, load_model_state, load_optim_state, save_checkpoint)
from trainer.common import DeviceError, dist_info, get_peak_flops, init_distributed, print0
from trainer.config import GPTConfig
from trainer.data import RowSchedule, StepBatch, StepLoader, val_batches
from trainer.model import GPT
from trainer.optim import DistMuonAdamW, MuonAdamW, warm_start
from trainer.plot import plot_losses
from trainer.schedule import apply_schedule, lr_multiplier, muon_momentum


class TrainError(Exception):
    """A problem with the run's inputs; the message says how to fix it."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__.split("\n")[0])
    a = ap.add_argument
    # input
    a("--snapshot", type=Path, help="snapshot folder (default: newest snapshot of --recipe in --data-dir)")
    a("--recipe", default="demo")
    a("--data-dir", type=Path, default=None, help="data dir (default: NANOCHAT_BASE_DIR, else data)")
    a("--verify-data", action="store_true", help="recompute every shard hash at start (sizes are always checked)")
    a("--shuffle-rows", type=int, default=None, metavar="SEED", help="seeded row permutation per epoch")
    # nanochat chat_sft flags
    a("--run", default="dummy", help="wandb run name ('dummy' = no wandb)")
    a("--device-type", default="", help="cuda|cpu|mps (empty = autodetect)")
    a("--model-tag", default=None)
    a("--model-step", type=int, default=None)
    a("--load-optimizer", type=int, default=1)
    a("--num-iterations", type=int, default=-1, help="-1 = one full epoch")
    a("--max-seq-len", type=int, default=None)
    a("--device-batch-size", type=int, default=None)
    a("--total-batch-size", type=int, default=None)
    a("--embedding-lr", type=float, default=None)
    a("--unembedding-lr", type=float, default=None)
    a("--matrix-lr", type=float, default=None)
    a("--init-lr-frac", type=float, default=0.8)
    a("--warmup-ratio", type=float, default=0.0)
    a("--warmdown-ratio", type=float, default=0.5)
    a("--final-lr-frac", type=float, default=0.0)
    a("--eval-every", type=int, default=200)
    a("--eval-tokens", type=int, default=20 * 1048576)
    a("--chatcore-every", type=int, default=200)
    a("--chatcore-max-cat", type=int, default=-1)
    a("--chatcore-max-sample", type=int, default=24)
    a("--chatcore-max-tokens", type=int, default=512, help="max new tokens per generative ChatCORE problem")
    # nanosft
    a("--init", choices=["auto", "base", "scratch"], default="auto",
      help="auto: the base checkpoint if one exists, else from scratch for the demo snapshot")
    a("--depth", type=int, default=4, help="model depth when initialising from scratch")
    a("--num-experts", type=int, default=0, help="MoE experts when initialising from scratch (0 = dense)")
    a("--save-every", type=int, default=0, help="checkpoint every N steps (and always at the end)")
    a("--resume", action="store_true", help="continue the latest checkpoint of this run exactly")
    a("--resume-new-batch", action="store_true",
      help="with --resume, accept another --device-batch-size (rows per step change: not an exact resume)")
    a("--stop-at", type=int, default=0, help="end cleanly after step N, keeping the schedule of --num-iterations")
    a("--doc-mask", action="store_true", help="no attention across packed conversations")
    a("--loss-norm", choices=["token", "mean"], default="token")
    a("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile (auto: on CUDA)")
    a("--out-tag", default=None, help="checkpoint folder tag (default: the base model tag)")
    a("--overwrite", action="store_true", help="replace the run already in the output folder (else refused)")
    args = ap.parse_args(argv)
    args.data_dir_given = args.data_dir is not None
    if args.data_dir is None:
        args.data_dir = Path(os.environ.get("NANOCHAT_BASE_DIR") or "data")
    return args


# ----------------------------------------------------------------------------- setup

def open_snapshot(args) -> tuple[Path, dict, SplitReader, SplitReader]:
    snapshot = args.snapshot or latest_snapshot(args.data_dir, args.recipe)
    manifest = verify_snapshot(snapshot, full=args.verify_data)
    train = SplitReader(shard_paths(snapshot, manifest, "train"))
    val = SplitReader(shard_paths(snapshot, manifest, "val"))
    return Path(snapshot), manifest, train, val


def resolve_base(args, manifest, device) -> tuple[GPT, dict | None, dict, str]:
    """The starting model: a base checkpoint (nanochat layout) or a fresh one. Returns (model, base_optim, base_meta, tag)."""
    root = base_dir(args.data_dir) / PHASE_DIRS["base"]
    have_base = root.is_dir() and any(root.iterdir())
    if args.init == "base" or (args.init == "auto" and have_base):
        try:
            tag = args.model_tag or find_model_tag(root)
            ckpt = root / tag
            step = args.model_step if args.model_step is not None else find_last_step(ckpt)
            meta = load_meta(ckpt, step)
            model = build_model(meta, load_model_state(ckpt, step, device), device)
        except CheckpointError as e:
            raise TrainError(f"cannot load the base checkpoint: {e}. Train one with nanochat's base_train, point "
                             "NANOCHAT_BASE_DIR at a nanochat base dir, or start from scratch with --init scratch")
        _, rank, _, _ = dist_info()
        optim = load_optim_state(ckpt, step, rank, device) if args.load_optimizer else None
        if args.load_optimizer and optim is None:  # §10.3: a warning, then fresh optimizer state
            print0(f"WARNING: no optim_{step:06d}_rank{rank}.pt in {ckpt}: the optimizer starts fresh")
        print0(f"init: base checkpoint {ckpt}/model_{step:06d}.pt")
        return model, optim, meta, tag
    if args.init == "auto" and manifest["recipe"]["name"] != "demo":
        raise TrainError(f"no base checkpoint under {root}. Point NANOCHAT_BASE_DIR (or --data-dir) at a nanochat "
                         "base dir with base_checkpoints/, or pass --init scratch to train from random weights")
    tokv = manifest["tokenizer"]["vocab_size"]
    C = max(1, math.ceil(args.depth * 64 / 128)) * 128 if args.depth >= 8 else args.depth * 64
    heads = max(1, C // 64)
    config = GPTConfig(sequence_len=manifest["max_seq_len"], vocab_size=tokv, n_layer=args.depth, n_head=heads,
                       n_kv_head=heads, n_embd=C, num_experts=args.num_experts)
    torch.manual_seed(42)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    print0(f"init: no base checkpoint, initialising a d{args.depth} model from scratch "
           f"({sum(p.numel() for p in model.parameters()):,} parameters)")
    return model, None, {}, f"d{args.depth}"


def inherit(args, meta: dict, name: str, meta_key: str, fallback, from_user_config: bool = False):
    """nanochat §10.2: an explicit flag wins; else the base meta's value; else the fallback. One line each."""
    explicit = getattr(args, name)
    if explicit is not None:
        print0(f"{name} = {explicit} (flag)")
        return explicit
    src = meta.get("user_config", {}) if from_user_config else meta
    if meta_key in src and src[meta_key] is not None:
        print0(f"{name} = {src[meta_key]} (inherited from the base checkpoint)")
        return src[meta_key]
    print0(f"{name} = {fallback} (default)")
    return fallback


def check_compatible(model: GPT, manifest: dict, max_seq_len: int, args) -> None:
    cfg, tok = model.config, manifest["tokenizer"]
    if max_seq_len != manifest["max_seq_len"]:
        raise TrainError(f"--max-seq-len {max_seq_len} but the snapshot's rows are {manifest['max_seq_len']} + 1 "
                         "tokens; rebuild the snapshot with that max_seq_len in its recipe, or drop the flag")
    if manifest["max_seq_len"] > cfg.sequence_len * 10:
        raise TrainError(f"snapshot max_seq_len {manifest['max_seq_len']} exceeds the model's rotary cache")
    if tok["vocab_size"] != cfg.vocab_size:
        raise TrainError(f"snapshot tokenizer has {tok['vocab_size']} tokens, the model {cfg.vocab_size}: the "
                         "snapshot was built with another tokenizer; rebuild it with the model's tokenizer.pkl")
    base_tok = base_dir(args.data_dir) / "tokenizer" / "tokenizer.pkl"
    if args.init != "scratch" and base_tok.is_file():
        fp = load_tokenizer(base_tok).fingerprint
        if fp != tok["fingerprint"]:
            raise TrainError(f"snapshot tokenizer fingerprint {tok['fingerprint'][:12]} != {base_tok} "
                             f"({fp[:12]}): rebuild the snapshot with the base model's tokenizer")


def describe_base_dir(args) -> str:
    """Which folder holds base_checkpoints/ and receives chatsft_checkpoints/, and why: NANOCHAT_BASE_DIR,
    when set, wins over --data-dir (as in nanochat, whose scripts read only the variable)."""
    root, env = base_dir(args.data_dir), os.environ.get("NANOCHAT_BASE_DIR")
    if not env:
        why = f"--data-dir{'' if args.data_dir_given else ' (default)'}; NANOCHAT_BASE_DIR is not set"
    elif not args.data_dir_given or Path(env).resolve() == Path(args.data_dir).resolve():
        why = "NANOCHAT_BASE_DIR" + (" (the same folder as --data-dir)" if args.data_dir_given else "")
    else:
        why = (f"NANOCHAT_BASE_DIR is set and overrides --data-dir {args.data_dir} for checkpoints and ChatCORE "
               "data, as in nanochat (unset it to use --data-dir)")
    return (f"base dir {root} ({why}): base checkpoints from {root / PHASE_DIRS['base']}, "
            f"SFT checkpoints to {root / PHASE_DIRS['sft']}")


RUN_FILE = re.compile(r"model_\d+\.pt|meta_\d+\.json|optim_\d+_rank\d+\.pt|metrics\.jsonl|loss\.png")


def run_files(out_dir: Path) -> list[Path]:
    """The files a run writes into its checkpoint folder (nanochat's names, plus metrics and the plot)."""
    return sorted(p for p in out_dir.iterdir() if RUN_FILE.fullmatch(p.name)) if out_dir.is_dir() else []


def claim_output(out_dir: Path, args, master: bool, ddp: bool, device: torch.device | None = None) -> None:
    """A fresh run writes new files only: another run's checkpoints or metrics in its folder stop it, unless
    it continues that run (--resume) or the user asks to replace it (--overwrite: that run's files go first,
    so no stale step is left for nanochat's loader, which takes the largest).

    Under DDP every rank looks before any rank goes on (rank 0 writes metrics.jsonl soon after; a late rank
    would take it for another run's), and the ranks refuse together when any of them saw a run."""
    if args.resume and args.overwrite:
        raise TrainError(f"--resume continues the run in {out_dir}, --overwrite replaces it: pass one of them")
    found = run_files(out_dir)
    if args.resume:
        return
    taken = bool(found) and not args.overwrite
    if ddp:
        flag = torch.tensor([int(taken)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        taken = bool(flag.item())
    if taken:
        seen = f"{len(found)} files, e.g. {found[-1].name}" if found else "files that another rank sees"
        raise TrainError(f"{out_dir} already holds a run ({seen}): continue it with --resume, start another "
                         "beside it with --out-tag NAME, or replace it with --overwrite")
    if args.overwrite:
        if master:
            for p in found:
                p.unlink()
        if ddp:
            dist.barrier()  # every rank, whatever it listed: no rank starts writing before the old files are gone
        if found:
            print0(f"--overwrite: removed the previous run's {len(found)} files from {out_dir}")


# ----------------------------------------------------------------------------- one step

def forward_backward(step_model, batch: StepBatch, grad_accum: int, world: int, loss_norm: str) -> torch.Tensor:
    """Accumulate one step's gradients; returns this rank's summed loss over its supervised targets.

    `token`: every supervised token of the step weighs the same, whatever row or rank it is in
    (the optimizer averages gradients over ranks, hence the factor `world`). `mean`: the original
    script's mean over each micro-batch, averaged over micro-steps.
    """
    step_loss = torch.zeros((), device=batch.tokens.device)
    for m in range(grad_accum):
        x, y, docs = batch.micro(m)
        loss_sum = step_model(x, y, loss_reduction="sum", doc_ids=docs)
        if loss_norm == "token":
            loss = loss_sum * world / batch.n_supervised
        else:
            loss = loss_sum / (y >= 0).sum().clamp(min=1) / grad_accum
        loss.backward()
        step_loss += loss_sum.detach()
    return step_loss


def optimizer_step(model: GPT, optimizer, lr_mult: float, momentum: float) -> None:
    apply_schedule(optimizer, lr_mult, momentum)
    model.update_moe_balancing()
    optimizer.step()
    model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- the run

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: train(args), errors=(TrainError, CheckpointError, DeviceError),
                   interrupted="interrupted; nothing was published after the last saved checkpoint")


def train(args) -> int:
    ddp, rank, local_rank, world, device = init_distributed(args.device_type)
    master = rank == 0
    torch.manual_seed(42)
    snapshot, manifest, train_rows, val_rows = open_snapshot(args)
    print0(f"snapshot {snapshot} ({manifest['snapshot_id']}): {train_rows.num_rows:,} train rows, "
           f"{val_rows.num_rows:,} val rows of {manifest['max_seq_len'] + 1} tokens")
    tok = load_tokenizer(snapshot / manifest["tokenizer"]["file"])

    print0(describe_base_dir(args))
    model, base_optim, base_meta, tag = resolve_base(args, manifest, device)
    if args.max_seq_len is None:  # the snapshot fixes the row length; a base meta's max_seq_len does not apply
        max_seq_len = manifest["max_seq_len"]
        print0(f"max_seq_len = {max_seq_len} (the snapshot's rows)")
    else:
        max_seq_len = inherit(args, base_meta, "max_seq_len", "max_seq_len", manifest["max_seq_len"])
    check_compatible(model, manifest, max_seq_len, args)
    B = inherit(args, base_meta, "device_batch_size", "device_batch_size", 32 if device.type == "cuda" else 4)
    T = max_seq_len
    total = inherit(args, base_meta, "total_batch_size", "total_batch_size", B * T * world)
    lrs = {n: inherit(args, base_meta, n, n, fb, from_user_config=True)
           for n, fb in (("embedding_lr", 0.3), ("unembedding_lr", 0.004), ("matrix_lr", 0.02))}
    if total % (B * T * world):
        raise TrainError(f"total batch {total} tokens is not a multiple of device_batch {B} x seq {T} x world {world}")
    grad_accum = total // (B * T * world)
    rows_per_step = B * world * grad_accum
    schedule = RowSchedule(train_rows.num_rows, rows_per_step, args.shuffle_rows)
    num_steps = args.num_iterations if args.num_iterations > 0 else schedule.steps_per_epoch
    print0(f"{rows_per_step} rows/step = {B} x {world} ranks x {grad_accum} accum; {schedule.steps_per_epoch} "
           f"steps/epoch; running {num_steps} steps")

    groups = model.setup_optimizer(unembedding_lr=lrs["unembedding_lr"], embedding_lr=lrs["embedding_lr"],
                                   matrix_lr=lrs["matrix_lr"], weight_decay=0.0)
    optimizer = DistMuonAdamW(groups) if ddp else MuonAdamW(groups)
    out_dir = base_dir(args.data_dir) / PHASE_DIRS["sft"] / (args.out_tag or tag)
    if master:
        check_writable(out_dir)  # now, not at the first save after an hour of training
    claim_output(out_dir, args, master, ddp, device)
    print0(f"output: {out_dir} ({'--resume' if args.resume else '--out-tag' if args.out_tag else 'the model tag'})")
    start_step, loop = 0, {"smooth_loss": 0.0, "best_val_bpb": None, "total_time": 0.0}
    if args.resume:
        start_step, loop = resume(args, out_dir, model, optimizer, manifest, world, device, B, rows_per_step)
    elif base_optim is not None:
        warm_start(optimizer, base_optim, args.init_lr_frac)
        print0(f"optimizer: warm start from the base optimizer state, lr x {args.init_lr_frac}")
    else:
        for g in optimizer.param_groups:
            g["lr"] *= args.init_lr_frac
            g["initial_lr"] = g["lr"]

    use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    step_model = torch.compile(model, dynamic=False) if use_compile else model
    flops_per_token = model.estimate_flops()
    peak = get_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else float("inf")
    token_bytes = tok.token_bytes()  # numpy: evaluate_bpb moves it to the model's device
    eval_steps = max(1, min(args.eval_tokens // (B * T * world), val_rows.num_rows // (B * world)))
    if val_rows.num_rows < B * world:
        raise TrainError(f"val split has {val_rows.num_rows} rows, fewer than one batch ({B} x {world})")

    wandb_run = None
    if args.run != "dummy" and master:
        import wandb  # only when a run is named
        wandb_run = wandb.init(project="nanosft", name=args.run, config=vars(args) | {"snapshot": str(snapshot)})
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
    kept = rewrite_metrics(out_dir / "metrics.jsonl", start_step if args.resume else 0) if master else []
    metrics_file = open(out_dir / "metrics.jsonl", "a") if master else None

    def log(record: dict) -> None:
        if master:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            if wandb_run is not None:
                wandb_run.log(record, step=record.get("step"))

    def evaluate(step: int) -> float:
        from trainer.evaluate import evaluate_bpb
        model.eval()
        with torch.no_grad():
            bpb = evaluate_bpb(model, val_batches(val_rows, rank=rank, world_size=world, device_batch=B,
                                                  steps=eval_steps, device=device), token_bytes)
        model.train()
        if loop["best_val_bpb"] is None or bpb < loop["best_val_bpb"]:
            loop["best_val_bpb"] = bpb
        print0(f"step {step:05d} | val bpb {bpb:.4f}")
        log({"step": step, "val_bpb": bpb})
        return bpb

    # ChatCORE grades on the base dir's task data; the demo on its own generated test sets
    eval_root = (demo_dir(data_dir_of(snapshot) or args.data_dir) if manifest["recipe"].get("demo")
                 else base_dir(args.data_dir))
    if args.chatcore_every > 0:
        print0(f"ChatCORE reads its tasks from {eval_root}")

    def run_chatcore(step: int) -> None:
        from trainer.evaluate import chatcore
        model.eval()
        with torch.no_grad():
            res = chatcore(model, tok, eval_root, max_cat=args.chatcore_max_cat,
                           max_sample=args.chatcore_max_sample, batch_size=B,
                           max_tokens=args.chatcore_max_tokens)
        model.train()
        print0(f"step {step:05d} | chatcore {json.dumps(res)}")
        log({"step": step, **{f"chatcore/{k}": v for k, v in res.items() if isinstance(v, (int, float))}})

    def save(step: int, val_bpb) -> None:
        meta = {
            "step": step, "val_bpb": val_bpb,
            "model_config": asdict(model.config),  # includes num_experts/top_k (nanochat moe3 omits them)
            "user_config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "max_seq_len": T, "device_batch_size": B, "total_batch_size": total,
            "nanosft": {"snapshot_id": manifest["snapshot_id"], "snapshot": str(snapshot), "world_size": world,
                        "tokenizer": {"file": str(snapshot / manifest["tokenizer"]["file"]),  # what eval/chat load
                                      "fingerprint": manifest["tokenizer"]["fingerprint"]},
                        "rows_per_step": rows_per_step, "num_steps": num_steps, "loop_state": dict(loop)},
        }
        save_checkpoint(out_dir, step, model.state_dict() if master else None, optimizer.state_dict(),
                        meta if master else None, rank)
        print0(f"saved checkpoint {out_dir}/model_{step:06d}.pt")

    loader = StepLoader(train_rows, schedule, rank=rank, world_size=world, grad_accum=grad_accum, device_batch=B,
                        device=device, start_step=start_step, doc_mask=args.doc_mask)
    model.train()
    losses: list[tuple[int, float]] = [(r["step"], r["loss"]) for r in kept if "loss" in r]  # the whole run's curve
    val_bpb = None
    stop_at = min(args.stop_at, num_steps) if args.stop_at > 0 else num_steps
    t_start = time.time()
    step = start_step
    try:
        for step in range(start_step, stop_at):
            if args.eval_every > 0 and step % args.eval_every == 0:
                val_bpb = evaluate(step)
            if args.chatcore_every > 0 and step > 0 and step % args.chatcore_every == 0:
                run_chatcore(step)
            t0 = time.time()
            batch = loader.next()
            if batch.n_supervised == 0:  # only an overlong = "nanochat" snapshot has target-free rows (upstream's)
                print0(f"step {step + 1:05d}/{num_steps} | skipped: its rows hold no supervised target "
                       "(no forward, no optimizer step; the schedule goes on)")
                log({"step": step + 1, "skipped": "no supervised target", "supervised": 0})
                if args.save_every > 0 and (step + 1) % args.save_every == 0 and step + 1 < stop_at:
                    save(step + 1, val_bpb)
                continue
            step_loss = forward_backward(step_model, batch, grad_accum, world, args.loss_norm)
            if ddp:
                dist.all_reduce(step_loss)
            train_loss = step_loss.item() / batch.n_supervised
            if not math.isfinite(train_loss):
                raise TrainError(f"loss is {train_loss} at step {step + 1} (rank {rank} rows {batch.rows.tolist()}); "
                                 "stopping without saving: the last good checkpoint is kept")
            progress = step / num_steps
            lrm = lr_multiplier(progress, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
            optimizer_step(model, optimizer, lrm, muon_momentum(step))
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t0
            if step > start_step:  # the first step includes compilation
                loop["total_time"] += dt
            if step == start_step:
                gc.collect()
                gc.freeze()  # nothing allocated after warm-up needs the cyclic collector
            loop["smooth_loss"] = 0.9 * loop["smooth_loss"] + 0.1 * train_loss
            smooth = loop["smooth_loss"] / (1 - 0.9 ** (step + 1))
            tok_s = total / dt
            mfu = 100 * flops_per_token * total / dt / (peak * world)
            epoch = schedule.epoch_at(step + 1)
            print0(f"step {step + 1:05d}/{num_steps} ({100 * (step + 1) / num_steps:5.1f}%) | loss {train_loss:.4f} "
                   f"(ema {smooth:.4f}) | lrm {lrm:.3f} | dt {dt * 1000:.0f}ms | tok/s {tok_s:,.0f} | mfu {mfu:.2f} | "
                   f"epoch {epoch:.3f} | elapsed {time.time() - t_start:.0f}s")
            losses.append((step + 1, train_loss))
            log({"step": step + 1, "loss": train_loss, "smooth_loss": smooth, "lrm": lrm, "dt": dt, "tok_per_s": tok_s,
                 "mfu": mfu, "epoch": epoch, "supervised": batch.n_supervised})
            if args.save_every > 0 and (step + 1) % args.save_every == 0 and step + 1 < stop_at:
                save(step + 1, val_bpb)
    finally:
        loader.close()
        gc.unfreeze()
    done = stop_at
    if done == num_steps:
        if args.eval_every > 0:
            val_bpb = evaluate(done)
        if args.chatcore_every > 0:
            run_chatcore(done)
    if done > start_step:
        save(done, val_bpb)
    if master:
        metrics_file.close()
        plot_losses(losses, out_dir / "loss.png")
        peak_mem = (f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda"
                    else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (host RSS)")
        best = loop["best_val_bpb"]
        print0(f"done: {done - start_step} steps, {(done - start_step) * total:,} tokens, peak memory "
               f"{peak_mem}, {loop['total_time']:.1f}s training, best val bpb "
               f"{'n/a' if best is None else f'{best:.4f}'}; checkpoint in {out_dir}")
    if wandb_run is not None:
        wandb_run.finish()
    if ddp:
        dist.destroy_process_group()
    return 0


def rewrite_metrics(path: Path, start_step: int) -> list[dict]:
    """Keep the records a run resumed at `start_step` will not write again, so metrics.jsonl holds one record
    per step: a crashed run's steps after its checkpoint are redone, as is an evaluation at the checkpoint
    step itself; a fresh run (start_step 0) starts an empty file. Returns the kept records."""
    kept = []
    if start_step > 0 and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a crash
                continue
            if r.get("step", 0) < start_step or (r.get("step") == start_step and "loss" in r):
                kept.append(r)
    tmp = temp_path(path)
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)
    return kept


def check_writable(folder: Path) -> None:
    """Create the checkpoint folder and write a probe file in it, or say why not (before any training);
    remove the temps of killed saves."""
    probe = folder / f".write-probe.tmp-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
        # .model_/.optim_/.meta_*.tmp-PID of a save killed before its rename: removed here, at the start, on
        # rank 0 only (a pid of another node's rank cannot be checked from this one, so never during saves)
        remove_stale_temps(folder)
    except OSError as e:
        raise TrainError(f"checkpoint folder {folder} is not writable ({e.strerror or e}); set NANOCHAT_BASE_DIR "
                         "or --data-dir to a writable place, or pass --out-tag") from None


def resume(args, out_dir: Path, model: GPT, optimizer, manifest: dict, world: int, device, device_batch: int,
           rows_per_step: int) -> tuple[int, dict]:
    """Continue this run's latest checkpoint exactly: same snapshot, same world size, same schedule."""
    try:
        step = find_last_step(out_dir, complete=True)  # a checkpoint interrupted mid-write has no meta
    except CheckpointError:
        raise TrainError(f"--resume: no checkpoint in {out_dir}; run without --resume to start")
    meta = load_meta(out_dir, step)
    ns = meta.get("nanosft", {})
    if ns.get("snapshot_id") != manifest["snapshot_id"]:
        raise TrainError(f"--resume: the checkpoint in {out_dir} was trained on snapshot {ns.get('snapshot_id')}, "
                         f"this run reads {manifest['snapshot_id']}; pass that snapshot, or start a new run "
                         "with --out-tag")
    if ns.get("world_size") != world:
        raise TrainError(f"--resume: the optimizer shards are for {ns.get('world_size')} ranks, this run has {world}")
    was = (meta.get("device_batch_size"), ns.get("rows_per_step"))
    if was != (device_batch, rows_per_step):
        change = (f"--resume: the checkpoint ran --device-batch-size {was[0]} ({was[1]} rows/step), this run "
                  f"{device_batch} ({rows_per_step} rows/step)")
        if not args.resume_new_batch:
            raise TrainError(f"{change}: the rows of each step would differ; pass --device-batch-size {was[0]}, "
                             "or --resume-new-batch to continue anyway (not an exact resume)")
        print0(f"WARNING: {change}; continuing because of --resume-new-batch: not an exact resume")
    _, rank, _, _ = dist_info()
    state = load_model_state(out_dir, step, device)
    model.load_state_dict(state, strict=True)
    optim = load_optim_state(out_dir, step, rank, device)
    if optim is None:
        raise TrainError(f"--resume: missing optim_{step:06d}_rank{rank}.pt in {out_dir}")
    optimizer.load_state_dict(optim)
    print0(f"resume: step {step} of {out_dir}")
    return step, dict(ns.get("loop_state", {}))


if __name__ == "__main__":
    sys.exit(main())
