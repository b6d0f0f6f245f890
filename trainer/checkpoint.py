"""Checkpoints in nanochat's layout (reference §5), written atomically, loaded with weights_only=True.

    <base>/<phase>_checkpoints/<tag>/model_SSSSSS.pt, meta_SSSSSS.json, optim_SSSSSS_rankR.pt
"""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from pipeline.cli import first_line
from pipeline.manifest import write_json_atomic
from pipeline.tempfiles import temp_path
from trainer.config import GPTConfig

PHASE_DIRS = {"base": "base_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}


class CheckpointError(Exception):
    pass


def base_dir(data_dir: str | Path | None = None) -> Path:
    """NANOCHAT_BASE_DIR if set, else the data dir (so the demo never writes into ~/.cache/nanochat)."""
    env = os.environ.get("NANOCHAT_BASE_DIR")
    return Path(env) if env else Path(data_dir or "data")


def find_model_tag(phase_dir: Path) -> str:
    """nanochat's default: the largest dN tag, else the most recently modified folder."""
    dirs = [d for d in phase_dir.iterdir() if d.is_dir()] if phase_dir.is_dir() else []
    if not dirs:
        raise CheckpointError(f"no checkpoints in {phase_dir}")
    tagged = [(int(m.group(1)), d.name) for d in dirs if (m := re.match(r"d(\d+)", d.name))]
    if tagged:
        return max(tagged)[1]
    return max(dirs, key=lambda d: d.stat().st_mtime).name


def find_last_step(ckpt_dir: Path, complete: bool = False) -> int:
    """Largest step with a model file (nanochat's rule); with `complete`, only steps whose meta (written last) exists."""
    pattern = r"meta_(\d+)\.json" if complete else r"model_(\d+)\.pt"
    steps = [int(m.group(1)) for p in ckpt_dir.glob("*_*") if (m := re.fullmatch(pattern, p.name))]
    if not steps:
        raise CheckpointError(f"no {'finished checkpoint' if complete else 'model_<step>.pt'} in {ckpt_dir}")
    return max(steps)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = temp_path(path)
    try:
        try:
            torch.save(obj, tmp)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError [enforce fail ...]
            raise CheckpointError(f"cannot write {path}: {first_line(e, type(e).__name__)} (is the disk full or "
                                  "the folder read-only?); the previous checkpoint is kept") from None
    finally:  # a failed write (disk full, interrupt) leaves neither a partial file nor a stray temp
        tmp.unlink(missing_ok=True)


def save_checkpoint(ckpt_dir: Path, step: int, model_state: dict | None, optim_state: dict | None,
                    meta: dict | None, rank: int) -> None:
    """Rank 0 writes model and meta; every rank writes its optimizer shard. Meta goes last: it marks completion
    (in a distributed run only after every rank's shard is on disk)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if optim_state is not None:
        _atomic_save(optim_state, ckpt_dir / f"optim_{step:06d}_rank{rank}.pt")
    if rank == 0 and model_state is not None:
        _atomic_save(model_state, ckpt_dir / f"model_{step:06d}.pt")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank == 0:
        if meta is not None:
            path = ckpt_dir / f"meta_{step:06d}.json"
            try:
                write_json_atomic(path, meta, newline=False)
            except OSError as e:
                raise CheckpointError(f"cannot write {path}: {first_line(e, type(e).__name__)}; the previous "
                                      "checkpoint is kept") from None


def load_meta(ckpt_dir: Path, step: int) -> dict:
    path = ckpt_dir / f"meta_{step:06d}.json"
    if not path.is_file():
        raise CheckpointError(f"missing {path}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): truncated or damaged; delete this step's files "
                              "to fall back to the previous checkpoint") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is not a JSON object: damaged")
    return meta


def _torch_load(path: Path, device) -> Any:
    """weights_only load whose failures (hostile pickle, truncated zip) name the file, in one line."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"cannot load {path}: it holds objects other than tensors (a pickle that could run "
                              "code), refused; use a checkpoint written by nanochat or nanosft") from None
    except Exception as e:  # RuntimeError (zip), EOFError, ...: an unusable file
        raise CheckpointError(f"cannot load {path}: {first_line(e, type(e).__name__)} (truncated or damaged; "
                              "delete this step's files to fall back to the previous checkpoint)") from None


def load_model_state(ckpt_dir: Path, step: int, device: torch.device) -> dict[str, torch.Tensor]:
    path = ckpt_dir / f"model_{step:06d}.pt"
    if not path.is_file():
        raise CheckpointError(f"missing {path}")
    state = _torch_load(path, device)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    if torch.device(device).type != "cuda":
        state = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in state.items()}
    return state


def load_optim_state(ckpt_dir: Path, step: int, rank: int, device: torch.device) -> dict | None:
    path = ckpt_dir / f"optim_{step:06d}_rank{rank}.pt"
    if not path.is_file():
        return None
    return _torch_load(path, device)


def config_from_meta(meta: dict) -> GPTConfig:
    cfg = dict(meta["model_config"])
    cfg.setdefault("window_pattern", "L")
    return GPTConfig.from_dict(cfg)


def build_model(meta: dict, state: dict[str, torch.Tensor], device: torch.device):
    """nanochat's load path: meta device → to_empty → init_weights (rotary, dtypes) → strict load with assign."""
    from trainer.model import GPT
    config = config_from_meta(meta)
    n = config.n_layer
    state.setdefault("resid_lambdas", torch.ones(n, device=device))  # assign=True adopts the tensor's device
    state.setdefault("x0_lambdas", torch.zeros(n, device=device))
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    model.load_state_dict(state, strict=True, assign=True)
    return model
