"""Unpack and verify a snapshot archive: python -m pipeline.import FILE.tar.zst --data-dir DIR

Members must be regular files inside one top-level folder; anything else (absolute paths,
`..`, links, devices) is refused before a byte is written. The snapshot is unpacked into a
temporary folder, verified against its manifest, then renamed into <data_dir>/nanosft/snapshots/.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tarfile
from pathlib import Path, PurePosixPath

import zstandard

from pipeline.cli import run_cli
from pipeline.errors import SnapshotError
from pipeline.layout import snapshots_dir
from pipeline.manifest import verify_snapshot
from pipeline.recipe import is_safe_name
from pipeline.tempfiles import remove_stale_temps

_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def _safe_member(member: tarfile.TarInfo, archive: Path) -> tuple[str, str | None]:
    """(snapshot folder, file name) of a member, or SnapshotError if it could escape the target.

    A plain folder entry `<snapshot>/` (what `tar --zstd -cf x.tar.zst <snapshot>` writes) gives (folder, None)."""
    path = PurePosixPath(member.name)
    parts = path.parts
    if member.isdir() and len(parts) == 1 and _NAME.match(parts[0]) and parts[0] not in (".", ".."):
        return parts[0], None
    if member.isdir():
        raise SnapshotError(f"member {member.name!r} is a sub-folder; a snapshot archive holds one folder of files "
                            "(make archives with pipeline.export)", file=archive)
    if not member.isfile():
        raise SnapshotError(f"member {member.name!r} is not a regular file (links and devices are refused)",
                            file=archive)
    if path.is_absolute() or len(parts) != 2 or any(p in ("", ".", "..") or not _NAME.match(p) for p in parts):
        raise SnapshotError(f"member {member.name!r} is not <snapshot>/<file>: refused (it could escape the "
                            "target folder)", file=archive)
    return parts[0], parts[1]


def import_snapshot(archive: Path, data_dir: Path) -> Path:
    archive = Path(archive)
    if not archive.is_file():
        raise SnapshotError("archive not found", file=archive)
    snapshots = snapshots_dir(data_dir)
    snapshots.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(snapshots, ".import.tmp-*")  # left by a killed import
    tmp = snapshots / f".import.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    folder = None
    try:
        with open(archive, "rb") as raw:
            try:
                zin = zstandard.ZstdDecompressor().stream_reader(raw)
                with tarfile.open(fileobj=zin, mode="r|") as tar:
                    for member in tar:
                        name, file = _safe_member(member, archive)
                        if folder is not None and name != folder:
                            raise SnapshotError(f"archive holds more than one folder ({folder}, {name})", file=archive)
                        folder = name
                        if file is None:
                            continue
                        src = tar.extractfile(member)
                        with open(tmp / file, "xb") as out:
                            shutil.copyfileobj(src, out, 1 << 22)
            except (tarfile.TarError, zstandard.ZstdError, EOFError) as e:
                raise SnapshotError(f"not a readable .tar.zst snapshot archive ({e})", file=archive) from None
        if folder is None:
            raise SnapshotError("archive is empty", file=archive)
        manifest = verify_snapshot(tmp, full=True)
        name = f"{manifest['recipe']['name']}-{manifest['snapshot_id']}"
        if not is_safe_name(name):
            raise SnapshotError(f"recipe name {manifest['recipe']['name']!r} is not a safe folder name", file=archive)
        if folder != name:  # the id, not the folder name, says what the snapshot is
            print(f"the archive's folder is {folder!r}, its manifest says {name!r}: importing it as {name}",
                  file=sys.stderr)
        final = snapshots / name
        if final.exists():
            try:
                verify_snapshot(final, full=True)
            except SnapshotError as e:
                raise SnapshotError(f"an existing copy at {final} fails verification ({e}); remove it "
                                    f"(rm -r {final}) and import again") from None
            print(f"{final} already exists and verifies; leaving it as is", file=sys.stderr)
            return final
        os.replace(tmp, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.import", description=__doc__.split("\n")[0])
    ap.add_argument("archive", type=Path)
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("NANOCHAT_BASE_DIR") or "data"),
                    help="unpacks into <data_dir>/nanosft/snapshots (default: NANOCHAT_BASE_DIR, else data)")
    args = ap.parse_args(argv)

    def body() -> int:
        print(import_snapshot(args.archive, args.data_dir))
        return 0
    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
