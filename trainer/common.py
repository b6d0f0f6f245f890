"""Small shared pieces of the trainer: devices, dtypes, ranks, peak FLOPs, optional imports, the fp32-master Linear."""
from __future__ import annotations

import importlib
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def compute_dtype(device: torch.device | str) -> torch.dtype:
    """Activation dtype, as nanochat picks it: env NANOCHAT_DTYPE, else bf16 on CUDA SM >= 8.0, else fp32."""
    env = os.environ.get("NANOCHAT_DTYPE", "")
    if env:
        if env not in _DTYPES:
            raise ValueError(f"NANOCHAT_DTYPE={env!r}: expected one of {sorted(_DTYPES)}")
        return _DTYPES[env]
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    return torch.float32


def autodetect_device() -> str:
    """Device type to run on: cuda, else mps, else cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def dist_info() -> tuple[bool, int, int, int]:
    """(is_ddp, rank, local_rank, world_size) from the variables torchrun sets."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


class DeviceError(Exception):
    """The ranks torchrun started do not fit the visible devices; the message says how to fix it."""


# Several ranks on one GPU, for checking the multi-rank path on a one-GPU machine: local ranks wrap onto the
# visible GPUs and the group runs over gloo (NCCL refuses two ranks on one device). Slow: for checks only.
SHARE_GPUS_ENV = "NANOSFT_SHARE_GPUS"


def share_gpus() -> bool:
    """Whether NANOSFT_SHARE_GPUS asks for several ranks per GPU."""
    return os.environ.get(SHARE_GPUS_ENV, "") not in ("", "0")


def cuda_rank_device(local_rank: int, visible: int, share: bool) -> int:
    """The CUDA device index of a local rank: its own GPU, or (sharing) the GPUs in turn."""
    if visible == 0:
        raise DeviceError("--device-type cuda, but no CUDA device is visible (CUDA_VISIBLE_DEVICES?)")
    if local_rank < visible:
        return local_rank
    if share:
        return local_rank % visible
    raise DeviceError(f"local rank {local_rank} has no GPU of its own: {visible} visible. Start at most {visible} "
                      f"per node (torchrun --nproc_per_node={visible}), or set {SHARE_GPUS_ENV}=1 to run several "
                      "ranks per GPU over gloo (slow; for checks only)")


def init_distributed(device_type: str = "") -> tuple[bool, int, int, int, torch.device]:
    """(is_ddp, rank, local_rank, world_size, device): the device (autodetected when empty), TF32 matmuls on
    CUDA, and the process group joined under torchrun (NCCL on CUDA, gloo elsewhere or when ranks share GPUs)."""
    ddp, rank, local_rank, world = dist_info()
    device_type = device_type or autodetect_device()
    backend = "gloo"
    if device_type == "cuda":
        visible, share = torch.cuda.device_count(), share_gpus()
        device = torch.device("cuda", cuda_rank_device(local_rank, visible, share))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # NCCL needs a GPU per rank; only ranks that do share one fall back to gloo
        crowded = share and int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1)) > visible
        backend = "gloo" if crowded else "nccl"
    else:
        device = torch.device(device_type)
    if ddp and not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return ddp, rank, local_rank, world, device


def print0(*args, **kwargs) -> None:
    """print on rank 0 only, so a multi-GPU run logs each line once."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)


# BF16 dense peak FLOP/s. First entry whose substrings all occur in the lower-cased name wins,
# so the specific variants (NVL, PCIe, GB200 vs B200, L40S vs L4) must come before the generic ones.
PEAK_FLOPS = (
    (("gb200",), 2.5e15), (("grace blackwell",), 2.5e15), (("b200",), 2.25e15), (("b100",), 1.8e15),
    (("h200", "nvl"), 836e12), (("h200", "pcie"), 836e12), (("h200",), 989e12),
    (("h100", "nvl"), 835e12), (("h100", "pcie"), 756e12), (("h100",), 989e12),
    (("h800", "nvl"), 989e12), (("h800",), 756e12),
    (("a100",), 312e12), (("a800",), 312e12), (("a40",), 149.7e12), (("a30",), 165e12),
    (("l40s",), 362e12), (("l40-s",), 362e12), (("l40 s",), 362e12), (("l4",), 121e12),
    (("mi355",), 2.5e15), (("mi325",), 1.3074e15), (("mi300x",), 1.3074e15), (("mi300a",), 980.6e12),
    (("mi250x",), 383e12), (("mi250",), 362.1e12),
    (("5090",), 209.5e12), (("4090",), 165.2e12), (("3090",), 71e12),
)


def get_peak_flops(device_name: str) -> float:
    """Peak BF16 FLOP/s of a device by name; unknown devices (and CPU/MPS) give inf, so MFU reads 0."""
    name = device_name.lower()
    for parts, flops in PEAK_FLOPS:
        if all(p in name for p in parts):
            return flops
    print0(f"WARNING: peak FLOPs unknown for {device_name!r}; MFU will show as 0%")
    return float("inf")


@torch.compiler.assume_constant_result
def import_error(*modules: str) -> str | None:
    """None when every module imports (Triton kernels, an optional extra); else why not, for the caller's
    error message. Any exception counts: a broken install fails at import too.

    A constant to torch.compile: the kernel choices ask this inside the compiled forward, the MLP's in every
    layer, and torch 2.11's Dynamo breaks the graph at an import. A break in the layer loop ran the loop's own
    ops eagerly (bench/RESULTS.md, step 7)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:
            return f"{type(e).__name__}: {e}"
    return None


class Linear(nn.Linear):
    """No-bias Linear whose fp32 master weight is cast to the activation dtype at matmul time."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))
