"""Recheck a snapshot against its manifest: python -m pipeline.verify SNAPSHOT [--quick]"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.errors import SnapshotError
from pipeline.manifest import latest_snapshot, verify_snapshot


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.verify", description=__doc__)
    ap.add_argument("snapshot", type=Path, nargs="?", help="snapshot folder (default: newest of --recipe)")
    ap.add_argument("--recipe", default="demo")
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("NANOCHAT_BASE_DIR") or "data"),
                    help="looks in <data_dir>/nanosft/snapshots (default: NANOCHAT_BASE_DIR, else data)")
    ap.add_argument("--quick", action="store_true", help="sizes only, no hashes or row checks")
    args = ap.parse_args(argv)
    try:
        if args.snapshot is None:
            args.snapshot = latest_snapshot(args.data_dir, args.recipe)
        manifest = verify_snapshot(args.snapshot, full=not args.quick)
    except SnapshotError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    rows = sum(s["rows"] for s in manifest["shards"])
    print(f"OK {args.snapshot} ({manifest['snapshot_id']}): {len(manifest['shards'])} shards, {rows:,} rows"
          + (" (sizes only)" if args.quick else ", hashes and row statistics match"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
