"""A small HTTP server on loopback that plays the Hub's part for the endpoints huggingface_hub uses here.

Repo creation, branches, YAML validation, preupload, commit (NDJSON, regular uploads, deletions), repo info,
tree listing and file resolution, and the large-file path: preupload answers "lfs" for files of LFS_SIZE bytes
or more, the LFS batch endpoint hands out a basic-transfer upload URL, the PUT stores the object by its sha256
(checked), and a commit's ``lfsFile`` entries name stored objects. No xet is offered (clients run with
HF_HUB_DISABLE_XET=1). The real huggingface_hub client talks to it through HF_ENDPOINT.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

LFS_SIZE = 10 * 2**20  # as the Hub: larger files go through LFS


@dataclass
class Repo:
    private: bool = False
    gated: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # branch → commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha → {path: content}
    messages: dict[str, str] = field(default_factory=dict)


@dataclass
class HubState:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, auth
    # a test sets hold: each commit request then sets committing and waits for hold before reading its body
    hold: threading.Event | None = None
    committing: threading.Event = field(default_factory=threading.Event)
    lfs: dict[str, bytes] = field(default_factory=dict)  # sha256 → object uploaded through LFS

    def add_commit(
        self, repo_id: str, branch: str, files: dict[str, bytes], message: str = "", deleted: tuple = ()
    ) -> str:
        repo = self.repos.setdefault(repo_id, Repo())
        parent = dict(repo.commits.get(repo.branches.get(branch, ""), {}))
        parent.update(files)
        for gone in deleted:  # a file, or a folder ending in /
            for p in [p for p in parent if p == gone or (gone.endswith("/") and p.startswith(gone))]:
                del parent[p]
        sha = hashlib.sha1(json.dumps(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in parent.items()))
                           .encode() + str(len(repo.commits)).encode()).hexdigest()  # fmt: skip
        repo.commits[sha] = parent
        repo.branches[branch] = sha
        repo.messages[sha] = message
        return sha

    def resolve(self, repo_id: str, rev: str) -> str | None:
        repo = self.repos[repo_id]
        if rev in repo.branches:
            return repo.branches[rev]
        return rev if rev in repo.commits else None


def _handler(state: HubState, base_url: list[str]):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def _send(self, code: int, body: object = None, headers: dict[str, str] | None = None, head=False):
            data = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if not isinstance(body, bytes):
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)

        def _error(self, code: int, error_code: str, message: str, head=False):
            self._send(
                code, {"error": message}, {"X-Error-Code": error_code, "X-Error-Message": message}, head
            )

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = bytearray()
                while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                    out += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return bytes(out)
            n = int(self.headers.get("Content-Length", 0))
            return self.rfile.read(n) if n else b""

        def do_PUT(self):  # noqa: N802
            path = self._record()
            parts = path.strip("/").split("/")
            if len(parts) == 2 and parts[0] == "lfs-upload":
                data = self._body()
                if hashlib.sha256(data).hexdigest() != parts[1]:
                    return self._error(400, "BadRequest", "object does not match its oid")
                state.lfs[parts[1]] = data
                return self._send(200, {})
            return self._error(404, "EntryNotFound", f"no route PUT {path}")

        def _lfs_batch(self, body: bytes):
            objects = []
            for obj in json.loads(body)["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if obj["oid"] not in state.lfs:
                    href = f"{base_url[0]}/lfs-upload/{obj['oid']}"
                    entry["actions"] = {"upload": {"href": href, "header": {}}}
                objects.append(entry)
            return self._send(200, {"transfer": "basic", "objects": objects})

        def _record(self) -> str:
            path = unquote(urlparse(self.path).path)
            state.requests.append((self.command, path, self.headers.get("Authorization")))
            return path

        def do_POST(self):  # noqa: N802
            path = self._record()
            parts = path.strip("/").split("/")
            if state.hold is not None and parts[-2:-1] == ["commit"]:
                state.committing.set()
                state.hold.wait()
            body = self._body()
            if len(body) < int(self.headers.get("Content-Length", 0)):
                return None  # the client went away mid-request: as the Hub, commit nothing
            if path == "/api/repos/create":
                data = json.loads(body)
                repo_id = (
                    f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
                )
                if repo_id in state.repos:
                    return self._send(409, {"error": "repo exists", "url": f"{base_url[0]}/{repo_id}"})
                state.repos[repo_id] = Repo(private=bool(data.get("private")))
                state.add_commit(
                    repo_id, "main", {".gitattributes": b"*.safetensors filter=lfs\n"}, "initial"
                )
                return self._send(200, {"url": f"{base_url[0]}/{repo_id}", "name": repo_id})
            if path.endswith(".git/info/lfs/objects/batch"):
                return self._lfs_batch(body)
            if path == "/api/validate-yaml":
                return self._send(200, {"errors": [], "warnings": []})
            if len(parts) >= 6 and parts[0] == "api" and parts[1] == "models":
                repo_id, action, rev = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
                if repo_id not in state.repos:
                    return self._error(404, "RepoNotFound", "Repository not found")
                if action == "branch":
                    repo = state.repos[repo_id]
                    if rev in repo.branches:
                        return self._send(409, {"error": "branch exists"})
                    repo.branches[rev] = repo.branches["main"]
                    return self._send(200, {})
                if action == "preupload":
                    files = json.loads(body)["files"]
                    out = [
                        {"path": f["path"], "shouldIgnore": False,
                         "uploadMode": "lfs" if f.get("size", 0) >= LFS_SIZE else "regular"}
                        for f in files
                    ]  # fmt: skip
                    return self._send(
                        200, {"files": out, "commitOid": state.repos[repo_id].branches.get(rev)}
                    )
                if action == "commit":
                    files, message, deleted = {}, "", []
                    for line in body.splitlines():
                        item = json.loads(line)
                        if item["key"] == "header":
                            message = item["value"].get("summary", "")
                        elif item["key"] == "file":
                            files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        elif item["key"] == "lfsFile":
                            if item["value"]["oid"] not in state.lfs:
                                missing = item["value"]["path"]
                                return self._error(400, "BadRequest", f"LFS object of {missing} missing")
                            files[item["value"]["path"]] = state.lfs[item["value"]["oid"]]
                        elif item["key"] in ("deletedFile", "deletedFolder"):
                            deleted.append(item["value"]["path"])
                        else:
                            return self._error(400, "BadRequest", f"unsupported commit item {item['key']}")
                    sha = state.add_commit(repo_id, rev, files, message, tuple(deleted))
                    url = f"{base_url[0]}/{repo_id}/commit/{sha}"
                    return self._send(200, {"commitUrl": url, "commitOid": sha, "pullRequestUrl": None})
            return self._error(404, "EntryNotFound", f"no route POST {path}")

        def _repo_and_rev(self, repo_id: str, rev: str, head=False):
            repo = state.repos.get(repo_id)
            if repo is None or (repo.private and not self.headers.get("Authorization")):
                self._error(401, "RepoNotFound", "Repository not found", head)
                return None, None
            if repo.gated:
                self._error(403, "GatedRepo", "Access to this repo is restricted", head)
                return None, None
            sha = state.resolve(repo_id, rev)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
                return None, None
            return repo, sha

        def do_GET(self, head: bool = False):  # noqa: N802
            path = self._record()
            parts = path.strip("/").split("/")
            if len(parts) >= 5 and parts[:2] == ["api", "models"] and parts[4] in ("revision", "tree"):
                repo_id = f"{parts[2]}/{parts[3]}"
                rev = parts[5] if len(parts) > 5 else "main"
                repo, sha = self._repo_and_rev(repo_id, rev, head)
                if repo is None:
                    return None
                files = repo.commits[sha]
                if parts[4] == "tree":
                    tree = [
                        {"type": "file", "path": p, "size": len(c), "oid": hashlib.sha1(c).hexdigest()}
                        for p, c in sorted(files.items())
                    ]
                    return self._send(200, tree, head=head)
                siblings = [{"rfilename": p} for p in sorted(files)]
                info = {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private}
                info |= {"gated": False, "disabled": False, "tags": [], "siblings": siblings}
                return self._send(200, info, head=head)
            if len(parts) >= 5 and parts[2] == "resolve":
                repo_id, rev, file = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
                repo, sha = self._repo_and_rev(repo_id, rev, head)
                if repo is None:
                    return None
                content = repo.commits[sha].get(file)
                if content is None:
                    return self._error(404, "EntryNotFound", f"{file} not found", head)
                etag = hashlib.sha256(content).hexdigest()
                headers = {
                    "ETag": f'"{etag}"',
                    "X-Repo-Commit": sha,
                    "Content-Type": "application/octet-stream",
                }
                return self._send(200, content, headers, head)
            return self._error(404, "EntryNotFound", f"no route GET {path}", head)

        def do_HEAD(self):  # noqa: N802
            return self.do_GET(head=True)

    return Handler


class HubServer:
    """A loopback Hub: ``url`` is the endpoint, ``state`` holds the repos, ``close()`` stops it."""

    def __init__(self) -> None:
        self.state = HubState()
        base: list[str] = [""]
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state, base))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        base[0] = self.url
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
