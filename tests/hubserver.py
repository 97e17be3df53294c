"""A Hugging Face Hub on 127.0.0.1: the few HTTP endpoints huggingface_hub calls to resolve a revision, list
a commit's files and download them, served from repositories held in memory.

Point `HF_ENDPOINT` at `url` and the real client code (`HfApi.repo_info`, `snapshot_download`) runs
against it: errors carry the Hub's `X-Error-Code` header, downloads its `X-Repo-Commit` and `ETag`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

API = re.compile(r"/api/(models|datasets)/(?P<rest>.+)")
RESOLVE = re.compile(r"/(?:datasets/)?(?P<rest>.+)")


@dataclass
class Repo:
    kind: str  # model | dataset
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}
    token: str | None = None  # a private repository: only this bearer token sees it (the Hub answers 404)


class Hub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []
        self.delay = 0.0  # seconds every answer waits: a slow or hanging Hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def push(self, repo_id: str, folder: Path, kind: str = "model", branch: str = "main",
             token: str | None = None) -> str:
        """Commit every file under `folder` to `branch` (of a private repository if `token`); returns the new
        commit's sha."""
        files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        repo = self.repos.setdefault(repo_id, Repo(kind, token=token))
        sha = hashlib.sha1(json.dumps([repo_id, len(repo.commits), sorted(files)]).encode()).hexdigest()
        repo.commits[sha] = files
        repo.refs[branch] = sha
        return sha

    def close(self) -> None:
        self.server.shutdown()

    def _lookup(self, rest: str) -> tuple[str | None, str]:
        """Split `org/name/<tail>` at the longest known repository id."""
        for repo_id in sorted(self.repos, key=len, reverse=True):
            if rest == repo_id or rest.startswith(repo_id + "/"):
                return repo_id, rest[len(repo_id) + 1:]
        return None, rest

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _send(self, status: int, payload: bytes, headers: dict, body: bool):
                self.send_response(status)
                for name, value in {"Content-Length": str(len(payload)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                if body:
                    self.wfile.write(payload)

            def _error(self, status: int, code: str, body: bool):
                payload = json.dumps({"error": code}).encode()
                self._send(status, payload, {"X-Error-Code": code, "Content-Type": "application/json"}, body)

            def _serve(self, body: bool):
                path = unquote(urlsplit(self.path).path)
                hub.requests.append(f"{self.command} {path}")
                time.sleep(hub.delay)
                api = API.fullmatch(path)
                kind = "dataset" if path.startswith(("/api/datasets/", "/datasets/")) else "model"
                repo_id, tail = hub._lookup(api["rest"] if api else RESOLVE.fullmatch(path)["rest"])
                if (repo_id is None or hub.repos[repo_id].kind != kind or hub.repos[repo_id].token is not None
                        and self.headers.get("Authorization") != f"Bearer {hub.repos[repo_id].token}"):
                    return self._error(404, "RepoNotFound", body)
                repo = hub.repos[repo_id]
                # /api/{kind}s/{id}[/revision/{rev} | /tree/{rev}[/{path}]]; /[datasets/]{id}/resolve/{rev}/{file}
                verb, _, rest = tail.partition("/")
                revision, _, file = rest.partition("/")
                if api and verb == "":
                    verb, revision = "revision", "main"
                sha = repo.refs.get(revision, revision if revision in repo.commits else None)
                if sha is None:
                    return self._error(404, "RevisionNotFound", body)
                files = repo.commits[sha]
                if api and verb == "revision":
                    info = {"id": repo_id, "sha": sha, "private": repo.token is not None,
                            "siblings": [{"rfilename": name} for name in files]}
                    return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
                if api and verb == "tree":
                    tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                            for name, data in files.items() if name.startswith(file)]
                    return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)
                if not api and verb == "resolve" and file in files:
                    data = files[file]
                    return self._send(200, data, {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                                                  "Content-Type": "application/octet-stream"}, body)
                return self._error(404, "EntryNotFound", body)

        return Handler
