"""A fake Hugging Face Hub on 127.0.0.1 for the fetch tests: exactly the endpoints huggingface_hub calls.

- GET  /api/datasets/<repo>/revision/<rev>            repo info (`sha` = the commit of `rev`)
- GET  /api/datasets/<repo>/tree/<rev>/<path>         one folder's entries (size, oid, lfs.oid = sha256)
- HEAD /datasets/<repo>/resolve/<rev>/<path>          X-Repo-Commit, ETag (the sha256), Content-Length
- GET  the same                                       the bytes; honours `Range: bytes=N-` with a 206
- GET  /files/<name>                                  plain files (the identity conversations, the word list)

Errors carry the Hub's X-Error-Code header (RepoNotFound, RevisionNotFound, EntryNotFound), as hf_raise_for_status
reads it. Faults for the tests: `status[prefix] = code` answers any path starting with prefix with that code;
`drop_after[path] = n` sends n bytes of a file once, then closes the connection; `stall_after[path] = n` sends n
bytes, then waits until `release` is set. Every request is logged in `requests` as (method, path, Range header).
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

PARQUET_REVISION = "refs/convert/parquet"


class FakeHub:
    def __init__(self, datasets: dict[str, dict[str, bytes]], files: dict[str, bytes] | None = None,
                 commit: str = "c0ffee" * 6 + "abcd"):
        self.datasets = datasets  # repo -> {path in the parquet branch -> bytes}
        self.files = files or {}
        self.commit = commit
        self.status: dict[str, int] = {}
        self.drop_after: dict[str, int] = {}
        self.stall_after: dict[str, int] = {}
        self.release = threading.Event()
        self.stalled = threading.Event()
        self.requests: list[tuple[str, str, str | None]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._serve(self, head=True)

            def do_GET(self):
                hub._serve(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    # --- responses ---

    def _send(self, h, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        h.send_response(code)
        for k, v in (headers or {}).items():
            h.send_header(k, str(v))
        if "Content-Length" not in (headers or {}):
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _json(self, h, obj, head: bool) -> None:
        self._send(h, 200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, head)

    def _error(self, h, code: int, error_code: str | None, head: bool) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": error_code or "error"}
        if error_code:
            headers["X-Error-Code"] = error_code
        self._send(h, code, json.dumps({"error": error_code or "error"}).encode(), headers, head)

    def _serve(self, h, head: bool) -> None:
        parts = urlsplit(h.path)
        path = unquote(parts.path)
        self.requests.append((h.command, path, h.headers.get("Range")))
        for prefix, code in self.status.items():
            if path.startswith(prefix):
                return self._error(h, code, None, head)
        if path.startswith("/files/"):
            name = path[len("/files/"):]
            if name not in self.files:
                return self._error(h, 404, None, head)
            return self._send_bytes(h, path, self.files[name], head)
        for kind in ("/api/datasets/", "/datasets/"):
            if path.startswith(kind):
                return self._dataset(h, kind, path[len(kind):], head)
        self._error(h, 404, None, head)

    def _split_repo(self, rest: str) -> tuple[str | None, str]:
        for repo in self.datasets:
            if rest.startswith(repo + "/"):
                return repo, rest[len(repo) + 1:]
        return None, rest

    def _revision(self, rest: str) -> tuple[str | None, str]:
        for rev in (PARQUET_REVISION, self.commit):
            if rest == rev or rest.startswith(rev + "/"):
                return rev, rest[len(rev) + 1:]
        return None, rest

    def _dataset(self, h, kind: str, rest: str, head: bool) -> None:
        repo, rest = self._split_repo(rest)
        if repo is None:
            return self._error(h, 404, "RepoNotFound", head)
        files = self.datasets[repo]
        op, _, rest = rest.partition("/")
        rev, rest = self._revision(rest)
        if rev is None:
            return self._error(h, 404, "RevisionNotFound", head)
        if kind == "/api/datasets/" and op == "revision":
            return self._json(h, {"id": repo, "sha": self.commit, "private": False}, head)
        if kind == "/api/datasets/" and op == "tree":
            folder = rest.strip("/")
            entries = [self._entry(p, b) for p, b in files.items() if p.rsplit("/", 1)[0] == folder]
            if not entries:
                return self._error(h, 404, "EntryNotFound", head)
            return self._json(h, entries, head)
        if kind == "/datasets/" and op == "resolve":
            if rest not in files:
                return self._error(h, 404, "EntryNotFound", head)
            return self._send_bytes(h, rest, files[rest], head)
        self._error(h, 404, None, head)

    def _entry(self, path: str, data: bytes) -> dict:
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        return {"type": "file", "path": path, "size": len(data), "oid": blob,
                "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}}

    def _send_bytes(self, h, key: str, data: bytes, head: bool) -> None:
        sha = hashlib.sha256(data).hexdigest()
        headers = {"X-Repo-Commit": self.commit, "ETag": f'"{sha}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        start = 0
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes=") and not head:
            start = int(rng[len("bytes="):].split("-")[0])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        headers["Content-Length"] = len(body)
        if head:
            return self._send(h, 200, b"", headers | {"Content-Length": len(data)}, head=True)
        code = 206 if start else 200
        for faults, stall in ((self.drop_after, False), (self.stall_after, True)):
            n = faults.pop(key, None)
            if n is not None:
                h.send_response(code)
                for k, v in headers.items():
                    h.send_header(k, str(v))
                h.end_headers()
                h.wfile.write(body[:n])
                h.wfile.flush()
                if stall:
                    self.stalled.set()
                    while not self.release.wait(0.05):
                        pass
                    time.sleep(0.05)
                h.close_connection = True
                try:
                    h.connection.shutdown(2)
                except OSError:
                    pass
                return
        self._send(h, code, body, headers)
