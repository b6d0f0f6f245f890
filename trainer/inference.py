"""Loading a trained checkpoint for inference (`trainer.eval`, `trainer.chat`): the model, and the tokenizer
it was trained with.

The checkpoint is found as nanochat finds it (`<base>/<phase>_checkpoints/<tag>/model_<step>.pt`, largest dN
tag, last finished step) or named directly with `--checkpoint DIR`. The tokenizer is, in order: `--tokenizer`,
the snapshot tokenizer recorded in the checkpoint's meta (`nanosft.tokenizer`, written by trainer.train), then
`<base>/tokenizer/tokenizer.pkl`; whichever is used must have the fingerprint the meta records.
"""
from __future__ import annotations

import argparse
import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.tokenizer import ChatTokenizer, load_tokenizer
from trainer.checkpoint import (PHASE_DIRS, CheckpointError, base_dir, build_model, find_last_step, find_model_tag,
                                load_meta, load_model_state)
from trainer.common import init_distributed, print0


@dataclass
class Loaded:
    model: torch.nn.Module
    tok: ChatTokenizer
    meta: dict
    checkpoint: Path  # the model file
    tokenizer: Path
    device: torch.device


def add_checkpoint_args(ap: argparse.ArgumentParser) -> None:
    a = ap.add_argument
    a("--data-dir", type=Path, default=Path("data"), help="nanochat base dir (NANOCHAT_BASE_DIR overrides it)")
    a("-i", "--source", choices=sorted(PHASE_DIRS), default="sft", help="which checkpoints: sft|base|rl")
    a("-g", "--model-tag", default=None, help="checkpoint folder (default: the largest dN)")
    a("-s", "--step", type=int, default=None, help="checkpoint step (default: the last finished one)")
    a("--checkpoint", type=Path, default=None, help="a checkpoint folder, instead of --source/--model-tag")
    a("--tokenizer", type=Path, default=None, help="tokenizer.pkl (default: the one the checkpoint was trained with)")
    a("--device-type", default="", help="cuda|cpu|mps (empty = autodetect)")


def resolve_tokenizer(meta: dict, explicit: Path | None, data_dir: Path) -> tuple[ChatTokenizer, Path]:
    recorded = meta.get("nanosft", {}).get("tokenizer") or {}
    want = recorded.get("fingerprint")
    candidates = [explicit] if explicit else [Path(recorded["file"])] if recorded.get("file") else []
    if not explicit:
        candidates.append(base_dir(data_dir) / "tokenizer" / "tokenizer.pkl")
    tried = []
    for path in candidates:
        if not path.is_file():
            tried.append(f"{path} (absent)")
            continue
        tok = load_tokenizer(path)
        if want and tok.fingerprint != want:
            if explicit:
                raise CheckpointError(f"--tokenizer {path} has fingerprint {tok.fingerprint[:12]}, the checkpoint "
                                      f"was trained with {want[:12]}")
            tried.append(f"{path} (fingerprint {tok.fingerprint[:12]}, not {want[:12]})")
            continue
        return tok, path
    raise CheckpointError("no tokenizer for this checkpoint: tried " + "; ".join(tried)
                          + ". Pass --tokenizer PATH (the snapshot's tokenizer.pkl)")


@torch.no_grad()
def cast_for_inference(model) -> torch.nn.Module:
    """Store every parameter in the compute dtype (bf16 on CUDA), once: the model casts each one to that dtype
    at every use anyway (fp32 masters are for training), so the results are identical and a decode step
    launches no casts. Buffers (rotary tables, MoE routing biases) are left as they are."""
    dt = getattr(model, "dtype", torch.float32)
    for p in model.parameters():
        if p.dtype != dt and p.is_floating_point():
            p.data = p.data.to(dt)
    return model


@torch.no_grad()
def inference_copy(model) -> torch.nn.Module:
    """`model` itself when its parameters are already in the compute dtype (or it is not a GPT), else a copy
    whose parameters are (costing their size in that dtype): what ChatCORE runs on during training, where
    the parameters are fp32 masters and a decode step would read each weight at twice the bytes and cast it."""
    dt = getattr(model, "dtype", None)
    params = list(model.parameters())
    if dt is None or not hasattr(model, "new_kv_cache") or all(p.dtype == dt for p in params):
        return model
    memo = {id(p): torch.nn.Parameter(p.detach().to(dt), requires_grad=False) for p in params
            if p.is_floating_point()}
    return copy.deepcopy(model, memo)


def load_checkpoint(args) -> Loaded:
    """The model (eval mode) and tokenizer named by the add_checkpoint_args flags."""
    _, rank, _, world, device = init_distributed(args.device_type)
    if args.checkpoint is not None:
        ckpt = Path(args.checkpoint)
    else:
        root = base_dir(args.data_dir) / PHASE_DIRS[args.source]
        if os.environ.get("NANOCHAT_BASE_DIR"):
            print0(f"checkpoints under {root} (NANOCHAT_BASE_DIR is set; it overrides --data-dir)")
        ckpt = root / (args.model_tag or find_model_tag(root))
    if not ckpt.is_dir():
        raise CheckpointError(f"no checkpoint folder {ckpt}")
    step = args.step if args.step is not None else find_last_step(ckpt, complete=True)
    meta = load_meta(ckpt, step)
    model = cast_for_inference(build_model(meta, load_model_state(ckpt, step, device), device).eval())
    tok, tok_path = resolve_tokenizer(meta, args.tokenizer, args.data_dir)
    if tok.vocab_size != model.config.vocab_size:
        raise CheckpointError(f"tokenizer {tok_path} has {tok.vocab_size} tokens, the model {model.config.vocab_size}")
    path = ckpt / f"model_{step:06d}.pt"
    print0(f"model {path} (d{model.config.n_layer}, {sum(p.numel() for p in model.parameters()):,} parameters) "
           f"on {device}; tokenizer {tok_path}")
    return Loaded(model, tok, meta, path, tok_path, device)
