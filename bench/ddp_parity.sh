#!/usr/bin/env bash
# DDP parity on 2 GPUs: 2 ranks x accumulation 1 vs 1 rank x accumulation 2 at the same total batch
# must give the same per-step losses (within bf16 tolerance): design §7's world-size-independent rows.
#   bash bench/ddp_parity.sh [DATA_DIR] [STEPS]
# On a machine with one GPU, NANOSFT_SHARE_GPUS=1 bash bench/ddp_parity.sh puts both ranks on it over gloo:
# that checks the 2-rank path's CUDA numerics (kernels, loss normalisation, optimizer shards), not NCCL or speed.
set -euo pipefail
DATA=${1:-data}; STEPS=${2:-30}; PY=${PYTHON:-python3}
COMMON="--data-dir $DATA --init scratch --depth 4 --num-iterations $STEPS --device-batch-size 8 \
  --total-batch-size $((16 * 512)) --eval-every 0 --chatcore-every 0"
# --overwrite: a rerun replaces this script's own two runs (the trainer removes only their checkpoint files)
$PY -m trainer.train $COMMON --out-tag parity-w1 --overwrite > "${OUT:-/tmp}/parity_w1.log" 2>&1
torchrun --standalone --nproc_per_node=2 -m trainer.train $COMMON --out-tag parity-w2 --overwrite > "${OUT:-/tmp}/parity_w2.log" 2>&1
$PY - "$DATA" <<'PY'
import json, sys
from pathlib import Path
d = Path(sys.argv[1]) / "chatsft_checkpoints"
read = lambda tag: [r["loss"] for r in map(json.loads, (d / tag / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
a, b = read("parity-w1"), read("parity-w2")
assert len(a) == len(b) and a, (len(a), len(b))
rel = [abs(x - y) / abs(x) for x, y in zip(a, b)]
print("step | 1 rank x accum 2 | 2 ranks x accum 1 | rel diff")
for i in list(range(0, len(a), max(1, len(a) // 10))) + [len(a) - 1]:
    print(f"{i + 1:4d} | {a[i]:.5f} | {b[i]:.5f} | {rel[i]:.2e}")
print(f"max rel diff over {len(a)} steps: {max(rel):.2e} (bf16 tolerance 2e-2): {'PASS' if max(rel) < 2e-2 else 'FAIL'}")
PY
