"""Look inside a snapshot: python -m pipeline.inspect [SNAPSHOT] [--split train] [--row N] [--stats]

`--row N` decodes one packed row: supervised tokens are highlighted, and each document
boundary is marked with its global conversation id and task.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.cli import error, run_cli
from pipeline.errors import SnapshotError
from pipeline.manifest import latest_snapshot, load_manifest, shard_paths
from pipeline.shard_format import SplitReader

SUP_ON, SUP_OFF = "\x1b[30;42m", "\x1b[0m"   # supervised span
DOC_ON, DOC_OFF = "\x1b[1;35m", "\x1b[0m"    # document boundary marker


def print_stats(manifest: dict[str, Any]) -> None:
    print(f"snapshot {manifest['snapshot_id']}  recipe {manifest['recipe']['name']}  "
          f"max_seq_len {manifest['max_seq_len']}  vocab {manifest['tokenizer']['vocab_size']}")
    keys = ["split", "name", "conversations", "packed", "tokens", "supervised_frac", "truncated", "dropped_long",
            "dropped_unsupervised", "bad"]
    print("  ".join(f"{k:>12}" for k in keys))
    for t in manifest["stats"]["tasks"]:
        print("  ".join(f"{t.get(k, ''):>12.3f}" if isinstance(t.get(k), float) else f"{t.get(k, ''):>12}"
                        for k in keys))
    for s in manifest["stats"]["splits"]:
        print(f"{s['split']}: {s['rows']:,} rows, {s['tokens']:,} tokens, pad {100 * s['pad_fraction']:.3f}% "
              f"(lower bound {100 * s['lower_bound_pad_fraction']:.3f}%), supervised "
              f"{100 * s['supervised_fraction']:.1f}% of slots")


def render_row(reader: SplitReader, row: int, decode, task_names: list[str], color: bool) -> str:
    shard, local = reader.locate(row)
    tokens, mask = shard.tokens[local], shard.mask[local]
    lens, ids, tasks = shard.row_docs(local)
    on, off = (SUP_ON, SUP_OFF) if color else ("[[", "]]")
    don, doff = (DOC_ON, DOC_OFF) if color else ("", "")
    out, pos = [], 0
    for length, doc_id, task in zip(lens, ids, tasks):
        out.append(f"\n{don}--- conversation {int(doc_id)} ({task_names[int(task)]}, {int(length)} tokens) ---{doff}\n")
        end = pos + int(length)
        while pos < end:  # group runs of equal mask so each run decodes as text
            run_end = pos
            while run_end < end and mask[run_end] == mask[pos]:
                run_end += 1
            text = decode(tokens[pos:run_end].tolist())
            out.append(f"{on}{text}{off}" if mask[pos] else text)
            pos = run_end
    pad = len(tokens) - pos
    out.append(f"\n{don}--- padding: {pad} tokens ---{doff}\n")
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.inspect", description=__doc__.split("\n")[0])
    ap.add_argument("snapshot", type=Path, nargs="?", help="snapshot folder (default: newest of --recipe)")
    ap.add_argument("--recipe", default="demo")
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("NANOCHAT_BASE_DIR") or "data"),
                    help="looks in <data_dir>/nanosft/snapshots (default: NANOCHAT_BASE_DIR, else data)")
    ap.add_argument("--split", default="train", choices=["train", "val"])
    ap.add_argument("--row", type=int, help="decode this row (global index in the split)")
    ap.add_argument("--stats", action="store_true", help="per-task statistics")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer.pkl (default: the one recorded in the manifest)")
    ap.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    args = ap.parse_args(argv)
    return run_cli(lambda: _main(args))


def _main(args) -> int:
    try:
        if args.snapshot is None:
            args.snapshot = latest_snapshot(args.data_dir, args.recipe)
        manifest = load_manifest(args.snapshot)
        if args.stats or args.row is None:
            print_stats(manifest)
        if args.row is not None:
            from pipeline.tokenizer import load_tokenizer
            tok_path = args.tokenizer or _tokenizer_path(args.snapshot, manifest)
            tok = load_tokenizer(tok_path)
            if tok.fingerprint != manifest["tokenizer"]["fingerprint"]:
                raise SnapshotError(f"tokenizer {tok_path} is not the snapshot's (fingerprint differs)")
            reader = SplitReader(shard_paths(args.snapshot, manifest, args.split))
            names = [t["name"] for t in manifest["tasks"]]
            color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
            text = render_row(reader, args.row, tok.decode, names, color)  # first: says the valid range
            print(f"{args.split} row {args.row} of {reader.num_rows}: {reader.n_supervised([args.row])} "
                  f"supervised targets" + ("" if color else "; supervised tokens shown [[like this]]"))
            print(text)
    except IndexError as e:  # a row outside the split: says the valid range
        return error(str(e))
    return 0


def _tokenizer_path(snapshot: Path, manifest: dict[str, Any]) -> Path:
    return snapshot / manifest["tokenizer"]["file"]


if __name__ == "__main__":
    sys.exit(main())
