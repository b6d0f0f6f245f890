"""Evaluate a checkpoint on the ChatCORE tasks (nanochat's chat_eval, for nanosft checkpoints).

    python -m trainer.eval --data-dir D [-a GSM8K|HumanEval] [--max-problems N] [--json out.json]
    torchrun --nproc_per_node=8 -m trainer.eval --data-dir D        (problems sharded over ranks)

Eval data is read from the data dir (nanochat's task_data layout); a task whose data is absent is skipped
with the reason. Prints a table per task and ChatCORE; `--json` also keeps every problem's completion
and verdict.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

from pipeline.cli import run_cli
from pipeline.manifest import write_json_atomic
from trainer.checkpoint import CheckpointError, base_dir
from trainer.common import DeviceError, print0
from trainer.evaluate import LOADERS, chatcore, describe_files
from trainer.inference import add_checkpoint_args, load_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m trainer.eval", description=__doc__.split("\n")[0])
    add_checkpoint_args(ap)
    a = ap.add_argument
    a("-a", "--task-name", default=None, help=f"tasks separated by | (default: all six: {'|'.join(LOADERS)})")
    a("-x", "--max-problems", type=int, default=-1, help="at most N problems per task (-1 = all)")
    a("-b", "--batch-size", type=int, default=None, help="prompts per forward / per decode batch "
                                                          "(default: 32 on CUDA, 8 elsewhere)")
    a("-m", "--max-tokens", type=int, default=512, help="max new tokens per generative problem")
    a("-t", "--temperature", type=float, default=0.0)
    a("-k", "--top-k", type=int, default=50)
    a("--json", type=Path, default=None, help="write the results, per task and per problem, to this file")
    return ap.parse_args(argv)


def table(res: dict) -> str:
    """One line per task that ran: accuracy, problems, seconds, files graded; then ChatCORE."""
    lines = [f"{'task':<14} {'accuracy':>9} {'problems':>9} {'seconds':>8}  graded on"]
    for name in LOADERS:
        if name in res["files"]:
            files = describe_files(res["files"][name])
            lines.append(f"{name:<14} {100 * res[name]:>8.2f}% {res['problems'][name]:>9,} "
                         f"{res['seconds'][name]:>8.1f}  {files}")
        elif name in res["skipped"]:
            lines.append(f"{name:<14} {'skipped':>9}  {res['skipped'][name]}")
    core = "n/a" if res["ChatCORE"] is None else f"{res['ChatCORE']:.4f}"
    cat = "n/a" if res["ChatCORE_cat"] is None else f"{res['ChatCORE_cat']:.4f}"
    lines.append(f"ChatCORE {core} (categorical only: {cat}) over {len(res['files'])} task(s)")
    return "\n".join(lines)


def run(args) -> int:
    loaded = load_checkpoint(args)
    tasks = args.task_name.split("|") if args.task_name else list(LOADERS)
    unknown = [t for t in tasks if t not in LOADERS]
    if unknown:
        print(f"error: unknown task(s) {', '.join(unknown)} (known: {', '.join(LOADERS)})", file=sys.stderr)
        return 2
    batch = args.batch_size or (32 if loaded.device.type == "cuda" else 8)
    data_dir = base_dir(args.data_dir)
    print0(f"eval data from {data_dir}; tasks {', '.join(tasks)}; batch {batch}, max tokens {args.max_tokens}, "
           f"temperature {args.temperature}")
    records: dict = {}
    t0 = time.time()
    res = chatcore(loaded.model, loaded.tok, data_dir, max_cat=args.max_problems, max_sample=args.max_problems,
                   batch_size=batch, max_tokens=args.max_tokens, tasks=tasks, temperature=args.temperature,
                   top_k=args.top_k, records=records)
    elapsed = time.time() - t0
    print0(table(res))
    print0(f"total {elapsed:.1f}s")
    if args.json is not None and int(os.environ.get("RANK", 0)) == 0:
        out = {"checkpoint": str(loaded.checkpoint), "tokenizer": str(loaded.tokenizer),
               "step": loaded.meta.get("step"), "data_dir": str(data_dir),
               "settings": {"max_problems": args.max_problems, "batch_size": batch, "max_tokens": args.max_tokens,
                            "temperature": args.temperature, "top_k": args.top_k},
               "ChatCORE": res["ChatCORE"], "ChatCORE_cat": res["ChatCORE_cat"], "skipped": res["skipped"],
               "seconds": elapsed,
               "tasks": {name: {"accuracy": res[name], "problems": res["problems"][name],
                                "files": res["files"][name], "seconds": res["seconds"][name],
                                "results": records[name]} for name in res["files"]}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json, out, indent=1)
        print0(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run_cli(lambda: run(args), errors=(CheckpointError, DeviceError))
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
