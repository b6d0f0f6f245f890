"""Pack a snapshot into one zstandard-compressed tar: python -m pipeline.export SNAPSHOT FILE.tar.zst

The archive holds one folder named like the snapshot; the manifest is its last member.
Written to a temporary name and renamed, so a killed export leaves no half archive; an existing
FILE is never replaced (choose another name, or remove it first).
"""
from __future__ import annotations

import argparse
import sys
import tarfile
from pathlib import Path

import zstandard

from pipeline.cli import run_cli
from pipeline.errors import SnapshotError
from pipeline.manifest import snapshot_files, verify_snapshot
from pipeline.tempfiles import link_into_place, temp_path


def export_snapshot(snapshot: Path, archive: Path, level: int = 10) -> Path:
    snapshot = Path(snapshot).resolve()
    manifest = verify_snapshot(snapshot, full=True)  # never ship a snapshot that does not verify
    archive = Path(archive)
    if not archive.parent.is_dir():
        raise SnapshotError(f"folder {archive.parent} does not exist; create it first", file=archive)
    if archive.exists() or archive.is_symlink():
        raise SnapshotError("exists; export never replaces a file: remove it or choose another name", file=archive)
    tmp = temp_path(archive)
    try:
        with open(tmp, "wb") as raw:
            cctx = zstandard.ZstdCompressor(level=level, threads=-1)
            with cctx.stream_writer(raw) as zout, tarfile.open(fileobj=zout, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for name in snapshot_files(manifest):
                    info = tar.gettarinfo(str(snapshot / name), arcname=f"{snapshot.name}/{name}")
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    info.mtime = 0  # reproducible archive bytes
                    info.mode = 0o644
                    with open(snapshot / name, "rb") as f:
                        tar.addfile(info, f)
        try:
            link_into_place(tmp, archive)  # a file that appeared there meanwhile is still never replaced
        except FileExistsError:
            raise SnapshotError("appeared while exporting; not replaced", file=archive) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return archive


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__.split("\n")[0])
    ap.add_argument("snapshot", type=Path)
    ap.add_argument("archive", type=Path)
    ap.add_argument("--level", type=int, default=10, help="zstd level (1-22)")
    args = ap.parse_args(argv)

    def body() -> int:
        print(export_snapshot(args.snapshot, args.archive, args.level))
        return 0
    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
